//! The deployment files in `deploy/` and the root `Dockerfile`, checked with the real tools: the
//! compose conf loads with the project's conf loader (and the binaries' `check-conf`), compose,
//! HAProxy, Prometheus and the Dockerfile agree with it, the systemd units pass
//! `systemd-analyze verify`, the alert rules pass `promtool check rules` and `promtool test
//! rules`, and a real Prometheus scraping a real gateway has every metric that the Grafana
//! dashboard and the alert rules name, evaluates every rule, and raises the alerts for a store
//! outage, a cooling upstream and a gateway gone (those two in `deploy/watching.rs`).
//!
//! Needs `systemd-analyze` and Debian's `prometheus` package (`prometheus`, `promtool`); a
//! missing one fails the test that needs it, never skips it.

mod support;
#[path = "deploy/watching.rs"]
mod watching;

use duang::conf::{Backend, Conf};
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{ADMIN_BIN, GATEWAY_BIN};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    let mut v: Yaml = serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    v.apply_merge().expect("YAML merge keys");
    v
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a tool; a missing tool fails the test with what to install.
fn tool(program: &str, args: &[&str], dir: &Path, install: &str) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for this test ({install}): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const PROMETHEUS_PKG: &str = "apt-get install prometheus";

// ── The compose conf ─────────────────────────────────────────────────────────────────────────

const CONF: &str = "deploy/conf/duang.toml";
const ENV_EXAMPLE: &str = "deploy/duang.env.example";

/// Every environment variable the conf names (the values of its `*_env` keys).
fn env_names(conf_text: &str) -> BTreeSet<String> {
    fn walk(v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    match v {
                        toml::Value::String(s) if k.ends_with("_env") => {
                            out.insert(s.clone());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(&toml::from_str(conf_text).expect("TOML"), &mut out);
    out
}

/// `deploy/duang.env.example` as name → value.
fn env_example() -> BTreeMap<String, String> {
    read(ENV_EXAMPLE)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// A value for each variable the conf names: the example's URLs, a signing key long enough,
/// a placeholder for each other secret.
fn conf_env() -> Vec<(String, String)> {
    let example = env_example();
    env_names(&read(CONF))
        .into_iter()
        .map(|name| {
            let value = match name.as_str() {
                "DATABASE_URL" | "REDIS_URL" => example[&name].clone(),
                "DUANG_ADMIN_SECRET" => "s".repeat(64),
                _ => format!("test-{}", name.to_lowercase()),
            };
            (name, value)
        })
        .collect()
}

fn deploy_conf() -> Conf {
    let env = conf_env();
    Conf::parse(&read(CONF), CONF, &|n| {
        env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{CONF} must load with its variables set:\n{e}"))
}

#[test]
fn the_deploy_conf_loads_with_the_variables_it_names_and_refuses_without_them() {
    let names = env_names(&read(CONF));
    let example = env_example();
    for n in &names {
        assert!(
            example.contains_key(n),
            "{CONF} names ${n}, which {ENV_EXAMPLE} does not list"
        );
    }
    let conf = deploy_conf();
    assert!(conf.warnings.is_empty(), "warnings: {:?}", conf.warnings);
    assert_eq!(conf.store.backend, Backend::Postgres);
    assert!(conf.redis.is_some(), "several gateways need Redis");
    assert!(conf.stripe.is_some() && conf.mail.smtp.is_some());
    assert!(conf.gateway.listen.ip().is_unspecified());
    assert!(
        conf.providers.iter().all(|p| !p.demo),
        "no demo upstream in production"
    );
    // The example's passwords are the ones in its URLs.
    let pg = url::Url::parse(&example["DATABASE_URL"]).expect("DATABASE_URL");
    assert_eq!(pg.password(), Some(example["POSTGRES_PASSWORD"].as_str()));
    let redis = url::Url::parse(&example["REDIS_URL"]).expect("REDIS_URL");
    assert_eq!(redis.password(), Some(example["REDIS_PASSWORD"].as_str()));

    // Without its secrets it does not start, and says which variables are missing.
    let refused = Conf::parse(&read(CONF), CONF, &|_| None)
        .expect_err("the deploy conf needs its secrets")
        .to_string();
    for var in ["REDIS_URL", "DUANG_ADMIN_SECRET", "STRIPE_SECRET_KEY"] {
        assert!(refused.contains(var), "{refused}");
    }

    // The binaries' own loader (Conf::load, the process environment) agrees.
    for (bin, args) in [
        (GATEWAY_BIN, &["--conf", CONF, "check-conf"][..]),
        (ADMIN_BIN, &["--conf", CONF, "check-conf"][..]),
    ] {
        let out = Command::new(bin)
            .args(args)
            .current_dir(repo(""))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(conf_env())
            .output()
            .expect("run check-conf");
        assert!(
            out.status.success(),
            "{bin} check-conf: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ── Compose, HAProxy and the Prometheus scrape conf against the conf ─────────────────────────

/// `"host:container[:mode]"` volume entries as (host, container).
fn volumes(service: &Yaml) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .iter()
        .map(|v| {
            let mut parts = v.split(':');
            (
                parts.next().unwrap_or_default().to_owned(),
                parts.next().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A compose duration (`45s`, `1m30s`).
fn compose_duration(v: &str) -> Duration {
    let (mut total, mut n) = (0u64, String::new());
    for c in v.chars() {
        if c.is_ascii_digit() {
            n.push(c);
        } else {
            let x: u64 = n.parse().unwrap_or_else(|_| panic!("duration {v:?}"));
            total += x * match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => panic!("duration {v:?}"),
            };
            n.clear();
        }
    }
    Duration::from_secs(total)
}

fn port_of(url_or_addr: &str) -> u16 {
    let hostport = url_or_addr
        .split("://")
        .last()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default();
    hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url_or_addr:?}"))
}

/// The conf file a service reads: its `--conf` argument, found through its volumes.
fn service_conf(name: &str, service: &Yaml) -> PathBuf {
    let command = strings(&service["command"]);
    let at = command
        .iter()
        .position(|a| a == "--conf")
        .unwrap_or_else(|| panic!("{name}: no --conf in {command:?}"));
    let path = &command[at + 1];
    let (host, target) = volumes(service)
        .into_iter()
        .find(|(_, target)| path.starts_with(&format!("{target}/")))
        .unwrap_or_else(|| panic!("{name}: {path} is on no volume"));
    repo("deploy")
        .join(host)
        .join(path.strip_prefix(&format!("{target}/")).expect("prefix"))
}

#[test]
fn compose_services_ports_and_volumes_agree_with_the_conf() {
    let compose = yaml("deploy/compose.yaml");
    let conf = deploy_conf();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    let expected = [
        "gateway-1",
        "gateway-2",
        "admin",
        "lb",
        "postgres",
        "redis",
        "prometheus",
    ];
    assert_eq!(names, expected.into_iter().collect());
    let svc = |n: &str| &compose["services"][n];
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_mapping()
        .expect("volumes")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    let mut used = BTreeSet::new();
    let metrics_port = conf.gateway.metrics_listen.port();
    let journal = conf.gateway.journal_dir.clone().expect("journal_dir set");

    let gateways = ["gateway-1", "gateway-2"];
    for name in gateways.iter().chain(&["admin"]) {
        let s = svc(name);
        assert_eq!(str_of(&s["image"], name), "duang:latest");
        assert_eq!(str_of(&s["build"]["context"], name), "..");
        assert!(repo("Dockerfile").exists());
        assert_eq!(str_of(&s["env_file"], name), "duang.env");
        assert!(service_conf(name, s) == repo(CONF), "{name} reads {CONF}");
        for dep in ["postgres", "redis"] {
            assert_eq!(
                str_of(&s["depends_on"][dep]["condition"], name),
                "service_healthy"
            );
        }
    }
    let mut hostnames = BTreeSet::new();
    for name in gateways {
        let s = svc(name);
        assert_eq!(strings(&s["command"])[0], "duang-gateway");
        assert!(
            s["ports"].is_null(),
            "{name}: only the load balancer is published"
        );
        // Its own volume holds the journal, so a restart replays it.
        let (volume, _) = volumes(s)
            .into_iter()
            .find(|(_, target)| journal.starts_with(target))
            .unwrap_or_else(|| panic!("{name}: no volume holds {}", journal.display()));
        assert!(declared.contains(volume.as_str()), "{name}: {volume}");
        assert!(used.insert(volume.clone()), "{volume} is shared");
        // Distinct hostnames: the default node ids ({hostname}:{port}) differ.
        assert!(hostnames.insert(str_of(&s["hostname"], name).to_owned()));
        let grace = compose_duration(str_of(&s["stop_grace_period"], name));
        assert!(
            grace > conf.gateway.graceful_shutdown_timeout + Duration::from_secs(5),
            "{name}: stop_grace_period {grace:?} leaves no room after the drain"
        );
        let health = strings(&s["healthcheck"]["test"]).join(" ");
        assert!(
            health.contains(&format!("127.0.0.1:{metrics_port}/readyz")),
            "{name}: {health}"
        );
    }

    let admin = svc("admin");
    let admin_port = conf.admin.listen.port();
    assert!(strings(&admin["command"]).contains(&"serve".to_owned()));
    assert_eq!(
        strings(&admin["ports"]),
        vec![format!("{admin_port}:{admin_port}")]
    );
    assert!(
        strings(&admin["healthcheck"]["test"])
            .join(" ")
            .contains(&format!(":{admin_port}/healthz"))
    );
    used.extend(
        volumes(admin)
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| !v.starts_with('.')),
    );

    // The store and Redis the conf reaches (through the example's URLs) are services here.
    let example = env_example();
    for (var, service, port) in [
        ("DATABASE_URL", "postgres", 5432),
        ("REDIS_URL", "redis", 6379),
    ] {
        let u = url::Url::parse(&example[var]).expect("URL");
        assert_eq!(u.host_str(), Some(service), "{var}");
        assert_eq!(u.port_or_known_default(), Some(port), "{var}");
        assert!(
            !svc(service)["healthcheck"].is_null(),
            "{service}: health check"
        );
    }
    used.extend(volumes(svc("postgres")).into_iter().map(|(v, _)| v));

    // HAProxy: its conf is mounted, it sends the API to each gateway's listen port and checks
    // each one's /readyz on the metrics port.
    let lb = svc("lb");
    assert!(repo("deploy/haproxy/Dockerfile").exists());
    assert_eq!(str_of(&lb["build"], "lb"), "haproxy");
    assert!(volumes(lb).contains(&(
        "./haproxy/haproxy.cfg".into(),
        "/etc/haproxy/haproxy.cfg".into()
    )));
    let haproxy = read("deploy/haproxy/haproxy.cfg");
    let bind = haproxy
        .lines()
        .find_map(|l| l.trim().strip_prefix("bind "))
        .expect("bind line");
    let published = strings(&lb["ports"]);
    assert_eq!(published.len(), 1);
    assert_eq!(
        port_of(&published[0]),
        port_of(bind.split_whitespace().next().unwrap_or_default())
    );
    let servers: BTreeSet<String> = haproxy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
        .collect();
    let listen_port = conf.gateway.listen.port();
    assert_eq!(
        servers,
        gateways
            .iter()
            .map(|g| format!("{g}:{listen_port}"))
            .collect()
    );
    assert!(haproxy.contains("option httpchk GET /readyz"));
    assert!(haproxy.contains(&format!("check port {metrics_port}")));

    // Prometheus: its conf and rules are mounted where its command and rule_files say, and it
    // scrapes each gateway's metrics port.
    let prom = svc("prometheus");
    let command = strings(&prom["command"]);
    let config_at = command
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    let mounts = volumes(prom);
    assert!(mounts.contains(&("./prometheus/prometheus.yml".into(), config_at.into())));
    let scrape = yaml("deploy/prometheus/prometheus.yml");
    for rules in strings(&scrape["rule_files"]) {
        let (host, _) = mounts
            .iter()
            .find(|(_, target)| *target == rules)
            .unwrap_or_else(|| panic!("{rules} is not mounted"));
        assert!(repo("deploy").join(host).exists(), "{host}");
    }
    used.extend(
        mounts
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| !v.starts_with('.')),
    );
    let job = scrape["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"].as_str() == Some("duang-gateway"))
        .expect("the duang-gateway job");
    let targets: BTreeSet<String> = strings(&job["static_configs"][0]["targets"])
        .into_iter()
        .collect();
    assert_eq!(
        targets,
        gateways
            .iter()
            .map(|g| format!("{g}:{metrics_port}"))
            .collect()
    );
    assert_eq!(
        used.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        declared,
        "every declared volume used, every named volume declared"
    );
    assert!(repo(ENV_EXAMPLE).exists());
}

// ── The Dockerfiles ──────────────────────────────────────────────────────────────────────────

/// A Dockerfile as (stage name, instructions): comments dropped, continuations joined.
fn dockerfile(path: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut line = String::new();
    for raw in read(path).lines() {
        let t = raw.trim();
        if t.starts_with('#') || (t.is_empty() && line.is_empty()) {
            continue;
        }
        line.push_str(t.trim_end_matches('\\'));
        line.push(' ');
        if t.ends_with('\\') {
            continue;
        }
        let text = std::mem::take(&mut line);
        let (op, args) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        let (op, args) = (op.to_uppercase(), args.trim().to_owned());
        if op == "FROM" {
            let name = args
                .split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .to_owned();
            stages.push((name, Vec::new()));
        }
        match stages.last_mut() {
            Some((_, ins)) => ins.push((op, args)),
            None => assert_eq!(op, "ARG", "{path}: only ARG may come before FROM"),
        }
    }
    stages
}

fn args_of<'a>(stage: &'a [(String, String)], op: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(o, _)| o == op)
        .map(|(_, a)| a.as_str())
        .collect()
}

#[test]
fn the_dockerfile_builds_dist_and_runs_both_binaries_as_a_user() {
    let stages = dockerfile("Dockerfile");
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build_name, build) = &stages[0];
    let (_, runtime) = &stages[1];
    assert!(args_of(build, "FROM")[0].starts_with("rust:"));
    let run = args_of(build, "RUN").join("\n");
    assert!(run.contains("cmake"), "pingora's zlib-ng needs cmake");
    assert!(run.contains("cargo build --profile dist --locked --bins"));
    // The toolchain is at least the crate's rust-version.
    let wanted: Vec<u32> = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"')
        .split('.')
        .map(|n| n.parse().expect("number"))
        .collect();
    let toolchain: Vec<u32> = read("Dockerfile")
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION")
        .split('.')
        .map(|n| n.parse().expect("number"))
        .collect();
    assert!(toolchain >= wanted, "{toolchain:?} < {wanted:?}");

    let from = args_of(runtime, "FROM")[0];
    assert!(
        from.starts_with("debian:") && from.contains("-slim"),
        "{from}"
    );
    let users = args_of(runtime, "USER");
    let user = users.last().expect("a USER in the runtime stage");
    assert!(
        !["root", "0"].contains(&user.split(':').next().unwrap_or_default()),
        "runs as {user}"
    );
    let copied = args_of(runtime, "COPY").join("\n");
    assert!(copied.contains(&format!("--from={build_name}")));
    for bin in ["duang-gateway", "duang-admin"] {
        assert!(copied.contains(bin), "{bin} is not copied");
        assert!(
            run.contains(&format!("target/dist/{bin}")),
            "{bin} is not built"
        );
    }
    let volumes = args_of(runtime, "VOLUME").join(" ");
    assert!(volumes.contains("/etc/duang") && volumes.contains("/var/lib/duang"));
    assert!(
        args_of(runtime, "ENV")
            .join(" ")
            .contains("DUANG_CONF=/etc/duang/duang.toml")
    );
    let conf = deploy_conf();
    let exposed = args_of(runtime, "EXPOSE").join(" ");
    for port in [
        conf.gateway.listen.port(),
        conf.admin.listen.port(),
        conf.gateway.metrics_listen.port(),
    ] {
        assert!(
            exposed.split_whitespace().any(|p| p == port.to_string()),
            "{port}"
        );
    }

    // The build context keeps what the build reads and drops what it does not.
    let ignore: BTreeSet<String> = read(".dockerignore")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
        .collect();
    for needed in [
        "src",
        "benches",
        "migrations",
        "conf",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        assert!(!ignore.contains(needed), ".dockerignore drops {needed}");
    }
    for dropped in ["target", ".git", "!tests/fixtures"] {
        assert!(ignore.contains(dropped), ".dockerignore lacks {dropped}");
    }

    // The load balancer's image: Debian's HAProxy, not as root.
    let lb = dockerfile("deploy/haproxy/Dockerfile");
    assert!(args_of(&lb[0].1, "FROM")[0].starts_with("debian:"));
    assert!(
        args_of(&lb[0].1, "RUN")
            .join(" ")
            .contains("install -y --no-install-recommends haproxy")
    );
    assert_eq!(args_of(&lb[0].1, "USER"), vec!["haproxy"]);
}

// ── systemd ──────────────────────────────────────────────────────────────────────────────────

#[test]
fn the_systemd_units_verify_and_drain_before_they_are_killed() {
    let dir = tempfile::tempdir().expect("dir");
    let conf = deploy_conf();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(repo("deploy/systemd")).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("unit");
        // systemd-analyze wants the commands to exist: the units point at the binaries built
        // for this test instead of /usr/local/bin.
        let local = text
            .replace("/usr/local/bin/duang-gateway", GATEWAY_BIN)
            .replace("/usr/local/bin/duang-admin", ADMIN_BIN);
        std::fs::write(dir.path().join(&name), local).expect("copy");
        units.push((name, text));
    }
    units.sort();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["duang-admin.service", "duang-gateway.service"]);
    let mut args = vec!["verify".to_owned()];
    args.extend(names.iter().map(|n| format!("./{n}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, said) = tool(
        "systemd-analyze",
        &args,
        dir.path(),
        "apt-get install systemd",
    );
    // verify exits 0 on unknown keys and bad values too; it must say nothing at all.
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    for (name, text) in &units {
        let keys: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| -> Vec<&str> {
            keys.iter()
                .filter(|(key, _)| *key == k)
                .map(|(_, v)| *v)
                .collect()
        };
        let start = get("ExecStart").join(" ");
        assert!(
            start.contains("--conf /etc/duang/duang.toml"),
            "{name}: {start}"
        );
        assert_eq!(get("EnvironmentFile"), ["/etc/duang/duang.env"], "{name}");
        assert!(
            !["", "root"].contains(&get("User").join("").as_str()),
            "{name}"
        );
        assert_eq!(get("StateDirectory"), ["duang"], "{name}");
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(get(k), [v], "{name}: {k}");
        }
        if name == "duang-gateway.service" {
            assert!(journal_in_state_dir(&conf));
            let reload = get("ExecReload");
            assert_eq!(reload.last(), Some(&"/bin/kill -HUP $MAINPID"));
            assert!(
                reload[0].ends_with("check-conf"),
                "a bad conf is never sent"
            );
            let stop: u64 = get("TimeoutStopSec")[0].parse().expect("seconds");
            assert!(
                Duration::from_secs(stop)
                    > conf.gateway.graceful_shutdown_timeout + Duration::from_secs(5),
                "TimeoutStopSec={stop} leaves no room after the drain"
            );
        }
    }
}

/// The journal lives under systemd's StateDirectory (/var/lib/duang), which the service may write.
fn journal_in_state_dir(conf: &Conf) -> bool {
    conf.gateway
        .journal_dir
        .as_deref()
        .is_some_and(|d| d.starts_with("/var/lib/duang/"))
}
