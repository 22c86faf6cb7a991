//! Watching the relay: the alert rules (`promtool check rules`, `promtool test rules`), the
//! Grafana dashboard's queries, and a real Prometheus scraping a real gateway.

use super::support::browser::poll;
use super::support::relay::{Proc, Relay, key_with};
use super::support::{self, free_port};
use super::{PROMETHEUS_PKG, read, repo, str_of, tool, yaml};
use duang::conf::Backend;
use serde_json::{Value as Json, json};
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
// ── The alert rules and the dashboard's queries ──────────────────────────────────────────────

#[test]
fn the_alert_rules_check_and_their_tests_pass() {
    let dir = repo("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let (ok, said) = tool("promtool", &args, &dir, PROMETHEUS_PKG);
        assert!(ok, "promtool {}:\n{said}", args.join(" "));
    }
    // Each alert is tested firing and not firing.
    let tests = read("deploy/prometheus/alerts_test.yml");
    for alert in alert_names() {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no quiet case"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels")),
            "{alert}: no firing case"
        );
    }
    // The scrape conf is valid, with the rules where the container mounts them.
    let tmp = tempfile::tempdir().expect("dir");
    let conf = read("deploy/prometheus/prometheus.yml").replace(
        "/etc/prometheus/alerts.yml",
        &dir.join("alerts.yml").display().to_string(),
    );
    std::fs::write(tmp.path().join("prometheus.yml"), conf).expect("write");
    let (ok, said) = tool(
        "promtool",
        &["check", "config", "prometheus.yml"],
        tmp.path(),
        PROMETHEUS_PKG,
    );
    assert!(ok, "promtool check config:\n{said}");
}

fn alert_rules() -> Vec<Yaml> {
    yaml("deploy/prometheus/alerts.yml")["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

fn alert_names() -> Vec<String> {
    alert_rules()
        .iter()
        .map(|r| str_of(&r["alert"], "alert").to_owned())
        .collect()
}

/// The metric names a PromQL expression uses: every `duang_…` identifier.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let b = promql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = promql[i..].find("duang_") {
        let start = i + at;
        let mut end = start + "duang_".len();
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if (start == 0 || !ident(b[start - 1])) && (end == b.len() || !ident(b[end])) {
            out.insert(promql[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Every PromQL text of the dashboard: its panels' `expr` and its variables' queries.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &Json, key: &str, out: &mut Vec<String>) {
        match v {
            Json::Object(m) => m.iter().for_each(|(k, v)| walk(v, k, out)),
            Json::Array(a) => a.iter().for_each(|v| walk(v, key, out)),
            Json::String(s) if ["expr", "query", "definition"].contains(&key) => {
                out.push(s.clone())
            }
            _ => {}
        }
    }
    let board: Json =
        serde_json::from_str(&read("deploy/grafana/duang-relay.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    walk(&board, "", &mut out);
    out
}

/// The metric names the dashboard, the alert rules and the rule tests' series use.
fn used_metric_names() -> BTreeMap<String, &'static str> {
    let mut used = BTreeMap::new();
    for q in dashboard_queries() {
        metric_names(&q).into_iter().for_each(|n| {
            used.insert(n, "the dashboard");
        });
    }
    for r in alert_rules() {
        metric_names(str_of(&r["expr"], "expr"))
            .into_iter()
            .for_each(|n| {
                used.insert(n, "alerts.yml");
            });
    }
    metric_names(&read("deploy/prometheus/alerts_test.yml"))
        .into_iter()
        .for_each(|n| {
            used.entry(n).or_insert("alerts_test.yml");
        });
    used
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(duang_x_seconds_bucket{job="duang-gateway",a="duang_in_a_string"}[5m]))) / on() my_duang_y + duang_z"#,
    );
    let expected: BTreeSet<String> = ["duang_in_a_string", "duang_x_seconds_bucket", "duang_z"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
}

#[test]
fn the_dashboard_and_the_rules_cover_what_an_operator_watches() {
    let board: BTreeSet<String> = dashboard_queries()
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    for m in [
        "duang_requests_total",
        "duang_request_duration_seconds_bucket",
        "duang_time_to_first_token_seconds_bucket",
        "duang_gateway_overhead_seconds_bucket",
        "duang_tokens_total",
        "duang_billed_nano_usd_total",
        "duang_provider_cost_nano_usd_total",
        "duang_usage_queue_depth",
        "duang_usage_backlog",
        "duang_holds_in_flight",
        "duang_redis_up",
        "duang_store_up",
        "duang_upstream_cooling",
        "duang_rate_limited_total",
        "duang_client_connections",
        "duang_upstream_prepaid_remaining_nano_usd",
        "duang_conf_reloads_total",
    ] {
        assert!(board.contains(m), "the dashboard does not show {m}");
    }
    let alerts = alert_names();
    for a in [
        "DuangGatewayDown",
        "DuangErrorRatioHigh",
        "DuangUpstreamCooling",
        "DuangUsageQueueGrowing",
        "DuangUsageBacklogGrowing",
        "DuangRedisDown",
        "DuangStoreUnavailable",
        "DuangNegativeMargin",
        "DuangUpstreamPrepaidLow",
        "DuangConfReloadRefused",
    ] {
        assert!(alerts.iter().any(|x| x == a), "no alert {a}");
    }
}

// ── A real Prometheus scraping a real gateway ────────────────────────────────────────────────

struct Prometheus {
    base: String,
    client: reqwest::Client,
    _proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus on a free port with the shipped scrape conf, pointed at `targets`,
    /// scraping and evaluating every second, its TSDB in `dir`.
    async fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let mut conf = yaml("deploy/prometheus/prometheus.yml");
        conf["global"] = serde_yaml::from_str(
            "{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}",
        )
        .expect("yaml");
        conf["rule_files"] = Yaml::Sequence(vec![
            repo("deploy/prometheus/alerts.yml")
                .display()
                .to_string()
                .into(),
        ]);
        let jobs = conf["scrape_configs"].as_sequence_mut().expect("jobs");
        jobs.retain(|j| j["job_name"].as_str() == Some("duang-gateway"));
        assert_eq!(jobs.len(), 1, "the duang-gateway job");
        jobs[0]["static_configs"][0]["targets"] =
            Yaml::Sequence(targets.iter().map(|t| t.as_str().into()).collect());
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, serde_yaml::to_string(&conf).expect("yaml")).expect("conf");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus is required ({PROMETHEUS_PKG}): {e}"));
        let mut proc = Proc(child);
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        poll("Prometheus to be ready", Duration::from_secs(30), || {
            let (client, base) = (client.clone(), base.clone());
            let exited = proc.0.try_wait().expect("try_wait");
            assert!(
                exited.is_none(),
                "prometheus exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            async move {
                let r = client.get(format!("{base}/-/ready")).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        Prometheus {
            base,
            client,
            _proc: proc,
        }
    }

    async fn api(&self, path: &str) -> Json {
        let body: Json = self
            .client
            .get(format!("{}/api/v1/{path}", self.base))
            .send()
            .await
            .expect("Prometheus API")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["status"], "success", "{path}: {body}");
        body["data"].clone()
    }

    async fn query(&self, promql: &str) -> Vec<Json> {
        let q: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let data = self.api(&format!("query?query={q}")).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the alert `name` is pending or firing with these labels.
    async fn wait_alert(&self, name: &str, labels: &[(&str, &str)]) {
        poll(
            &format!("alert {name} {labels:?}"),
            Duration::from_secs(30),
            || async {
                let data = self.api("alerts").await;
                data["alerts"]
                    .as_array()?
                    .iter()
                    .any(|a| {
                        a["labels"]["alertname"] == name
                            && labels.iter().all(|(k, v)| a["labels"][k] == *v)
                            && ["pending", "firing"].contains(&a["state"].as_str().unwrap_or(""))
                    })
                    .then_some(())
            },
        )
        .await;
    }

    async fn active_alerts(&self) -> BTreeSet<String> {
        let data = self.api("alerts").await;
        data["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A gateway on PostgreSQL (through a proxy the test cuts) serves a few requests of each kind,
/// so every series exists; a real Prometheus scrapes it with the shipped scrape conf and rules.
/// Every metric the dashboard and the rules name is then in Prometheus (histograms by their
/// `_bucket` series, with the base name a histogram in its metadata), every rule evaluates
/// without error, and the alerts follow the gateway: a cooling upstream, the store cut off,
/// the gateway gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_has_every_metric_the_dashboard_and_the_rules_use() {
    let relay = Relay::start(Backend::Postgres, "10").await;
    let mut store = url::Url::parse(&relay.t.url).expect("store URL");
    let target = format!(
        "{}:{}",
        store.host_str().expect("host"),
        store.port_or_known_default().expect("port")
    );
    let proxy = support::proxy::Proxy::start(&target).await;
    store.set_host(Some("127.0.0.1")).expect("host");
    store.set_port(Some(proxy.port)).expect("port");
    let journal = format!(
        "journal_dir = {:?}",
        relay.dir().join("journal-b").display().to_string()
    );
    let mut node = relay.node_on_store(store.as_str(), &journal).await;

    let post = |key: String, body: Json| {
        let (client, base) = (relay.client.clone(), node.base.clone());
        async move {
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("request")
        }
    };
    let chat = |tier: &str, stream: bool| {
        json!({"model": tier, "stream": stream, "max_tokens": 8,
               "messages": [{"role": "user", "content": "Say ok in one word."}]})
    };
    for stream in [false, true, false] {
        let r = post(relay.key.clone(), chat("budget", stream)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    // premium's first upstream is a dead address: three failures put it in a cool-down.
    for _ in 0..3 {
        assert_eq!(
            post(relay.key.clone(), chat("premium", false))
                .await
                .status(),
            200
        );
    }
    // A key allowed one request a minute: the second is refused.
    let limited = key_with(
        &relay,
        duang::store::LimitOverrides {
            requests_per_minute: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        post(limited.clone(), chat("budget", false)).await.status(),
        200
    );
    assert_eq!(post(limited, chat("budget", false)).await.status(), 429);
    // Prepaid credit recorded for a provider with an alert threshold, and a conf reload.
    let prepaid = support::run(
        support::ADMIN_BIN,
        &relay.conf,
        &[
            "upstream-credit",
            "add",
            "prepaid",
            "--usd",
            "1",
            "--ref",
            "inv-w",
        ],
        None,
    );
    assert_eq!(prepaid.code, 0, "{}", prepaid.stderr);
    let reloaded = relay
        .client
        .post(node.metrics.replace("/metrics", "/-/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(reloaded.status(), 200);
    poll(
        "the gateway's own metrics",
        Duration::from_secs(20),
        || async {
            let text = node.metrics_text().await;
            (text.contains("duang_rate_limited_total{")
                && text
                    .contains("duang_upstream_cooling{model=\"dead-model\",provider=\"dead\"} 1")
                && text.contains("duang_store_up 1")
                && text
                    .contains("duang_upstream_prepaid_alert_below_nano_usd{provider=\"prepaid\"}"))
            .then_some(())
        },
    )
    .await;

    let dir = tempfile::tempdir().expect("dir");
    let metrics_addr = node
        .metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let prom = Prometheus::start(dir.path(), std::slice::from_ref(&metrics_addr)).await;
    // A scrape is committed whole, with its `up` sample: once `up` is 1, every series of that
    // scrape is in (the names API alone can show a scrape's series while it is being appended).
    poll("a whole scrape", Duration::from_secs(30), || async {
        (!prom
            .query(r#"up{job="duang-gateway"} == 1"#)
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let names: BTreeSet<String> = prom
        .api("label/__name__/values")
        .await
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    let metadata = prom.api("metadata").await;
    let used = used_metric_names();
    assert!(used.len() >= 15, "too few metric names found: {used:?}");
    let mut missing = Vec::new();
    for (name, by) in &used {
        if !names.contains(name) {
            missing.push(format!("{name} (used by {by})"));
            continue;
        }
        let (base, kind) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).map(|b| (b, "histogram")))
            .filter(|(b, _)| metadata.get(*b).is_some())
            .unwrap_or((name.as_str(), ""));
        let meta = &metadata[base][0]["type"];
        assert!(!meta.is_null(), "{base}: no metadata");
        if !kind.is_empty() {
            assert_eq!(meta, kind, "{name}");
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the gateway: {missing:?}"
    );
    assert!(names.contains("up"), "GatewayDown's `up`");

    // Every rule evaluates against the real series without an error.
    poll("every rule evaluated", Duration::from_secs(30), || async {
        let data = prom.api("rules").await;
        let rules: Vec<Json> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for r in &rules {
            assert_ne!(r["health"], "err", "rule {}: {}", r["name"], r["lastError"]);
        }
        (rules.len() == alert_names().len() && rules.iter().all(|r| r["health"] == "ok"))
            .then_some(())
    })
    .await;
    prom.wait_alert(
        "DuangUpstreamCooling",
        &[("provider", "dead"), ("model", "dead-model")],
    )
    .await;
    let active = prom.active_alerts().await;
    for quiet in [
        "DuangStoreUnavailable",
        "DuangGatewayDown",
        "DuangNegativeMargin",
        "DuangUpstreamPrepaidLow",
        "DuangConfReloadRefused",
    ] {
        assert!(
            !active.contains(quiet),
            "{quiet} while all is well: {active:?}"
        );
    }

    // The store goes away: the gateway says so, and the alert follows.
    proxy.cut();
    poll(
        "duang_store_up 0 in Prometheus",
        Duration::from_secs(30),
        || async { (!prom.query("duang_store_up == 0").await.is_empty()).then_some(()) },
    )
    .await;
    prom.wait_alert("DuangStoreUnavailable", &[("instance", &metrics_addr)])
        .await;

    // The gateway goes away.
    node.proc.0.kill().expect("kill");
    prom.wait_alert(
        "DuangGatewayDown",
        &[("instance", &metrics_addr), ("job", "duang-gateway")],
    )
    .await;
}
