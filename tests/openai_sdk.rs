//! The official Python SDKs (from PyPI), unmodified, drive the gateway: `openai` through
//! `OPENAI_BASE_URL` / `OPENAI_API_KEY` (chat completions plain and streamed, the Responses API
//! with a function tool, `models.retrieve`, errors), and `anthropic` through
//! `ANTHROPIC_BASE_URL` / `ANTHROPIC_API_KEY` against an Anthropic upstream (a message with a
//! stop sequence, a CRLF-framed stream, a streamed tool use, an error).
//!
//! The packages are installed on first use into a virtual environment under `target/` (the
//! machine's Python is left alone); a missing `python3` fails the test.

mod support;

use duang::conf::Backend;
use std::path::PathBuf;
use std::process::Command;
use support::relay::Relay;

/// A Python with `openai` and `anthropic` installed: `target/test-python/bin/python`, made once
/// per test binary (the tests here run at the same time, and two `venv`s in one place collide).
fn python_with_openai() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_python).clone()
}

fn make_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-python");
    let python = venv.join("bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai, anthropic"])
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
                "openai>=1.66,<3",
                "anthropic>=0.40,<3",
            ])
            .status()
            .expect("pip");
        assert!(pip.success(), "pip install openai anthropic failed");
    }
    python
}

/// Runs `tests/python/{script}` with `env`; it must succeed and print one JSON line.
async fn run_script<const N: usize>(
    python: PathBuf,
    script: &str,
    env: [(&'static str, String); N],
) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .envs(env)
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
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_package_works_against_the_gateway() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("venv");
    let relay = Relay::start(Backend::Sqlite, "1").await;
    let base = format!("{}/v1", relay.base);
    let v = run_script(
        python,
        "openai_client.py",
        [
            ("OPENAI_BASE_URL", base),
            ("OPENAI_API_KEY", relay.key.clone()),
            ("OPENAI_MAX_RETRIES", "0".to_owned()),
        ],
    )
    .await;
    assert_eq!(v["plain"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["stream"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["stream_chunks"], 4);
    assert_eq!(
        (v["plain_usage"].as_u64(), v["stream_usage"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(v["not_found_code"], "model_not_found");
    assert_eq!(v["auth_code"], "invalid_api_key");
    assert_eq!(v["responses_text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["responses_model"], "budget");
    assert_eq!(v["responses_stream_text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["responses_stream_final"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(v["previous_param"], "previous_response_id");
    assert_eq!(v["retrieved"], "budget");
    assert_eq!(v["embeddings_model"], "embed");
    // Two completions and four responses were billed, each from its usage: 10 in and 4 out;
    // two embeddings at 20 nano-USD per input token (6 and 3 tokens).
    let records = relay.usage(10).await;
    let embedded: duang::money::NanoUsd = records
        .iter()
        .filter(|r| r.tier == "embed")
        .map(|r| r.billed)
        .sum();
    assert_eq!(embedded, duang::money::NanoUsd::from_nanos(9 * 20));
    let paid: Vec<_> = records
        .iter()
        .filter(|r| r.billed.is_positive() && r.tier != "embed")
        .collect();
    assert_eq!(paid.len(), 6);
    assert!(
        paid.iter()
            .all(|r| r.billed == duang::money::NanoUsd::from_nanos(10 * 120 + 4 * 480)),
        "{paid:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_python_package_works_against_an_anthropic_upstream() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("venv");
    let relay = Relay::start(Backend::Sqlite, "1").await;
    let v = run_script(
        python,
        "anthropic_client.py",
        [
            ("ANTHROPIC_BASE_URL", relay.base.clone()),
            ("ANTHROPIC_API_KEY", relay.key.clone()),
            ("ANTHROPIC_MAX_RETRIES", "0".to_owned()),
        ],
    )
    .await;
    assert_eq!(v["id"], "msg_01XFDUDYJgAACzvnptvVoYEL");
    assert_eq!(v["model"], "claude");
    assert_eq!(v["text"], "Hello! How can I help you today?");
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "END");
    assert_eq!(v["usage"], serde_json::json!([12, 9]));
    assert_eq!(v["stream_text"], "Hello!");
    assert_eq!(v["stream_id"], "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY");
    assert_eq!(v["stream_usage"], serde_json::json!([25, 15]));
    assert_eq!(v["tool"], "get_weather");
    assert_eq!(
        v["tool_input"],
        serde_json::json!({"location": "San Francisco, CA"})
    );
    assert_eq!(v["tool_stop"], "tool_use");
    assert_eq!(v["auth_type"], "authentication_error");
    // claude: $3.60 / $18.00 per 1M tokens, from Anthropic's own counts (cache reads are input).
    let records = relay.usage(3).await;
    let billed: duang::money::NanoUsd = records.iter().map(|r| r.billed).sum();
    assert_eq!(
        billed,
        duang::money::NanoUsd::from_nanos(
            (16 * 3600 + 9 * 18000) + (25 * 3600 + 15 * 18000) + (472 * 3600 + 89 * 18000)
        )
    );
}
