//! The operator CLI, run as the real `duang-admin` binary against a real store (a SQLite file and
//! a PostgreSQL database), and the binaries' answers to a bad conf or an unreachable database.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::AccountRef;
use sqlx::Row;
use std::path::Path;
use std::process::{Command, Stdio};
use support::{ADMIN_BIN, GATEWAY_BIN, Run, TestStore, run, write_conf};

fn admin(conf: &Path, args: &[&str]) -> Run {
    run(ADMIN_BIN, conf, args, None)
}

/// Runs and insists on success, returning stdout.
fn ok(conf: &Path, args: &[&str]) -> String {
    let r = admin(conf, args);
    assert_eq!(
        r.code, 0,
        "duang-admin {args:?} failed:\n{}{}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Runs and insists on a failure whose message contains `expected`.
fn fails(conf: &Path, args: &[&str], expected: &str) {
    let r = admin(conf, args);
    assert_ne!(r.code, 0, "duang-admin {args:?} should fail:\n{}", r.stdout);
    assert!(
        r.stderr.contains(expected),
        "duang-admin {args:?}: expected {expected:?} in:\n{}",
        r.stderr
    );
}

async fn ledger_rows(t: &TestStore) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM ledger")
        .fetch_one(t.store.pool())
        .await
        .expect("count")
        .get(0)
}

async fn operator_flow(backend: Backend) {
    let t = TestStore::new(backend).await;
    let dir = tempfile::tempdir().expect("dir");
    let conf = write_conf(dir.path(), &t.url).path;

    // Accounts.
    assert!(
        ok(&conf, &["account", "create", "--email", "Ann@Example.com"])
            .contains("created account 1 ann@example.com (customer, e-mail not verified)")
    );
    fails(
        &conf,
        &["account", "create", "--email", "ann@example.com"],
        "an account with e-mail ann@example.com already exists",
    );
    fails(
        &conf,
        &["account", "create", "--email", "ann-at-example.com"],
        "\"ann-at-example.com\" is not a valid e-mail address",
    );
    assert!(ok(&conf, &["account", "verify", "ann@example.com"]).contains("is verified"));
    // A lost phone: the operator turns the account's 2FA off, with a reason.
    t.store
        .begin_two_factor(1, "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
        .await
        .expect("begin");
    assert!(
        t.store
            .enable_two_factor(1, 1, &[], "test")
            .await
            .expect("on")
    );
    fails(
        &conf,
        &["account", "reset-2fa", "ann@example.com", "--reason", " "],
        "--reason must say why",
    );
    assert!(
        ok(
            &conf,
            &[
                "account",
                "reset-2fa",
                "ann@example.com",
                "--reason",
                "lost phone, ID checked"
            ]
        )
        .contains("two-factor authentication is off")
    );
    assert!(t.store.two_factor(1).await.expect("2fa").is_none());
    fails(
        &conf,
        &[
            "account",
            "reset-2fa",
            "ann@example.com",
            "--reason",
            "again",
        ],
        "has no two-factor authentication",
    );
    fails(
        &conf,
        &["account", "verify", "nobody@example.com"],
        "no account nobody@example.com",
    );

    // Credits: a grant, a negative grant that needs a reason, an idempotent reference.
    assert!(ok(&conf, &["credits", "grant", "1", "--usd", "10"]).contains("granted $10.00"));
    fails(
        &conf,
        &["credits", "grant", "1", "--usd", "-2"],
        "a negative grant takes credits away: say why with --reason",
    );
    fails(
        &conf,
        &["credits", "grant", "1", "--usd", "ten"],
        "is not a decimal amount",
    );
    assert!(
        ok(
            &conf,
            &[
                "credits",
                "adjust",
                "1",
                "--usd",
                "-2.5",
                "--reason",
                "duplicate charge",
                "--ref",
                "ticket-7"
            ]
        )
        .contains("balance now $7.50")
    );
    fails(
        &conf,
        &[
            "credits",
            "adjust",
            "1",
            "--usd",
            "-2.5",
            "--reason",
            "duplicate charge",
            "--ref",
            "ticket-7",
        ],
        "already applied",
    );
    fails(
        &conf,
        &[
            "credits", "grant", "1", "--usd", "-100", "--reason", "too much",
        ],
        "insufficient balance: this needs $100.00 but the account has $7.50",
    );
    assert_eq!(ledger_rows(&t).await, 2, "failed grants write nothing");

    // Keys: printed once on stdout, stored as a hash.
    let created = admin(
        &conf,
        &[
            "key",
            "create",
            "ann@example.com",
            "--name",
            "laptop",
            "--models",
            "budget,premium",
        ],
    );
    assert_eq!(created.code, 0, "{}", created.stderr);
    let key = created.stdout.trim().to_owned();
    assert!(
        duang::keys::looks_like_key(&key),
        "stdout is just the key: {key:?}"
    );
    assert!(created.stderr.contains("only time the key is shown"));
    let stored = t
        .store
        .key_by_hash(&duang::keys::hash(&key))
        .await
        .expect("lookup")
        .expect("stored by hash");
    assert_eq!(
        stored.allowed_models.as_deref(),
        Some(&["budget".to_string(), "premium".to_string()][..])
    );
    fails(
        &conf,
        &["key", "create", "1", "--models", "platinum"],
        "--models: no tier named \"platinum\" (known: budget, standard, premium, embeddings)",
    );
    let listed = ok(&conf, &["key", "list", "1"]);
    assert!(
        listed.contains(&stored.display_prefix)
            && listed.contains("laptop")
            && listed.contains("active")
    );
    assert!(!listed.contains(&key), "the list never shows a whole key");
    assert!(
        ok(
            &conf,
            &[
                "key",
                "revoke",
                &stored.id.to_string(),
                "--reason",
                "leaked"
            ]
        )
        .contains("is revoked")
    );
    fails(
        &conf,
        &["key", "revoke", &stored.id.to_string()],
        &format!("key {} is already revoked", stored.id),
    );
    fails(&conf, &["key", "revoke", "999"], "no key 999");

    // Suspension, with the reason in the audit log.
    assert!(
        ok(
            &conf,
            &["account", "suspend", "1", "--reason", "AUP: phishing"]
        )
        .contains("is suspended")
    );
    assert!(ok(&conf, &["account", "show", "1"]).contains("suspended"));
    assert!(ok(&conf, &["account", "reactivate", "1"]).contains("is active"));
    let audit = t.store.audit_log(1).await.expect("audit");
    assert!(audit.iter().any(|e| e.action == "account.suspended"
        && e.reason.as_deref() == Some("AUP: phishing")
        && e.actor == "cli:tester"));

    // Balance with its proof, and reconciliation.
    let balance = ok(&conf, &["balance", "ann@example.com"]);
    assert!(balance.contains("balance     $7.50"), "{balance}");
    assert!(
        balance.contains("ledger sum  $7.50 over 2 entries"),
        "{balance}"
    );
    assert!(balance.contains("proof       ok"), "{balance}");
    assert!(ok(&conf, &["reconcile"]).contains("ok"));
    let account = t.store.account(&AccountRef::Id(1)).await.expect("account");
    assert_eq!(account.balance, "7.5".parse::<NanoUsd>().expect("amount"));
    assert!(ok(&conf, &["account", "list"]).contains("ann@example.com"));

    // Exports for accounting, as CSV on standard output (a day either side of today, so the
    // test does not depend on the hour it runs at).
    let now = duang::time::now_ms();
    let from = duang::time::format_date(now - 86_400_000);
    let to = duang::time::format_date(now + 86_400_000);
    let ledger = ok(
        &conf,
        &[
            "export",
            "ledger",
            "--from",
            &from,
            "--to",
            &to,
            "--account",
            "ann@example.com",
        ],
    );
    let lines: Vec<&str> = ledger.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two entries:\n{ledger}");
    assert!(lines[0].starts_with("created_at_utc,entry_id,account_id,email,kind,amount_usd"));
    assert!(
        lines[1].contains(",1,ann@example.com,adjustment,10.00,"),
        "{ledger}"
    );
    let audit = ok(
        &conf,
        &[
            "export",
            "audit",
            "--from",
            &from,
            "--to",
            &to,
            "--action",
            "account.susp",
        ],
    );
    assert_eq!(audit.lines().count(), 2, "{audit}");
    assert!(
        audit.contains(",cli:tester,account.suspended,1,ann@example.com,,AUP: phishing\n"),
        "{audit}"
    );
    assert_eq!(
        ok(&conf, &["export", "usage", "--from", &from, "--to", &to])
            .lines()
            .count(),
        1,
        "no usage: the header alone"
    );
    fails(
        &conf,
        &["export", "usage", "--from", "2026-13-01", "--to", &to],
        "--from \"2026-13-01\" is not a date: use YYYY-MM-DD",
    );
    fails(
        &conf,
        &["export", "ledger", "--from", &to, "--to", &from],
        "is after --to",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_flow_on_sqlite() {
    operator_flow(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_flow_on_postgres() {
    operator_flow(Backend::Postgres).await;
}

#[test]
fn password_from_stdin_is_checked_and_hashed() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("duang.db").display());
    let conf = write_conf(dir.path(), &url).path;
    let weak = run(
        ADMIN_BIN,
        &conf,
        &[
            "account",
            "create",
            "--email",
            "op@example.com",
            "--operator",
            "--password-stdin",
        ],
        Some("short\n"),
    );
    assert_ne!(weak.code, 0);
    assert!(weak.stderr.contains("too short"), "{}", weak.stderr);
    let good = run(
        ADMIN_BIN,
        &conf,
        &[
            "account",
            "create",
            "--email",
            "op@example.com",
            "--operator",
            "--verified",
            "--password-stdin",
        ],
        Some("a long pass phrase 42\n"),
    );
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert!(
        good.stdout.contains("(operator, verified)"),
        "{}",
        good.stdout
    );
}

#[test]
fn bad_arguments_open_nothing() {
    // The store file must not even be created when the arguments are wrong.
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("never/duang.db");
    let conf = write_conf(dir.path(), &format!("sqlite://{}", db.display())).path;
    fails(
        &conf,
        &["account", "create", "--email", "nope"],
        "not a valid e-mail address",
    );
    fails(
        &conf,
        &["credits", "grant", "x@example.com", "--usd", "-1"],
        "--reason",
    );
    fails(
        &conf,
        &["credits", "grant", "x@example.com", "--usd", "0"],
        "a grant must change the balance",
    );
    fails(
        &conf,
        &["key", "create", "not an account"],
        "neither an account id nor an e-mail address",
    );
    fails(
        &conf,
        &["key", "create", "1", "--requests-per-minute", "0"],
        "--requests-per-minute must be positive",
    );
    assert!(!db.exists(), "nothing may be written for bad arguments");
}

#[test]
fn bad_conf_exits_2_with_the_message_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("data/duang.db");
    let conf = write_conf(dir.path(), &format!("sqlite://{}", db.display())).path;
    let text = std::fs::read_to_string(&conf).expect("read").replacen(
        "kind = \"anthropic\"",
        "kind = \"antropic\"",
        1,
    );
    std::fs::write(&conf, text).expect("write");
    for (bin, args) in [
        (ADMIN_BIN, vec!["check-conf"]),
        (ADMIN_BIN, vec!["migrate"]),
        (ADMIN_BIN, vec!["up"]),
        (GATEWAY_BIN, vec![]),
    ] {
        let r = run(bin, &conf, &args, None);
        assert_eq!(r.code, 2, "{bin} {args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("{}: providers.anthropic.kind: unknown provider kind \"antropic\" (known: openai, anthropic, gemini)", conf.display())),
            "{bin} {args:?}: {}",
            r.stderr
        );
    }
    assert!(!db.exists());
    let missing = run(
        ADMIN_BIN,
        &dir.path().join("nope.toml"),
        &["check-conf"],
        None,
    );
    assert_eq!(missing.code, 2);
    assert!(
        missing
            .stderr
            .contains("nope.toml: cannot read the conf file"),
        "{}",
        missing.stderr
    );
}

#[test]
fn check_conf_accepts_the_shipped_file() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/duang.toml");
    let r = admin(&conf, &["check-conf"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("ok (4 tiers, 4 providers, store sqlite, stripe off, mail outbox)"),
        "{}",
        r.stdout
    );
    let r = run(GATEWAY_BIN, &conf, &["check-conf"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn unreachable_database_is_a_clear_failure() {
    let dir = tempfile::tempdir().expect("dir");
    // A port nothing listens on.
    let port = support::free_port();
    let conf = write_conf(
        dir.path(),
        &format!("postgres://postgres@127.0.0.1:{port}/duang"),
    )
    .path;
    for (bin, args) in [
        (ADMIN_BIN, vec!["migrate"]),
        (ADMIN_BIN, vec!["account", "create", "--email", "a@b.co"]),
        (GATEWAY_BIN, vec![]),
    ] {
        let r = run(bin, &conf, &args, None);
        assert_eq!(r.code, 1, "{bin} {args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "cannot reach the store at postgres://postgres@127.0.0.1:{port}/duang"
            )),
            "{bin} {args:?}: {}",
            r.stderr
        );
        assert!(r.stderr.contains("is PostgreSQL running"), "{}", r.stderr);
    }
}

/// With Stripe and SMTP turned on but their secrets absent from the environment, the commands
/// that call neither still work (an operator's shell need not hold them); the servers and
/// `check-conf` still refuse, naming the variable.
#[tokio::test]
async fn store_commands_do_not_need_stripe_or_smtp_secrets() {
    let t = TestStore::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().expect("dir");
    let conf = write_conf(dir.path(), &t.url).path;
    let text = std::fs::read_to_string(&conf)
        .expect("conf")
        .replace("[stripe]\nenabled = false", "[stripe]\nenabled = true")
        .replace("[smtp]\nenabled = false", "[smtp]\nenabled = true");
    std::fs::write(&conf, text).expect("write");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(ADMIN_BIN);
        c.arg("--conf").arg(&conf).args(args);
        for v in [
            "STRIPE_SECRET_KEY",
            "STRIPE_WEBHOOK_SECRET",
            "SMTP_USERNAME",
            "SMTP_PASSWORD",
        ] {
            c.env_remove(v);
        }
        c.stdin(Stdio::null()).output().expect("run")
    };
    let created = cmd(&["account", "create", "--email", "ops@example.com"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let granted = cmd(&["credits", "grant", "ops@example.com", "--usd", "5"]);
    assert!(granted.status.success());
    assert!(cmd(&["balance", "ops@example.com"]).status.success());
    let check = cmd(&["check-conf"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("STRIPE_SECRET_KEY is not set"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
