//! `duang-gateway`: the data plane (Pingora). `duang-gateway --conf conf/duang.toml`.

use clap::{Parser, Subcommand};
use duang::conf::{Conf, DEFAULT_CONF_PATH};
use duang::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc: glibc's malloc cost a sixth of the gateway's CPU (per-request buffers of 64 KiB
/// in Pingora's body readers drove it into `malloc_consolidate`); see BENCHMARKS.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "duang-gateway",
    version,
    about = "Duang Duang relay: the API gateway (data plane)"
)]
struct Cli {
    /// The conf file.
    #[arg(long, global = true, env = "DUANG_CONF", default_value = DEFAULT_CONF_PATH)]
    conf: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate the conf file and exit.
    CheckConf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    duang::logging::init();
    let conf = match Conf::load(&cli.conf) {
        Ok(conf) => conf,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    for w in &conf.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(Cmd::CheckConf) = cli.command {
        println!("{}: ok", conf.source);
        return ExitCode::SUCCESS;
    }
    // Refuse to take traffic without a reachable, migrated store. This runtime only checks;
    // the gateway's own connections live inside Pingora's runtime.
    let checked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let store = Store::open(&conf.store).await?;
                store.close().await;
                Ok::<_, anyhow::Error>(())
            })
        });
    if let Err(e) = checked {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    tracing::info!(listen = %conf.gateway.listen, "gateway starting");
    duang::gateway::run(Arc::new(conf))
}
