//! Shared test support: real stores (a SQLite file, a throwaway PostgreSQL database), conf files
//! written for one test, free ports, and the binaries under test.
//!
//! PostgreSQL is required: a test that cannot reach it fails (it is never skipped). The server
//! defaults to `postgres://postgres@127.0.0.1:5432/postgres`; set `DUANG_TEST_POSTGRES_URL` to
//! use another. Each test gets its own database, dropped when the test ends.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use duang::conf::{Backend, Conf, StoreConf};
use duang::secret::Secret;
use duang::store::Store;
use sqlx::Connection;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub const ADMIN_BIN: &str = env!("CARGO_BIN_EXE_duang-admin");
pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_duang-gateway");

/// The server's maintenance URL (a database that always exists).
pub fn postgres_admin_url() -> String {
    std::env::var("DUANG_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A store for one test: a SQLite file in a temp dir, or a fresh PostgreSQL database.
pub struct TestStore {
    pub store: Store,
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_db: Option<String>,
}

impl TestStore {
    pub async fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("data/duang.db").display());
        let store = open(&url, Backend::Sqlite).await;
        TestStore {
            store,
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            pg_db: None,
        }
    }

    pub async fn postgres() -> TestStore {
        let db = create_pg_database().await;
        let url = pg_url_for(&db);
        let store = open(&url, Backend::Postgres).await;
        TestStore {
            store,
            url,
            backend: Backend::Postgres,
            _dir: None,
            pg_db: Some(db),
        }
    }

    pub async fn new(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => TestStore::sqlite().await,
            Backend::Postgres => TestStore::postgres().await,
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(db) = self.pg_db.take() {
            drop_pg_database(db);
        }
    }
}

pub fn store_conf(url: &str, backend: Backend) -> StoreConf {
    StoreConf {
        url: Secret::new(url.to_owned()),
        backend,
        max_connections: NonZeroU32::new(8).expect("non-zero"),
    }
}

async fn open(url: &str, backend: Backend) -> Store {
    Store::open(&store_conf(url, backend))
        .await
        .expect("store opens and migrates")
}

/// Creates an empty database on the test PostgreSQL server; panics (fails the test) when the
/// server is not reachable.
pub async fn create_pg_database() -> String {
    let name = unique_name("duang_test");
    let admin = postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is required for this test and is not reachable at {admin}: {e}")
        });
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    name
}

pub fn pg_url_for(db: &str) -> String {
    let mut url = url::Url::parse(&postgres_admin_url()).expect("DUANG_TEST_POSTGRES_URL parses");
    url.set_path(db);
    url.to_string()
}

/// Drops a test database from a plain thread (Drop cannot await inside a runtime).
pub fn drop_pg_database(db: String) {
    let admin = postgres_admin_url();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    })
    .join();
}

/// A port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The shipped conf with the store URL and listen ports replaced, written into `dir`.
pub struct TestConf {
    pub path: PathBuf,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub metrics_port: u16,
}

pub fn shipped_conf_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/duang.toml"))
        .expect("conf/duang.toml")
}

pub fn write_conf(dir: &Path, store_url: &str) -> TestConf {
    let gateway_port = free_port();
    let admin_port = free_port();
    let metrics_port = free_port();
    let text = shipped_conf_text()
        .replace("sqlite://data/duang.db", store_url)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{gateway_port}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{admin_port}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{metrics_port}"))
        .replace(
            "\"data/outbox\"",
            &format!("{:?}", dir.join("outbox").display().to_string()),
        );
    let path = dir.join("duang.toml");
    std::fs::write(&path, text).expect("write conf");
    TestConf {
        path,
        gateway_port,
        admin_port,
        metrics_port,
    }
}

/// Parses conf text with the given environment (no process environment involved).
pub fn parse_conf(text: &str, env: &[(&str, &str)]) -> Result<Conf, String> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Conf::parse(text, "test.toml", &move |name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .map_err(|e| e.to_string())
}

/// Creates a key for an account; returns the plaintext and the key id.
pub async fn new_key(store: &Store, account_id: i64) -> (String, i64) {
    let m = duang::keys::generate();
    let k = store
        .create_key(
            &duang::store::NewKey {
                account_id,
                name: "test".into(),
                ..Default::default()
            },
            &m.hash,
            &m.display_prefix,
        )
        .await
        .expect("key");
    (m.plaintext.expose().clone(), k.id)
}

pub mod admin;
pub mod browser;
pub mod proxy;
pub mod redis_server;
pub mod relay;
pub mod smtp;

/// Runs each named `async fn case(backend: Backend)` as a test on SQLite and as a test on
/// PostgreSQL: `on_both_stores!(case_a, case_b);` in a test file.
#[allow(
    unused_macros,
    reason = "each test binary uses a different part of this module"
)]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(duang::conf::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(duang::conf::Backend::Postgres).await;
                }
            )*
        }
    };
}
#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub(crate) use on_both_stores;

/// What a binary run with `--conf` printed, and its exit code.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `bin --conf CONF ARGS…`, with `stdin` written to it when given.
pub fn run(bin: &str, conf: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    use std::process::{Command, Output, Stdio};
    let mut cmd = Command::new(bin);
    cmd.arg("--conf").arg(conf).args(args);
    cmd.env("RUST_LOG", "warn").env("USER", "tester");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}
