//! Redis servers for tests: the machine's own (127.0.0.1:6379, required: a missing one fails the
//! test), or a private `redis-server` on a free port that a test can stop and start again.

use super::relay::Proc;
use std::time::{Duration, Instant};

pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// Fails the test when the machine's Redis does not answer.
pub async fn require_shared() {
    let client = redis::Client::open(SHARED_REDIS).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is required at {SHARED_REDIS} and does not answer: {e}"));
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
}

/// A `redis-server` of this test's own, on a fixed free port across restarts.
pub struct PrivateRedis {
    pub port: u16,
    proc: Option<Proc>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: super::free_port(),
            proc: None,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is required (Debian package redis-server)");
        self.proc = Some(Proc(child));
        let client = redis::Client::open(self.url()).expect("url");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
