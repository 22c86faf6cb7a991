//! The README's quick start, as a user runs it: `duang-admin up` starts the admin server and the
//! gateway on the embedded default (SQLite, no Redis); both answer over real HTTP; SIGTERM stops
//! the whole tree.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{ADMIN_BIN, write_conf};

/// Polls `url` until it answers 200 or the deadline passes (readiness, not timing).
async fn wait_ready(client: &reqwest::Client, url: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("duang-admin up exited before {url} was ready: {status}");
        }
        assert!(Instant::now() < deadline, "{url} not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "duang-admin up did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `up` process, stopped with SIGTERM (which stops its gateway too) when a test fails before
/// it stops it itself.
struct KillOnDrop(Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SIGTERM: `up` stops its gateway too.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
}

/// `duang-admin up` on the shipped conf with its store at `db`, ready.
struct Up {
    conf: support::TestConf,
    child: KillOnDrop,
    client: reqwest::Client,
    gateway: String,
    admin: String,
}

async fn up(dir: &std::path::Path, db: &std::path::Path) -> Up {
    let conf = write_conf(dir, &format!("sqlite://{}", db.display()));
    let mut child = KillOnDrop(
        Command::new(ADMIN_BIN)
            .arg("--conf")
            .arg(&conf.path)
            .arg("up")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn duang-admin up"),
    );
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", conf.gateway_port);
    let admin = format!("http://127.0.0.1:{}", conf.admin_port);
    wait_ready(&client, &format!("{gateway}/healthz"), &mut child).await;
    wait_ready(&client, &format!("{admin}/healthz"), &mut child).await;
    Up {
        conf,
        child,
        client,
        gateway,
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_gateway_and_admin_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("data/duang.db");
    let Up {
        conf,
        mut child,
        client,
        gateway,
        admin,
    } = up(dir.path(), &db).await;
    assert!(db.exists(), "the embedded store is created on first start");

    // The model list needs a key, as OpenAI's does.
    let r = client
        .get(format!("{gateway}/v1/models"))
        .send()
        .await
        .expect("models");
    assert_eq!(r.status(), 401);

    // Unknown routes get OpenAI-shaped errors.
    let r = client
        .get(format!("{gateway}/v2/nothing"))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");

    // The local demo upstream answers in OpenAI's wire format, JSON and SSE.
    let demo = format!("{admin}/demo/v1/chat/completions");
    let answer: serde_json::Value = client
        .post(&demo)
        .json(&serde_json::json!({"model": "demo-budget", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("demo")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["object"], "chat.completion");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("LOCAL DEMO"))
    );
    assert!(
        answer["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
    let stream = client
        .post(&demo)
        .json(&serde_json::json!({"model": "demo-budget", "stream": true, "stream_options": {"include_usage": true}, "messages": []}))
        .send()
        .await
        .expect("demo stream");
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let text = stream.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(text.contains("\"usage\""));

    // The README's path to a first completion: account, credits, key, then a request through
    // the gateway to the demo upstream.
    let cli = |args: &[&str]| {
        let out = Command::new(ADMIN_BIN)
            .arg("--conf")
            .arg(&conf.path)
            .args(args)
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    cli(&[
        "account",
        "create",
        "--email",
        "you@example.com",
        "--verified",
    ]);
    cli(&["credits", "grant", "you@example.com", "--usd", "5"]);
    let key = cli(&["key", "create", "you@example.com", "--name", "laptop"]);
    let r = client
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "budget", "messages": [{"role": "user", "content": "Say ok in one word."}], "max_tokens": 50}))
        .send()
        .await
        .expect("completion");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("LOCAL DEMO")),
        "{v}"
    );

    // Every endpoint reaches the demo: the Responses and Messages APIs (translated to its chat
    // completions) and embeddings.
    for (path, body) in [
        (
            "/v1/responses",
            serde_json::json!({"model": "budget", "input": "Say ok."}),
        ),
        (
            "/v1/messages",
            serde_json::json!({"model": "budget", "max_tokens": 50, "messages": [{"role": "user", "content": "Say ok."}]}),
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "embeddings", "input": ["Say ok."]}),
        ),
    ] {
        let r = client
            .post(format!("{gateway}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.expect("json");
        let answered = match path {
            "/v1/responses" => v["output"][0]["content"][0]["text"].as_str(),
            "/v1/messages" => v["content"][0]["text"].as_str(),
            _ => v["data"][0]["embedding"].as_array().map(|_| "LOCAL DEMO"),
        };
        assert!(
            answered.is_some_and(|t| t.contains("LOCAL DEMO")),
            "{path}: {v}"
        );
    }

    // The tiers with the seeds' customer prices, in OpenAI's list shape.
    let models: serde_json::Value = client
        .get(format!("{gateway}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    let tiers: Vec<_> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_owned(),
                m["pricing"]["input_usd_per_mtok"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                m["pricing"]["output_usd_per_mtok"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let expected = [
        ("budget", "0.12", "0.48"),
        ("standard", "0.36", "3.00"),
        ("premium", "3.60", "18.00"),
        ("embeddings", "0.04", "0.00"),
    ];
    assert_eq!(
        tiers,
        expected.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    );

    // SIGTERM stops the admin server and the gateway with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let status = wait_exit(&mut child);
    assert!(status.success(), "up exits cleanly on SIGTERM: {status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", conf.gateway_port)).is_err(),
        "the gateway stopped too"
    );
    // It drained first: the answer given just before the signal is recorded and billed, and
    // the gateway's lease went back.
    let store = duang::store::Store::open(&support::store_conf(
        &format!("sqlite://{}", db.display()),
        duang::conf::Backend::Sqlite,
    ))
    .await
    .expect("store");
    let account = store
        .account(&duang::store::AccountRef::Email("you@example.com".into()))
        .await
        .expect("account");
    let usage = store.usage_page(account.id, None, 10).await.expect("usage");
    assert_eq!(
        usage.len(),
        4,
        "the last answers before SIGTERM were recorded"
    );
    assert!(usage.iter().all(|u| u.billed.is_positive()));
    assert!(store.instances().await.expect("instances").is_empty());
    let proof = store.balance_proof(account.id).await.expect("proof");
    assert!(
        proof.holds() && proof.leased == duang::money::NanoUsd::ZERO,
        "{proof:?}"
    );
}

/// `duang-admin reload` and SIGHUP, as an operator changes a price on the quick start: both the
/// gateway (its model list and its billing) and the admin server (its pricing page) take the new
/// conf; a conf that does not validate is refused by both, and the running one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_prices_on_the_running_relay() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("data/duang.db");
    let Up {
        conf,
        mut child,
        client,
        gateway,
        admin,
    } = up(dir.path(), &db).await;
    let cli = |args: &[&str]| support::run(ADMIN_BIN, &conf.path, args, None);
    let out = cli(&[
        "account",
        "create",
        "--email",
        "op@example.com",
        "--verified",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cli(&["credits", "grant", "op@example.com", "--usd", "5"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cli(&["key", "create", "op@example.com", "--name", "ci"]);
    let key = out.stdout.trim().to_owned();
    // What the gateway and the admin show for the budget tier's input price.
    let shown = || {
        let (client, gateway, admin, key) = (&client, &gateway, &admin, &key);
        async move {
            let models: serde_json::Value = client
                .get(format!("{gateway}/v1/models/budget"))
                .bearer_auth(key)
                .send()
                .await
                .expect("model")
                .json()
                .await
                .expect("json");
            let page = client
                .get(format!("{admin}/pricing"))
                .send()
                .await
                .expect("pricing")
                .text()
                .await
                .expect("page");
            let price = models["pricing"]["input_usd_per_mtok"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (price, page)
        }
    };
    let (price, page) = shown().await;
    assert_eq!(price, "0.12");
    assert!(page.contains("$0.12 / 1M tokens"));
    let set_budget_input = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&conf.path).expect("conf");
        let (from, to) = (
            format!("input_usd_per_mtok = \"{from}\"\noutput_usd_per_mtok = \"0.48\""),
            format!("input_usd_per_mtok = \"{to}\"\noutput_usd_per_mtok = \"0.48\""),
        );
        assert!(text.contains(&from));
        std::fs::write(&conf.path, text.replacen(&from, &to, 1)).expect("write conf");
    };

    // `duang-admin reload`: both processes answer, and both show the new price.
    set_budget_input("0.12", "0.77");
    let out = cli(&["reload"]);
    let said = out.stdout;
    assert_eq!(out.code, 0, "{said}{}", out.stderr);
    assert!(
        said.contains(&format!(
            "gateway 127.0.0.1:{}: reloaded",
            conf.metrics_port
        )) && said.contains(&format!(
            "admin http://127.0.0.1:{}: reloaded",
            conf.admin_port
        )),
        "{said}"
    );
    let (price, page) = shown().await;
    assert_eq!(price, "0.77");
    assert!(
        page.contains("$0.77 / 1M tokens"),
        "the pricing page shows the new price"
    );
    // A request is billed at it: 0.77 per million input tokens, 0.48 per million output tokens.
    let r: serde_json::Value = client
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "budget", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 20}))
        .send()
        .await
        .expect("completion")
        .json()
        .await
        .expect("json");
    let (inp, out_t) = (
        r["usage"]["prompt_tokens"].as_i64().expect("prompt tokens"),
        r["usage"]["completion_tokens"]
            .as_i64()
            .expect("completion tokens"),
    );
    let store = duang::store::Store::open(&support::store_conf(
        &format!("sqlite://{}", db.display()),
        duang::conf::Backend::Sqlite,
    ))
    .await
    .expect("store");
    let account = store
        .account(&duang::store::AccountRef::Email("op@example.com".into()))
        .await
        .expect("account");
    let deadline = Instant::now() + Duration::from_secs(20);
    let billed = loop {
        let rows = store.usage_page(account.id, None, 10).await.expect("usage");
        if let Some(row) = rows.first() {
            break row.billed;
        }
        assert!(Instant::now() < deadline, "the request was never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(billed.nanos(), inp * 770 + out_t * 480);

    // A conf that does not validate: the CLI says why and asks nobody (exit 2, as check-conf);
    // a SIGHUP makes both processes refuse it. Nothing changes.
    set_budget_input("0.77", "cheap");
    let out = cli(&["reload"]);
    let said = out.stderr;
    assert_eq!(out.code, 2, "{said}");
    assert!(said.contains("tiers.budget.input_usd_per_mtok"), "{said}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("signal");
    let metrics = format!("http://127.0.0.1:{}/metrics", conf.metrics_port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .get(&metrics)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
        .contains("duang_conf_reloads_total{result=\"refused\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "the gateway never refused the bad conf"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (price, page) = shown().await;
    assert_eq!(price, "0.77");
    assert!(page.contains("$0.77 / 1M tokens"));

    // SIGHUP to `up` reloads both: the admin itself and the gateway it started.
    set_budget_input("cheap", "0.66");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("signal");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (price, page) = shown().await;
        if price == "0.66" && page.contains("$0.66 / 1M tokens") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload both: {price}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.close().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    assert!(wait_exit(&mut child).success());
}
