//! The conf file: every shipped file parses, and every kind of bad input gets a message that names
//! the file, the key path, the value and what was expected.

mod support;

use duang::conf::{Backend, Conf};
use std::path::Path;
use support::{parse_conf, shipped_conf_text};

fn err(text: &str, env: &[(&str, &str)]) -> String {
    match parse_conf(text, env) {
        Ok(_) => panic!("expected the conf to be refused:\n{text}"),
        Err(e) => e,
    }
}

/// The shipped conf with one line replaced (the line must exist).
fn shipped_with(find: &str, replace: &str) -> String {
    let text = shipped_conf_text();
    assert!(
        text.contains(find),
        "the shipped conf no longer contains {find:?}"
    );
    text.replacen(find, replace, 1)
}

#[test]
fn every_shipped_conf_file_parses_without_secrets() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("conf dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            let conf =
                Conf::parse(&text, &path.display().to_string(), &|_| None).unwrap_or_else(|e| {
                    panic!("{} must parse with no secrets set:\n{e}", path.display())
                });
            assert!(!conf.tiers.is_empty());
            seen += 1;
        }
    }
    assert!(seen >= 1, "no conf files found in {}", dir.display());
}

#[test]
fn shipped_conf_has_the_seed_prices_and_starts_on_the_demo() {
    let conf = parse_conf(&shipped_conf_text(), &[]).expect("parses");
    let prices: Vec<_> = conf
        .tiers
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.prices.input.nanos_per_token(),
                t.prices.output.nanos_per_token(),
            )
        })
        .collect();
    assert_eq!(
        prices,
        [
            ("budget", Some(120), Some(480)),
            ("standard", Some(360), Some(3000)),
            ("premium", Some(3600), Some(18000)),
            ("embeddings", Some(40), Some(0)),
        ]
    );
    assert_eq!(conf.store.backend, Backend::Sqlite);
    assert!(conf.redis.is_none());
    assert!(conf.stripe.is_none(), "Stripe is off as shipped");
    assert!(conf.mail.smtp.is_none(), "SMTP is off as shipped");
    for tier in &conf.tiers {
        let on: Vec<_> = tier
            .enabled_upstreams()
            .map(|u| u.provider_name.as_str())
            .collect();
        assert_eq!(on, ["demo"], "tier {} with no keys set", tier.name);
        assert!(tier.default_max_output_tokens.get() > 0);
    }
    assert!(conf.warnings.iter().any(|w| w.contains("LOCAL DEMO")));
}

#[test]
fn setting_a_provider_key_turns_it_on_and_the_demo_steps_aside() {
    let conf = parse_conf(
        &shipped_conf_text(),
        &[("ANTHROPIC_API_KEY", "sk-ant-test")],
    )
    .expect("parses");
    let premium = conf.tier("premium").expect("premium");
    let on: Vec<_> = premium
        .enabled_upstreams()
        .map(|u| u.model.as_str())
        .collect();
    assert_eq!(on, ["claude-sonnet-4-5"]);
    let anthropic = conf
        .providers
        .iter()
        .find(|p| p.name == "anthropic")
        .expect("anthropic");
    assert!(anthropic.enabled);
    assert_eq!(
        anthropic.api_key.as_ref().map(|k| k.expose().as_str()),
        Some("sk-ant-test")
    );
    // The key never shows in Debug output.
    assert!(!format!("{conf:?}").contains("sk-ant-test"));
    // Other tiers still run on the demo.
    let budget = conf.tier("budget").expect("budget");
    assert_eq!(
        budget
            .enabled_upstreams()
            .map(|u| u.provider_name.as_str())
            .collect::<Vec<_>>(),
        ["demo"]
    );
}

#[test]
fn tier_pointing_at_a_missing_provider_names_file_path_value_and_choices() {
    let text = shipped_with(
        r#"{ provider = "openai", model = "gpt-4.1", weight = 1 },"#,
        r#"{ provider = "antropic", model = "gpt-4.1", weight = 1 },"#,
    );
    assert_eq!(
        err(&text, &[]),
        r#"test.toml: tiers.premium.upstreams[1].provider: no provider named "antropic" (known: openai, gemini, anthropic, demo)"#
    );
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let text = shipped_with("threads = 1", "threads = 1\nthreadz = 2");
    let e = err(&text, &[]);
    assert!(
        e.starts_with("test.toml: gateway.threadz: unknown field `threadz`"),
        "{e}"
    );
    assert!(e.contains("line"), "{e}");

    let text = shipped_with(
        r#"default_max_output_tokens = 4096"#,
        "default_max_output_tokens = 4096\nmax_tokens = 1",
    );
    let e = err(&text, &[]);
    assert!(
        e.starts_with("test.toml: tiers.budget.max_tokens: unknown field `max_tokens`"),
        "{e}"
    );

    let e = err(&format!("{}\n[extra]\nx = 1\n", shipped_conf_text()), &[]);
    assert!(e.contains("unknown field `extra`"), "{e}");
}

#[test]
fn wrong_types_are_refused() {
    let e = err(&shipped_with("threads = 1", "threads = \"one\""), &[]);
    assert!(
        e.starts_with("test.toml: gateway.threads: invalid type: string \"one\""),
        "{e}"
    );
    let e = err(&shipped_with("port = 587", "port = true"), &[]);
    assert!(
        e.starts_with("test.toml: smtp.port: invalid type: boolean"),
        "{e}"
    );
}

#[test]
fn money_must_be_a_positive_exact_decimal() {
    let e = err(
        &shipped_with(
            r#"input_usd_per_mtok = "0.12""#,
            r#"input_usd_per_mtok = 0.12"#,
        ),
        &[],
    );
    assert!(
        e.starts_with("test.toml: tiers.budget.input_usd_per_mtok: 0.12 is a float"),
        "{e}"
    );
    let e = err(
        &shipped_with(
            r#"input_usd_per_mtok = "0.12""#,
            r#"input_usd_per_mtok = "-0.12""#,
        ),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: tiers.budget.input_usd_per_mtok: "-0.12" is negative; a price must be positive"#
    );
    let e = err(
        &shipped_with(
            r#"output_usd_per_mtok = "0.48""#,
            r#"output_usd_per_mtok = "0""#,
        ),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: tiers.budget.output_usd_per_mtok: "0" is zero; a tier's price must be positive"#
    );
    let e = err(
        &shipped_with(
            r#"output_usd_per_mtok = "0.48""#,
            r#"output_usd_per_mtok = "0.48 USD""#,
        ),
        &[],
    );
    assert!(
        e.starts_with("test.toml: tiers.budget.output_usd_per_mtok: \"0.48 USD\" is not a decimal"),
        "{e}"
    );
    let e = err(
        &shipped_with(
            r#"output_usd_per_mtok = "0.48""#,
            r#"output_usd_per_mtok = "0.0000000001""#,
        ),
        &[],
    );
    assert!(e.contains("more than 9 decimal places"), "{e}");
    // A whole number is exact, so it is accepted.
    let conf = parse_conf(
        &shipped_with(
            r#"output_usd_per_mtok = "18.00""#,
            "output_usd_per_mtok = 18",
        ),
        &[],
    )
    .expect("integer price");
    assert_eq!(
        conf.tier("premium")
            .expect("premium")
            .prices
            .output
            .nanos_per_token(),
        Some(18_000)
    );
    // A provider's model may be free (self-hosted), but never negative.
    let e = err(
        &shipped_with(
            r#"input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }"#,
            r#"input_usd_per_mtok = "-1", output_usd_per_mtok = "0.40" }"#,
        ),
        &[],
    );
    assert!(e.starts_with(r#"test.toml: providers.openai.models.gpt-4.1-nano.input_usd_per_mtok: "-1" is negative"#), "{e}");
}

#[test]
fn duplicate_names_are_refused() {
    // TOML itself refuses a table defined twice.
    let e = err(
        &format!(
            "{}\n[tiers.budget]\ninput_usd_per_mtok = \"1\"\noutput_usd_per_mtok = \"1\"\n",
            shipped_conf_text()
        ),
        &[],
    );
    assert!(e.contains("duplicate") || e.contains("redefin"), "{e}");
    let e = err(
        &shipped_with(
            r#"  { provider = "demo", model = "demo-budget" },"#,
            "  { provider = \"demo\", model = \"demo-budget\" },\n  { provider = \"demo\", model = \"demo-budget\" },",
        ),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: tiers.budget.upstreams[3]: duplicate upstream demo/demo-budget in the tier"
    );
    let e = err(
        &shipped_with(
            "packages_cents = [500, 2000, 10000]",
            "packages_cents = [500, 2000, 500]",
        ),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: stripe.packages_cents[2]: duplicate package 500"
    );
}

#[test]
fn enabled_sections_need_their_secrets() {
    let stripe_on = shipped_with("[stripe]\nenabled = false", "[stripe]\nenabled = true");
    let e = err(&stripe_on, &[]);
    assert_eq!(
        e,
        "test.toml: stripe.secret_key_env: stripe is enabled but environment variable STRIPE_SECRET_KEY is not set\n\
         test.toml: stripe.webhook_secret_env: stripe is enabled but environment variable STRIPE_WEBHOOK_SECRET is not set"
    );
    let conf = parse_conf(
        &stripe_on,
        &[
            ("STRIPE_SECRET_KEY", "sk_test_x"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ],
    )
    .expect("with secrets");
    let stripe = conf.stripe.expect("stripe on");
    assert_eq!(stripe.packages_cents, [500, 2000, 10000]);
    assert!(!format!("{stripe:?}").contains("sk_test_x"));

    let smtp_on = shipped_with("[smtp]\nenabled = false", "[smtp]\nenabled = true");
    let e = err(&smtp_on, &[("SMTP_USERNAME", "relay")]);
    assert_eq!(
        e,
        "test.toml: smtp.password_env: smtp is enabled but environment variable SMTP_PASSWORD is not set"
    );
    let conf = parse_conf(
        &smtp_on,
        &[("SMTP_USERNAME", "relay"), ("SMTP_PASSWORD", "pw")],
    )
    .expect("with secrets");
    assert_eq!(conf.mail.smtp.expect("smtp").port, 587);

    let forced = shipped_with(
        "api_key_env = \"OPENAI_API_KEY\"",
        "api_key_env = \"OPENAI_API_KEY\"\nenabled = true",
    );
    let e = err(&forced, &[]);
    assert_eq!(
        e,
        "test.toml: providers.openai.enabled: the provider is enabled but environment variable OPENAI_API_KEY (api_key_env) is not set"
    );
}

#[test]
fn providers_and_tiers_are_checked() {
    let e = err(
        &shipped_with("kind = \"anthropic\"", "kind = \"antrhopic\""),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: providers.anthropic.kind: unknown provider kind "antrhopic" (known: openai, anthropic, gemini)"#
    );
    let e = err(
        &shipped_with(
            "base_url = \"https://api.openai.com/v1\"",
            "base_url = \"api.openai.com\"",
        ),
        &[],
    );
    assert!(
        e.starts_with(r#"test.toml: providers.openai.base_url: "api.openai.com" is not a URL"#),
        "{e}"
    );
    let e = err(
        &shipped_with(
            "base_url = \"https://api.openai.com/v1\"",
            "base_url = \"ftp://api.openai.com\"",
        ),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: providers.openai.base_url: "ftp://api.openai.com" is not an http:// or https:// URL"#
    );
    let e = err(
        &shipped_with("connect_timeout_ms = 3000", "connect_timeout_ms = 0"),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: providers.openai.connect_timeout_ms: 0 is out of range: expected 1 to 3600000 ms"
    );
    let e = err(
        &shipped_with(
            r#"{ provider = "gemini", model = "gemini-2.5-flash", weight = 1 },"#,
            r#"{ provider = "gemini", model = "gemini-9", weight = 1 },"#,
        ),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: tiers.standard.upstreams[0].model: provider "gemini" has no model "gemini-9" in its models table (known: gemini-2.5-flash-lite, gemini-2.5-flash, gemini-embedding-001)"#
    );

    let no_upstreams = "[tiers.budget]\ninput_usd_per_mtok = \"1\"\noutput_usd_per_mtok = \"1\"\n\
        [providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodels.m = { input_usd_per_mtok = \"1\", output_usd_per_mtok = \"1\" }\n";
    assert!(
        err(no_upstreams, &[])
            .starts_with("test.toml: tiers.budget.upstreams: the tier has no upstreams")
    );
    let zero_weights = no_upstreams.replace("output_usd_per_mtok = \"1\"\n[providers", "output_usd_per_mtok = \"1\"\nupstreams = [{ provider = \"p\", model = \"m\", weight = 0 }]\n[providers");
    assert_eq!(
        err(&zero_weights, &[]),
        "test.toml: tiers.budget.upstreams: the weights sum to zero: at least one upstream needs a positive weight"
    );
    let ok = zero_weights.replace("weight = 0", "weight = 3");
    let conf = parse_conf(&ok, &[]).expect("minimal conf with defaults");
    assert_eq!(conf.tiers[0].upstreams[0].weight, 3);
    assert_eq!(conf.gateway.listen.to_string(), "127.0.0.1:8080");
    assert!(err("", &[]).contains("no providers"));
}

#[test]
fn limits_and_addresses_are_checked() {
    let e = err(
        &shipped_with("requests_per_minute = 600", "requests_per_minute = 0"),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: limits.default_key.requests_per_minute: 0 is out of range: expected 1 to 10000000 requests per minute"
    );
    let e = err(&shipped_with("in_flight = 32", "in_flight = -4"), &[]);
    assert_eq!(
        e,
        "test.toml: limits.default_key.in_flight: -4 is out of range: expected 1 to 100000 requests in flight"
    );
    let e = err(
        &shipped_with("listen = \"127.0.0.1:8080\"", "listen = \"localhost\""),
        &[],
    );
    assert!(
        e.starts_with(r#"test.toml: gateway.listen: "localhost" is not a socket address"#),
        "{e}"
    );
    let e = err(
        &shipped_with(
            "max_request_body_bytes = 10485760",
            "max_request_body_bytes = 0",
        ),
        &[],
    );
    assert!(
        e.starts_with("test.toml: gateway.max_request_body_bytes: 0 is out of range"),
        "{e}"
    );
    // A provider key pasted with its line break would end each request's head early.
    let e = err(&shipped_conf_text(), &[("OPENAI_API_KEY", "sk-test\n")]);
    assert!(
        e.contains("providers.openai.api_key_env: environment variable OPENAI_API_KEY holds a control character"),
        "{e}"
    );
    // The HTTP layer's bounds, each named with its range and unit.
    for (line, bad, expected) in [
        (
            "header_read_timeout_ms = 10000",
            "header_read_timeout_ms = 0",
            "test.toml: gateway.header_read_timeout_ms: 0 is out of range: expected 1 to 600000 ms (ten minutes)",
        ),
        (
            "body_read_timeout_ms = 60000",
            "body_read_timeout_ms = -1",
            "test.toml: gateway.body_read_timeout_ms: -1 is out of range: expected 1 to 3600000 ms (an hour)",
        ),
        (
            "max_header_bytes = 65536",
            "max_header_bytes = 100",
            "test.toml: gateway.max_header_bytes: 100 is out of range: expected 1024 to 1048576 bytes (Pingora reads no head larger than 1 MiB)",
        ),
        (
            "max_client_connections = 10000",
            "max_client_connections = 0",
            "test.toml: gateway.max_client_connections: 0 is out of range: expected 1 to 1000000 connections",
        ),
    ] {
        let e = err(&shipped_with(line, bad), &[]);
        assert_eq!(e, expected);
    }
    let e = err(
        &shipped_with(
            "min_custom_amount_cents = 500",
            "min_custom_amount_cents = 200000",
        ),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: stripe.min_custom_amount_cents: 200000 is above stripe.max_custom_amount_cents (100000)"
    );
    let e = err(
        &shipped_with(
            "min_custom_amount_cents = 500",
            "min_custom_amount_cents = 10",
        ),
        &[],
    );
    assert_eq!(
        e,
        "test.toml: stripe.min_custom_amount_cents: 10 is out of range: expected 50 to 99999999 cents (Stripe's limits)"
    );
}

#[test]
fn several_problems_are_reported_together() {
    let text = shipped_with("requests_per_minute = 600", "requests_per_minute = 0").replacen(
        "kind = \"anthropic\"",
        "kind = \"nope\"",
        1,
    );
    let e = err(&text, &[]);
    assert_eq!(e.lines().count(), 2, "{e}");
}

#[test]
fn store_and_redis_urls_are_checked_and_secrets_stay_in_the_environment() {
    let e = err(
        &shipped_with("url = \"sqlite://data/duang.db\"", "url = \"mysql://x/y\""),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: store.url: "mysql://x/y" is not a store URL: expected sqlite://PATH or postgres://USER@HOST/DB"#
    );
    let e = err(
        &shipped_with(
            "url = \"sqlite://data/duang.db\"",
            "url = \"postgres://app:hunter2@db/relay\"",
        ),
        &[],
    );
    assert!(
        e.starts_with("test.toml: store.url: the URL carries a password"),
        "{e}"
    );
    assert!(!e.contains("hunter2"));
    // From the environment, a password is fine and wins over `url`.
    let env_text = shipped_with("# url_env = \"DATABASE_URL\"", "url_env = \"DATABASE_URL\"");
    let conf = parse_conf(
        &env_text,
        &[("DATABASE_URL", "postgres://app:hunter2@db/relay")],
    )
    .expect("env url");
    assert_eq!(conf.store.backend, Backend::Postgres);
    assert!(!format!("{:?}", conf.store).contains("hunter2"));
    // Unset variable: falls back to `url`.
    assert_eq!(
        parse_conf(&env_text, &[]).expect("fallback").store.backend,
        Backend::Sqlite
    );

    let e = err(
        &shipped_with(
            "# url = \"redis://127.0.0.1:6379\"",
            "url = \"http://127.0.0.1:6379\"",
        ),
        &[],
    );
    assert_eq!(
        e,
        r#"test.toml: redis.url: "http://127.0.0.1:6379" is not a Redis URL: expected redis://HOST:PORT[/DB] or rediss://..."#
    );
    let conf = parse_conf(
        &shipped_with(
            "# url = \"redis://127.0.0.1:6379\"",
            "url = \"redis://127.0.0.1:6379\"",
        ),
        &[],
    )
    .expect("redis");
    assert!(conf.redis.is_some());
}

#[test]
fn a_providers_ca_file_is_read_and_checked_at_load() {
    let ca = format!("{}/tests/fixtures/tls/ca.pem", env!("CARGO_MANIFEST_DIR"));
    let openai = r#"base_url = "https://api.openai.com/v1""#;
    let conf = parse_conf(
        &shipped_with(openai, &format!("{openai}\nca_file = {ca:?}")),
        &[],
    )
    .expect("a PEM CA file is accepted");
    let p = conf
        .providers
        .iter()
        .find(|p| p.name == "openai")
        .expect("openai");
    assert_eq!(p.ca_certs.len(), 1);

    let e = err(
        &shipped_with(openai, &format!("{openai}\nca_file = \"/no/such/ca.pem\"")),
        &[],
    );
    assert!(
        e.starts_with("test.toml: providers.openai.ca_file: cannot read /no/such/ca.pem:"),
        "{e}"
    );

    let not_pem = format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"));
    let e = err(
        &shipped_with(openai, &format!("{openai}\nca_file = {not_pem:?}")),
        &[],
    );
    assert!(e.contains("no PEM certificate in the file"), "{e}");

    let demo = r#"base_url = "http://127.0.0.1:8081/demo/v1""#;
    let e = err(
        &shipped_with(demo, &format!("{demo}\nca_file = {ca:?}")),
        &[],
    );
    assert!(
        e.starts_with("test.toml: providers.demo.ca_file:") && e.contains("not https://"),
        "{e}"
    );
}

#[test]
fn the_admin_signing_secret_comes_from_the_environment_and_is_long_enough() {
    let support = r#"support_email = "support@duang-duang.com""#;
    let with_env = shipped_with(
        support,
        &format!("{support}\nsecret_env = \"DUANG_ADMIN_SECRET\""),
    );
    let e = err(&with_env, &[]);
    assert!(
        e.starts_with(
            "test.toml: admin.secret_env: environment variable DUANG_ADMIN_SECRET is not set"
        ),
        "{e}"
    );
    let e = err(&with_env, &[("DUANG_ADMIN_SECRET", "short")]);
    assert!(
        e.contains("is too short: use at least 32 random characters"),
        "{e}"
    );
    let long = "0123456789abcdef0123456789abcdef";
    let conf = parse_conf(&with_env, &[("DUANG_ADMIN_SECRET", long)]).expect("parses");
    assert_eq!(
        conf.admin.signing_secret.map(|s| s.expose().clone()),
        Some(long.to_owned())
    );
    assert!(
        parse_conf(&shipped_conf_text(), &[])
            .expect("parses")
            .admin
            .signing_secret
            .is_none()
    );

    let e = err(
        &shipped_with("session_ttl_hours = 168", "session_ttl_hours = 0"),
        &[],
    );
    assert!(
        e.starts_with("test.toml: admin.session_ttl_hours: 0 is out of range"),
        "{e}"
    );
    let e = err(&shipped_with("expiry_days = 365", "expiry_days = -1"), &[]);
    assert!(
        e.starts_with("test.toml: limits.key_max.expiry_days: -1 is out of range"),
        "{e}"
    );
}

#[test]
fn rate_limit_and_redis_settings_are_checked() {
    let e = err(&shipped_with("in_flight = 64", "in_flight = 0"), &[]);
    assert!(
        e.starts_with("test.toml: limits.default_account.in_flight: 0 is out of range"),
        "{e}"
    );
    let e = err(
        &shipped_with("requests_per_minute = 1200", "requests_per_minute = -5"),
        &[],
    );
    assert!(
        e.starts_with("test.toml: limits.default_account.requests_per_minute: -5 is out of range"),
        "{e}"
    );
    let with = |extra: &str| {
        shipped_with(
            "# url = \"redis://127.0.0.1:6379\"",
            &format!("url = \"redis://127.0.0.1:6379\"\n{extra}"),
        )
    };
    let e = err(&with("on_outage = \"ignore\""), &[]);
    assert!(
        e.starts_with("test.toml: redis.on_outage: \"ignore\" is not a policy"),
        "{e}"
    );
    let e = err(&with("key_prefix = \"{x}\""), &[]);
    assert!(e.starts_with("test.toml: redis.key_prefix:"), "{e}");
    let e = err(&with("timeout_ms = 0"), &[]);
    assert!(e.starts_with("test.toml: redis.timeout_ms:"), "{e}");
    let conf = parse_conf(
        &with("on_outage = \"refuse\"\nkey_prefix = \"relay:eu\""),
        &[],
    )
    .expect("parses");
    let r = conf.redis.expect("redis");
    assert_eq!(r.on_outage, duang::conf::OutagePolicy::Refuse);
    assert_eq!(r.key_prefix, "relay:eu");
    let e = err(
        &shipped_with(
            "# url = \"redis://127.0.0.1:6379\"",
            "url = \"redis://[::1\"",
        ),
        &[],
    );
    assert!(e.contains("is not a Redis URL"), "{e}");
}

#[test]
fn the_wire_format_keys_are_checked() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "reuse_port = false",
            "reuse_port = false\n[gateway.cors]\nallowed_origins = [\"https://app.example.com/\"]",
            "test.toml: gateway.cors.allowed_origins: \"https://app.example.com/\" is not an origin: write scheme://host[:port], such as \"https://app.example.com\", without a path or trailing slash (or \"*\" for any)",
        ),
        (
            "default_max_output_tokens = 4096",
            "default_max_output_tokens = 4096\nresponse_model = \"provider\"",
            "test.toml: tiers.budget.response_model: \"provider\": expected \"tier\" (answers show the tier's name) or \"upstream\" (they show the upstream's model)",
        ),
        (
            "kind = \"embeddings\"",
            "kind = \"vectors\"",
            "test.toml: tiers.embeddings.kind: \"vectors\": expected \"chat\" (the default) or \"embeddings\"",
        ),
        (
            "input_usd_per_mtok = \"0.04\"",
            "input_usd_per_mtok = \"0.04\"\noutput_usd_per_mtok = \"0.01\"",
            "test.toml: tiers.embeddings.output_usd_per_mtok: an embeddings tier has no output tokens: leave output_usd_per_mtok out (it is priced per input token)",
        ),
        (
            "{ provider = \"gemini\", model = \"gemini-embedding-001\", weight = 0 },",
            "{ provider = \"anthropic\", model = \"claude-sonnet-4-5\", weight = 0 },",
            "test.toml: tiers.embeddings.upstreams[1].provider: provider \"anthropic\" is of kind anthropic, which serves no embeddings: use an openai or gemini provider",
        ),
        (
            "output_usd_per_mtok = \"0.48\"",
            "output_usd_per_mtok = \"0.48\"\ncached_input_usd_per_mtok = \"0.20\"",
            "test.toml: tiers.budget.cached_input_usd_per_mtok: the cached-input price must not be above the input price",
        ),
    ];
    for (find, replace, want) in cases {
        assert_eq!(err(&shipped_with(find, replace), &[]), want, "{replace}");
    }
}

#[test]
fn the_brand_and_its_policy_files_are_checked() {
    let brand = |extra: &str| {
        shipped_with(
            "product_name = \"Duang Duang\"",
            &format!("product_name = \"Duang Duang\"\n{extra}"),
        )
    };
    let e = err(
        &brand("[brand.policies.cookies]\nfile = \"x.md\"\nupdated = \"2026-01-01\""),
        &[],
    );
    assert!(
        e.contains("brand.policies.cookies: no policy named \"cookies\" (the policies are terms, privacy, refunds, acceptable-use)"),
        "{e}"
    );
    let e = err(
        &brand(
            "[brand.policies.terms]\nfile = \"/nonexistent/terms.md\"\nupdated = \"2026-01-01\"",
        ),
        &[],
    );
    assert!(
        e.contains("brand.policies.terms.file: cannot read /nonexistent/terms.md"),
        "{e}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let untitled = dir.path().join("terms.md");
    std::fs::write(&untitled, "Terms without a title line\n").expect("write");
    let e = err(
        &brand(&format!(
            "[brand.policies.terms]\nfile = {:?}\nupdated = \"1 Dec 2026\"",
            untitled.display().to_string()
        )),
        &[],
    );
    assert!(
        e.contains("brand.policies.terms.updated: \"1 Dec 2026\" is not a date: use YYYY-MM-DD"),
        "{e}"
    );
    assert!(e.contains("the first line must be the title"), "{e}");
    let e = err(
        &shipped_with("product_name = \"Duang Duang\"", "product_name = \"  \""),
        &[],
    );
    assert!(
        e.contains("brand.product_name: give a name of 1 to 80 characters"),
        "{e}"
    );
}

/// A reload takes prices, upstreams and limits; listeners, the store, threads and Redis need a
/// restart, and the refusal names each one changed.
#[test]
fn a_reload_names_the_settings_only_a_restart_applies() {
    let running = parse_conf(&shipped_conf_text(), &[]).expect("shipped");
    let reloadable = shipped_with(
        "input_usd_per_mtok = \"0.12\"",
        "input_usd_per_mtok = \"0.13\"",
    )
    .replace("requests_per_minute = 600", "requests_per_minute = 601")
    .replace(
        "max_request_body_bytes = 10485760",
        "max_request_body_bytes = 1048576",
    );
    let new = parse_conf(&reloadable, &[]).expect("edited");
    assert_eq!(new.tiers[0].prices.input.usd_per_mtok_string(), "0.13");
    assert!(running.restart_only_changes(&new).is_empty());
    assert_eq!(running.reload_refusal(&new), None);

    let restart = shipped_conf_text()
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:8090\"")
        .replace("threads = 1", "threads = 4")
        .replace(
            "url = \"sqlite://data/duang.db\"",
            "url = \"sqlite://other.db\"",
        )
        .replace(
            "# url = \"redis://127.0.0.1:6379\"",
            "url = \"redis://127.0.0.1:6379\"",
        );
    let new = parse_conf(&restart, &[]).expect("edited");
    assert_eq!(
        running.restart_only_changes(&new),
        // The default node_id is the hostname and the listen port.
        [
            "gateway.listen",
            "gateway.threads",
            "gateway.node_id",
            "store.url",
            "redis"
        ]
    );
    let refusal = running.reload_refusal(&new).expect("refused");
    assert!(
        refusal.contains("gateway.listen, gateway.threads, gateway.node_id, store.url, redis take effect only when the process restarts"),
        "{refusal}"
    );
}

/// A provider's prepaid-credit settings: a positive dollar amount, and a switch.
#[test]
fn prepaid_credit_settings_are_checked() {
    let conf = parse_conf(
        &shipped_with(
            "# prepaid_alert_below_usd = \"50\"\n# leave_routing_when_prepaid_spent = true",
            "prepaid_alert_below_usd = \"50\"\nleave_routing_when_prepaid_spent = true",
        ),
        &[],
    )
    .expect("valid");
    let openai = conf
        .providers
        .iter()
        .find(|p| p.name == "openai")
        .expect("openai");
    assert_eq!(openai.prepaid_alert_below, Some("50".parse().expect("usd")));
    assert!(openai.leave_routing_when_prepaid_spent);
    let e = err(
        &shipped_with(
            "# prepaid_alert_below_usd = \"50\"",
            "prepaid_alert_below_usd = \"-5\"",
        ),
        &[],
    );
    assert!(
        e.contains("providers.openai.prepaid_alert_below_usd: \"-5\" is not a positive amount of US dollars"),
        "{e}"
    );
}

#[test]
fn usage_retention_is_days_or_forever() {
    let conf = parse_conf(&shipped_conf_text(), &[]).expect("shipped conf");
    assert_eq!(
        conf.usage.retention,
        Some(std::time::Duration::from_secs(90 * 86_400))
    );
    let forever = parse_conf(
        &shipped_with("retention_days = 90", "retention_days = 0"),
        &[],
    )
    .expect("0 keeps forever");
    assert_eq!(forever.usage.retention, None);
    for bad in ["-1", "3651"] {
        let e = err(
            &shipped_with("retention_days = 90", &format!("retention_days = {bad}")),
            &[],
        );
        assert_eq!(
            e,
            format!(
                "test.toml: usage.retention_days: {bad} is out of range: expected 0 (keep raw usage records forever) or 1 to 3650 days (ten years)"
            )
        );
    }
}
