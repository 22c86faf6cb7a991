//! A whole relay for one test: the mock upstream and the real gateway as processes on loopback,
//! sharing a real store with the test, with a verified, funded account and a key.

use super::{GATEWAY_BIN, TestStore, free_port};
use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::{AccountRef, LedgerKind, NewAccount, NewLedgerEntry, Role, Store, UsageRecord};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MOCK_BIN: &str = env!("CARGO_BIN_EXE_duang-mock-upstream");
/// The provider key the gateway sends to the mock (the mock records it).
pub const PROVIDER_KEY: &str = "sk-mock-provider-key";

/// A child process killed when the test ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Mock {
    pub port: u16,
    _proc: Proc,
}

impl Mock {
    pub fn start(args: &[&str]) -> Mock {
        let mut child = Command::new(MOCK_BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mock upstream");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("mock prints its address");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected mock banner {line:?}"));
        Mock {
            port,
            _proc: Proc(child),
        }
    }

    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("http://127.0.0.1:{}/_mock/stats", self.port))
            .await
            .expect("mock stats")
            .json()
            .await
            .expect("json")
    }
}

/// The faults of the matrix tiers `f_<fault>` (see `conf_text`).
pub const FAULTS: &[&str] = &[
    "status-500",
    "status-503",
    "status-429-retry-30",
    "reset",
    "malformed",
    "stall",
    "error_body",
    "truncate",
    "split",
    "late_close",
];

/// Conf for gateway tests: tiers over the mock and over a dead address, small limits.
pub fn conf_text(
    store_url: &str,
    gateway_port: u16,
    metrics: u16,
    (mock_port, tls_mock_port, dead_port): (u16, u16, u16),
    redis: &str,
    gateway_extra: &str,
) -> String {
    let ca_file = tls_fixture("ca.pem");
    // The fault matrix: each tier's first upstream fails one way (the mock reads the fault from
    // the model name), its second is the healthy mock.
    let mut fault_tiers = String::new();
    let mut fault_models = String::new();
    for f in FAULTS {
        fault_tiers.push_str(&format!(
            "[tiers.f_{t}]\ninput_usd_per_mtok = \"0.12\"\noutput_usd_per_mtok = \"0.48\"\ndefault_max_output_tokens = 1000\nupstreams = [{{ provider = \"mock\", model = \"fault-{f}\" }}, {{ provider = \"mock\", model = \"mock-small\", weight = 0 }}]\n\n",
            t = f.replace('-', "_")
        ));
        fault_models.push_str(&format!(
            "models.\"fault-{f}\" = {{ input_usd_per_mtok = \"0.10\", output_usd_per_mtok = \"0.40\" }}\n"
        ));
    }
    format!(
        r#"
[gateway]
listen = "127.0.0.1:{gateway_port}"
metrics_listen = "127.0.0.1:{metrics}"
max_request_body_bytes = 6291456
graceful_shutdown_timeout_ms = 2000
{gateway_extra}
[gateway.cors]
allowed_origins = ["https://chat.example"]
max_age_s = 300

[store]
url = "{store_url}"
{redis}
# Generous defaults: limits are tested with keys that carry their own.
[limits.default_key]
requests_per_minute = 1000000
tokens_per_minute = 100000000000
in_flight = 10000

[limits.default_account]
requests_per_minute = 1000000
tokens_per_minute = 100000000000
in_flight = 10000

[tiers.budget]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
default_max_output_tokens = 1000
upstreams = [{{ provider = "mock", model = "mock-small" }}]

[tiers.premium]
input_usd_per_mtok = "3.60"
output_usd_per_mtok = "18.00"
default_max_output_tokens = 1000
upstreams = [{{ provider = "dead", model = "dead-model", weight = 1 }}, {{ provider = "mock", model = "mock-large", weight = 0 }}]

[tiers.unreachable]
input_usd_per_mtok = "1"
output_usd_per_mtok = "1"
upstreams = [{{ provider = "dead", model = "dead-model" }}]

[tiers.secure]
input_usd_per_mtok = "1"
output_usd_per_mtok = "1"
upstreams = [{{ provider = "secure", model = "mock-small" }}]

[tiers.untrusted]
input_usd_per_mtok = "1"
output_usd_per_mtok = "1"
upstreams = [{{ provider = "untrusted", model = "mock-small" }}]

{fault_tiers}
[tiers.f_slow_headers]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "impatient", model = "fault-slow-1000" }}, {{ provider = "mock", model = "mock-small", weight = 0 }}]

[tiers.f_tls]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "untrusted", model = "mock-small" }}, {{ provider = "mock", model = "mock-small", weight = 0 }}]

[tiers.f_nousage]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "mock", model = "fault-nousage" }}]

[tiers.claude]
input_usd_per_mtok = "3.60"
output_usd_per_mtok = "18.00"
default_max_output_tokens = 1000
upstreams = [{{ provider = "claude", model = "claude-sonnet" }}]

[tiers.claude_fallback]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "claude", model = "fault-overloaded" }}, {{ provider = "mock", model = "mock-small", weight = 0 }}]

[tiers.gemini]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "gemini", model = "gemini-fixture-flash" }}]

[tiers.named]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
response_model = "upstream"
upstreams = [{{ provider = "mock", model = "mock-small" }}]

[tiers.native]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "mockr", model = "mock-responses" }}]

[tiers.claude_cached]
input_usd_per_mtok = "3.60"
output_usd_per_mtok = "18.00"
cached_input_usd_per_mtok = "0.36"
default_max_output_tokens = 1000
upstreams = [{{ provider = "claude", model = "claude-cached" }}]

[tiers.claude_crlf]
input_usd_per_mtok = "3.60"
output_usd_per_mtok = "18.00"
default_max_output_tokens = 1000
upstreams = [{{ provider = "claude", model = "claude-crlf" }}]

[tiers.embed]
kind = "embeddings"
input_usd_per_mtok = "0.02"
upstreams = [{{ provider = "mock", model = "mock-embed" }}]

[tiers.f_429_only]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "mock", model = "fault-status-429-retry-7-retryms-6500" }}]

[tiers.slow]
input_usd_per_mtok = "1"
output_usd_per_mtok = "1"
upstreams = [{{ provider = "impatient", model = "mock-small" }}]

[tiers.prepaid]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
upstreams = [{{ provider = "prepaid", model = "mock-small" }}, {{ provider = "mock", model = "mock-small", weight = 0 }}]

[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "DUANG_TEST_MOCK_KEY"
connect_timeout_ms = 1000
first_byte_timeout_ms = 5000
idle_timeout_ms = 1500
cooldown_after_failures = 3
cooldown_ms = 1000
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}
models."mock-large" = {{ input_usd_per_mtok = "3", output_usd_per_mtok = "15" }}
models."mock-embed" = {{ input_usd_per_mtok = "0.01", output_usd_per_mtok = "0" }}
models."fault-nousage" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}
models."fault-status-429-retry-7-retryms-6500" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}
{fault_models}
[providers.mockr]
kind = "openai"
responses_api = true
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "DUANG_TEST_MOCK_KEY"
models."mock-responses" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "DUANG_TEST_MOCK_KEY"
models."claude-sonnet" = {{ input_usd_per_mtok = "3", output_usd_per_mtok = "15" }}
models."claude-crlf" = {{ input_usd_per_mtok = "3", output_usd_per_mtok = "15" }}
models."claude-cached" = {{ input_usd_per_mtok = "3", output_usd_per_mtok = "15", cached_input_usd_per_mtok = "0.30", cache_write_usd_per_mtok = "3.75" }}
models."fault-overloaded" = {{ input_usd_per_mtok = "3", output_usd_per_mtok = "15" }}

[providers.gemini]
kind = "gemini"
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "DUANG_TEST_MOCK_KEY"
models."gemini-fixture-flash" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

[providers.impatient]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
first_byte_timeout_ms = 300
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}
models."fault-slow-1000" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

[providers.secure]
kind = "openai"
base_url = "https://localhost:{tls_mock_port}/v1"
ca_file = "{ca_file}"
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

[providers.untrusted]
kind = "openai"
base_url = "https://localhost:{tls_mock_port}/v1"
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

# Bought ahead (`duang-admin upstream-credit`): out of routing once it is spent.
[providers.prepaid]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
prepaid_alert_below_usd = "0.000005"
leave_routing_when_prepaid_spent = true
models."mock-small" = {{ input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }}

[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{dead_port}/v1"
connect_timeout_ms = 500
models."dead-model" = {{ input_usd_per_mtok = "1", output_usd_per_mtok = "1" }}
"#
    )
}

/// A file of `tests/fixtures/tls` (a test CA and a `localhost` certificate it signed).
pub fn tls_fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub struct Relay {
    pub t: TestStore,
    pub mock: Mock,
    /// The same mock behind HTTPS, with a certificate from the test CA.
    pub tls_mock: Mock,
    pub base: String,
    /// The gateway's metrics URL.
    pub metrics: String,
    pub key: String,
    pub account_id: i64,
    pub key_id: i64,
    pub client: reqwest::Client,
    pub gateway: Proc,
    /// The first gateway's conf file.
    pub conf: std::path::PathBuf,
    conf_for: Box<ConfFor>,
    _dir: tempfile::TempDir,
}

/// Writes a node's conf: its port, its metrics port, extra `[gateway]` lines.
type ConfFor = dyn Fn(u16, u16, &str) -> String + Send + Sync;

/// One `duang-gateway` process of a relay.
pub struct Node {
    pub base: String,
    pub metrics: String,
    pub proc: Proc,
    /// The conf file it was started with (a reload rereads it).
    pub conf: std::path::PathBuf,
}

impl Node {
    /// This process's Prometheus text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Writes a conf for a new node (its own ports, `gateway_extra` lines in its `[gateway]`)
    /// and starts it; waits until it is ready.
    async fn spawn<F: Fn(u16, u16, &str) -> String + ?Sized>(
        dir: &std::path::Path,
        conf_for: &F,
        gateway_extra: &str,
    ) -> Node {
        Node::spawn_at(dir, conf_for, gateway_extra, free_port()).await
    }

    /// The same on a given port (another node may listen there too: the gateway sets
    /// SO_REUSEPORT, as a rolling deploy needs). A gateway that exits while starting is started
    /// again on a fresh metrics port (two tries more): a port `free_port` handed out can be taken
    /// by another process of the parallel tests before the gateway binds it. Its log (stderr)
    /// is kept beside its conf and shown when it still cannot start.
    async fn spawn_at<F: Fn(u16, u16, &str) -> String + ?Sized>(
        dir: &std::path::Path,
        conf_for: &F,
        gateway_extra: &str,
        port: u16,
    ) -> Node {
        let mut last = String::new();
        for _ in 0..3 {
            match Node::try_spawn_at(dir, conf_for, gateway_extra, port).await {
                Ok(node) => return node,
                Err(why) => last = why,
            }
        }
        panic!("the gateway exited during start: {last}");
    }

    async fn try_spawn_at<F: Fn(u16, u16, &str) -> String + ?Sized>(
        dir: &std::path::Path,
        conf_for: &F,
        gateway_extra: &str,
        port: u16,
    ) -> Result<Node, String> {
        let metrics_port = free_port();
        let conf = dir.join(format!("duang-{port}-{metrics_port}.toml"));
        std::fs::write(&conf, conf_for(port, metrics_port, gateway_extra)).expect("conf");
        let log = conf.with_extension("log");
        let stderr = if std::env::var_os("DUANG_TEST_GATEWAY_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(std::fs::File::create(&log).expect("gateway log"))
        };
        let child = Command::new(GATEWAY_BIN)
            .arg("--conf")
            .arg(&conf)
            .env("DUANG_TEST_MOCK_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn gateway");
        let mut proc = Proc(child);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status() == 200
            {
                break;
            }
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("{status}: {said}"));
            }
            assert!(Instant::now() < deadline, "gateway not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Node {
            base,
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            proc,
            conf,
        })
    }
}

impl Relay {
    /// Starts everything with an account holding `balance_usd`.
    pub async fn start(backend: Backend, balance_usd: &str) -> Relay {
        Relay::start_with(backend, balance_usd, None, "").await
    }

    /// The same, with the gateway's rate limits in the Redis at `redis_url` (and `redis_extra`
    /// lines in its `[redis]` section).
    pub async fn start_with(
        backend: Backend,
        balance_usd: &str,
        redis_url: Option<&str>,
        redis_extra: &str,
    ) -> Relay {
        let t = TestStore::new(backend).await;
        let mock = Mock::start(&["--chunks", "4"]);
        let tls_mock = Mock::start(&[
            "--chunks",
            "4",
            "--tls-cert",
            &tls_fixture("localhost.pem"),
            "--tls-key",
            &tls_fixture("localhost.key"),
        ]);
        let dir = tempfile::tempdir().expect("dir");
        let redis = redis_url
            .map(|u| {
                format!(
                    "[redis]\nurl = {u:?}\nkey_prefix = \"t{}\"\n{redis_extra}\n",
                    rand::random::<u32>()
                )
            })
            .unwrap_or_default();
        let dead_port = free_port();
        let (store_url, mock_port, tls_port) = (t.url.clone(), mock.port, tls_mock.port);
        let conf_for = move |port: u16, metrics: u16, extra: &str| {
            conf_text(
                &store_url,
                port,
                metrics,
                (mock_port, tls_port, dead_port),
                &redis,
                extra,
            )
        };
        let account = t
            .store
            .create_account(&NewAccount {
                email: "dev@example.com".into(),
                password_hash: None,
                role: Role::Customer,
                verified: true,
            })
            .await
            .expect("account");
        let balance: NanoUsd = balance_usd.parse().expect("amount");
        if balance.is_positive() {
            t.store
                .append_ledger(&NewLedgerEntry {
                    account_id: account.id,
                    kind: LedgerKind::TopUp,
                    amount: balance,
                    external_ref: "cs_test_funding".into(),
                    actor: None,
                    reason: None,
                })
                .await
                .expect("fund");
        }
        let (key, key_id) = new_key(&t.store, account.id).await;
        let node = Node::spawn(dir.path(), &conf_for, &Relay::journal_lines(dir.path())).await;
        Relay {
            t,
            mock,
            tls_mock,
            base: node.base.clone(),
            metrics: node.metrics.clone(),
            key,
            account_id: account.id,
            key_id,
            client: reqwest::Client::new(),
            gateway: node.proc,
            conf: node.conf,
            conf_for: Box::new(conf_for),
            _dir: dir,
        }
    }

    /// Another gateway node on the same store (and Redis, when there is one), journaling
    /// beside the first (as processes on one machine do).
    pub async fn another_node(&self) -> Node {
        self.node_with(&Relay::journal_lines(self._dir.path()))
            .await
    }

    /// Another gateway node with these lines in its `[gateway]` section (which must then name
    /// its `journal_dir`).
    pub async fn node_with(&self, gateway_lines: &str) -> Node {
        Node::spawn(self._dir.path(), &*self.conf_for, gateway_lines).await
    }

    /// Another gateway node that reaches the store at `store_url` (through a fault proxy, say),
    /// with these `[gateway]` lines (which must name its `journal_dir`).
    pub async fn node_on_store(&self, store_url: &str, gateway_lines: &str) -> Node {
        let from = format!("url = \"{}\"", self.t.url);
        let to = format!("url = \"{store_url}\"");
        let conf_for = |p: u16, m: u16, e: &str| (self.conf_for)(p, m, e).replace(&from, &to);
        Node::spawn(self._dir.path(), &conf_for, gateway_lines).await
    }

    /// A gateway process with `gateway.reuse_port` on, on a free port, journaling beside the
    /// first node.
    pub async fn reusable_node(&self) -> Node {
        self.node_beside_port(free_port()).await
    }

    /// A new gateway process beside `node` on its port (a rolling deploy: both must have
    /// `gateway.reuse_port` on, as `reusable_node` and this one have), journaling beside it.
    pub async fn node_beside(&self, node: &Node) -> Node {
        let port: u16 = node
            .base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.node_beside_port(port).await
    }

    async fn node_beside_port(&self, port: u16) -> Node {
        let lines = format!(
            "{}\nreuse_port = true",
            Relay::journal_lines(self._dir.path())
        );
        Node::spawn_at(self._dir.path(), &*self.conf_for, &lines, port).await
    }

    /// A key of the relay's account with a spend cap, made as the dashboard makes it.
    pub async fn capped_key(&self, cap: NanoUsd) -> (String, i64) {
        let m = duang::keys::generate();
        let k = self
            .store()
            .create_key(
                &duang::store::NewKey {
                    account_id: self.account_id,
                    name: "capped".into(),
                    spend_cap: Some(cap),
                    ..Default::default()
                },
                &m.hash,
                &m.display_prefix,
            )
            .await
            .expect("key");
        (m.plaintext.expose().clone(), k.id)
    }

    /// The relay's temp dir (confs, journals).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    fn journal_lines(dir: &std::path::Path) -> String {
        format!(
            "journal_dir = {:?}",
            dir.join("journal").display().to_string()
        )
    }

    /// The gateway's Prometheus text.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    pub fn store(&self) -> &Store {
        &self.t.store
    }

    pub async fn post(&self, body: serde_json::Value) -> reqwest::Response {
        self.post_raw(body.to_string().into_bytes(), Some(&self.key))
            .await
    }

    /// POSTs `body` to another API path (`/v1/responses`, ...) with the test key.
    pub async fn post_to(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn post_raw(&self, body: Vec<u8>, key: Option<&str>) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().await.expect("request")
    }

    /// Waits until the gateway has written `n` usage records for the account (batched writes).
    pub async fn usage(&self, n: usize) -> Vec<UsageRecord> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let records = self
                .store()
                .usage_page(self.account_id, None, 10_000)
                .await
                .expect("usage");
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} usage records written",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The account's credit (balance plus leases) and the proof that it equals the ledger.
    pub async fn credit(&self) -> NanoUsd {
        let proof = self
            .store()
            .balance_proof(self.account_id)
            .await
            .expect("proof");
        assert!(proof.holds(), "balance and ledger disagree: {proof:?}");
        let account = self
            .store()
            .account(&AccountRef::Id(self.account_id))
            .await
            .expect("account");
        assert!(!account.balance.is_negative());
        proof.cached
    }
}

/// A key of the relay's account with its own limits.
pub async fn key_with(relay: &Relay, limits: duang::store::LimitOverrides) -> String {
    let m = duang::keys::generate();
    relay
        .store()
        .create_key(
            &duang::store::NewKey {
                account_id: relay.account_id,
                name: "limited".into(),
                limits,
                ..Default::default()
            },
            &m.hash,
            &m.display_prefix,
        )
        .await
        .expect("key");
    m.plaintext.expose().clone()
}

pub use super::new_key;
