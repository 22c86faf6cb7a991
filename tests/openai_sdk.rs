//! The official `openai` Python package (from PyPI) drives the gateway through
//! `OPENAI_BASE_URL` / `OPENAI_API_KEY`: a plain and a streaming completion, and two errors.
//!
//! The package is installed on first use into a virtual environment under `target/` (the
//! machine's Python is left alone); a missing `python3` fails the test.

mod support;

use duang::conf::Backend;
use std::path::PathBuf;
use std::process::Command;
use support::relay::Relay;

/// A Python with `openai` installed: `target/test-python/bin/python`.
fn python_with_openai() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-python");
    let python = venv.join("bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is required for this test");
        assert!(
            made.success(),
            "python3 -m venv failed (install python3-venv)"
        );
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.40,<3",
            ])
            .status()
            .expect("pip");
        assert!(pip.success(), "pip install openai failed");
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_package_works_against_the_gateway() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("venv");
    let relay = Relay::start(Backend::Sqlite, "1").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let base = format!("{}/v1", relay.base);
    let key = relay.key.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("OPENAI_BASE_URL", base)
            .env("OPENAI_API_KEY", key)
            .env("OPENAI_MAX_RETRIES", "0")
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(v["plain"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["stream"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["stream_chunks"], 4);
    assert_eq!(
        (v["plain_usage"].as_u64(), v["stream_usage"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(v["not_found_code"], "model_not_found");
    assert_eq!(v["auth_code"], "invalid_api_key");
    // Two completions were billed.
    let records = relay.usage(3).await;
    assert_eq!(records.iter().filter(|r| r.billed.is_positive()).count(), 2);
}
