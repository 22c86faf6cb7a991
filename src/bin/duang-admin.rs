//! `duang-admin`: the control plane's HTTP server and the operator CLI (see `--help`).

use clap::Parser;
use duang::admin::cli::{Cli, Command, run_store_command, shutdown_signal};
use duang::admin::server::{AppState, Live, serve};
use duang::conf::Conf;
use duang::store::Store;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    duang::logging::init();
    // Only the servers (and the check) need Stripe's and SMTP's secrets.
    let servers = matches!(
        cli.command,
        Command::Up | Command::Serve | Command::CheckConf
    );
    let loaded = if servers {
        Conf::load(&cli.conf)
    } else {
        Conf::load_without_service_secrets(&cli.conf)
    };
    let conf = match loaded {
        Ok(conf) => conf,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConf = cli.command {
        for w in &conf.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "{}: ok ({} tiers, {} providers, store {}, stripe {}, mail {})",
            conf.source,
            conf.tiers.len(),
            conf.providers.len(),
            match conf.store.backend {
                duang::conf::Backend::Sqlite => "sqlite",
                duang::conf::Backend::Postgres => "postgres",
            },
            if conf.stripe.is_some() { "on" } else { "off" },
            if conf.mail.smtp.is_some() {
                "smtp"
            } else {
                "outbox"
            },
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up => up(&cli.conf, conf).await,
            Command::Serve => serve_admin(conf).await,
            other => run_store_command(&conf, other).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bind_admin(conf: &Conf) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(conf.admin.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on admin.listen {}: {e}", conf.admin.listen))
}

async fn serve_admin(conf: Conf) -> anyhow::Result<()> {
    for w in &conf.warnings {
        tracing::warn!("{w}");
    }
    let store = Store::open(&conf.store).await?;
    let listener = bind_admin(&conf).await?;
    tracing::info!(listen = %conf.admin.listen, "admin server started");
    let state = AppState::new(Arc::new(conf), store)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let live = Live::new(state);
    let hangups = tokio::spawn(reload_on_hangup(live.clone(), None));
    serve(live, listener, shutdown_signal()).await?;
    hangups.abort();
    Ok(())
}

/// SIGHUP rereads the conf (`systemctl reload`, `kill -HUP`); under `up` it is passed on to the
/// gateway, so one signal reloads the whole relay.
async fn reload_on_hangup(live: Live, gateway_pid: Option<u32>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with `duang-admin reload`");
            return;
        }
    };
    while hup.recv().await.is_some() {
        if let Some(pid) = gateway_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
        let l = live.clone();
        let _ = tokio::task::spawn_blocking(move || l.reload_logged()).await;
    }
}

/// The quick start: one process tree with the admin server here and the gateway as a child.
async fn up(conf_path: &Path, conf: Conf) -> anyhow::Result<()> {
    for w in &conf.warnings {
        tracing::warn!("{w}");
    }
    let exe = std::env::current_exe()?;
    let gateway = exe.with_file_name("duang-gateway");
    if !gateway.exists() {
        anyhow::bail!(
            "{} not found next to duang-admin: build both binaries (cargo build --release)",
            gateway.display()
        );
    }
    let store = Store::open(&conf.store).await?;
    let listener = bind_admin(&conf).await?;
    let mut child = tokio::process::Command::new(&gateway)
        .arg("--conf")
        .arg(conf_path)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", gateway.display()))?;
    eprintln!(
        "duang relay is up\n  gateway  http://{}  (API base URL {})\n  admin    {}  (dashboard: sign up there; mails go to {} while SMTP is off)\nOr from the command line:  duang-admin account create --email you@example.com --verified\nStop with Ctrl-C.",
        conf.gateway.listen,
        conf.gateway.public_base_url,
        conf.admin.public_url,
        conf.mail.outbox_dir.display(),
    );
    let state = AppState::new(Arc::new(conf), store)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let live = Live::new(state);
    let hangups = tokio::spawn(reload_on_hangup(live.clone(), child.id()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(live, listener, async move {
        let _ = stop_rx.await;
    }));
    let outcome = tokio::select! {
        () = shutdown_signal() => Ok(()),
        status = child.wait() => Err(anyhow::anyhow!("the gateway exited unexpectedly ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))),
    };
    // Stop the gateway gracefully (SIGTERM lets streams finish), then the admin server.
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = child.wait().await;
    hangups.abort();
    let _ = stop_tx.send(());
    let _ = server.await;
    outcome
}
