//! The operator's pages and API through `app(state)` over real stores: who may reach them,
//! suspending and reactivating accounts and keys with reasons in the audit log, adjusting
//! credits, and the revenue, margin and upstream reports from the ledger and usage records.

mod support;

use axum::http::{Method, StatusCode};
use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::{AccountStatus, KeyStatus, LedgerKind, NewLedgerEntry, UsageRecord};
use serde_json::json;
use support::admin::Admin;

support::on_both_stores!(
    only_operators_reach_operator_routes,
    operators_suspend_reactivate_terminate_and_adjust_with_reasons,
    revenue_margin_and_upstream_health_come_from_the_records,
    limits_and_throttles_are_set_with_reasons,
    ledger_usage_and_audit_export_for_a_date_range,
);

async fn only_operators_reach_operator_routes(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut customer = admin.browser([10, 0, 0, 1]);
    customer.sign_up("ann@example.com").await;
    let me = admin.account("ann@example.com").await;
    let csrf = customer.get("/dashboard").await.csrf();
    for path in [
        "/operator",
        "/operator/refunds",
        "/operator/revenue",
        "/operator/upstreams",
        "/operator/audit",
        "/operator/audit.csv",
        "/operator/exports/ledger.csv",
        "/operator/exports/usage.csv",
        &format!("/operator/accounts/{}", me.id),
    ] {
        let r = customer.get(path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert!(r.body.contains("This is for operators only."));
    }
    for path in [
        "/api/v1/operator/accounts",
        "/api/v1/operator/revenue",
        "/api/v1/operator/upstreams",
        "/api/v1/operator/refunds",
        "/api/v1/operator/audit",
    ] {
        let r = customer.json(Method::GET, path, None, None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(r.json()["error"]["code"], "forbidden");
    }
    // A customer cannot grant themselves credits or reactivate themselves.
    let r = customer
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/credits", me.id),
            Some(json!({"amount_usd": "100", "reason": "me"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        admin.account("ann@example.com").await.balance,
        NanoUsd::ZERO
    );
    let mut anon = admin.browser([10, 0, 0, 2]);
    assert_eq!(anon.get("/operator").await.status, StatusCode::SEE_OTHER);
    assert_eq!(
        anon.json(Method::GET, "/api/v1/operator/accounts", None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    let mut op = admin.operator().await;
    let page = op.get("/operator?q=ann").await;
    assert_eq!(page.status, StatusCode::OK);
    let table = &page.body[page.body.find("id=\"accounts\"").expect("table")..];
    assert!(table.contains("ann@example.com") && !table.contains("op@example.com"));
    let list = op
        .json(
            Method::GET,
            "/api/v1/operator/accounts?q=example",
            None,
            None,
        )
        .await
        .json();
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
}

async fn operators_suspend_reactivate_terminate_and_adjust_with_reasons(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut customer = admin.browser([10, 0, 0, 1]);
    customer.sign_up("bob@example.com").await;
    let bob = admin.account("bob@example.com").await;
    let (_, key_id) = support::new_key(&admin.t.store, bob.id).await;
    let mut op = admin.operator().await;
    let page = format!("/operator/accounts/{}", bob.id);

    // Reasons are required; nothing changes without one.
    let r = op
        .submit(
            &page,
            &format!("{page}/status"),
            &[("status", "suspended"), ("reason", "")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("Give a reason"));
    assert_eq!(
        admin.account("bob@example.com").await.status,
        AccountStatus::Active
    );

    let r = op
        .submit(
            &page,
            &format!("{page}/status"),
            &[
                ("status", "suspended"),
                ("reason", "phishing reports (AUP)"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.location()),
        (StatusCode::SEE_OTHER, page.as_str())
    );
    assert_eq!(
        admin.account("bob@example.com").await.status,
        AccountStatus::Suspended
    );
    let dash = customer.get("/dashboard").await;
    assert!(
        dash.body.contains("This account is suspended"),
        "the customer is told"
    );
    let r = op
        .submit(
            &page,
            &format!("{page}/status"),
            &[("status", "active"), ("reason", "cleared after review")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);

    // The status select starts on a placeholder, never on a destructive choice.
    let account_page = op.get(&page).await;
    assert!(
        account_page
            .body
            .contains(r#"<option value="" selected disabled>Choose…</option>"#),
        "{}",
        account_page.body
    );
    assert!(
        account_page
            .body
            .contains("aria-label=\"New status for the key")
    );

    // Keys: suspend, reactivate, revoke for good (after a typed confirmation).
    let key_form = format!("/operator/keys/{key_id}/status");
    for (status, expect) in [
        ("suspended", KeyStatus::Suspended),
        ("active", KeyStatus::Active),
    ] {
        let r = op
            .submit(
                &page,
                &key_form,
                &[("status", status), ("reason", "abuse review")],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{status}: {}", r.body);
        assert_eq!(admin.t.store.key(key_id).await.expect("key").status, expect);
    }
    let ask = op
        .submit(
            &page,
            &key_form,
            &[("status", "revoked"), ("reason", "abuse review")],
        )
        .await;
    assert_eq!(ask.status, StatusCode::CONFLICT, "{}", ask.body);
    assert!(ask.body.contains("Revoke this key?") && ask.body.contains("bob@example.com"));
    assert_eq!(
        admin.t.store.key(key_id).await.expect("key").status,
        KeyStatus::Active,
        "nothing happens before the confirmation"
    );
    let wrong = op
        .submit(
            &page,
            &key_form,
            &[
                ("status", "revoked"),
                ("reason", "abuse review"),
                ("confirm", "someone@example.com"),
            ],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::CONFLICT);
    assert!(wrong.body.contains("not the account's e-mail"));
    let csrf = ask.csrf();
    let r = op
        .post_form(
            &key_form,
            &[
                ("csrf", csrf.as_str()),
                (
                    "status",
                    support::admin::hidden(&ask.body, "status").as_str(),
                ),
                ("reason", "abuse review"),
                ("confirm", "Bob@Example.com"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(
        admin.t.store.key(key_id).await.expect("key").status,
        KeyStatus::Revoked
    );
    let r = op
        .submit(
            &page,
            &key_form,
            &[("status", "active"), ("reason", "undo")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("revoked for good"));

    // Credits: grant, take back, never below zero; above the conf's threshold ($100 shipped),
    // only with the account's e-mail typed.
    let r = op
        .submit(
            &page,
            &format!("{page}/credits"),
            &[("amount_usd", "10"), ("reason", "goodwill")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let big = op
        .submit(
            &page,
            &format!("{page}/credits"),
            &[("amount_usd", "1000"), ("reason", "typo risk")],
        )
        .await;
    assert_eq!(big.status, StatusCode::CONFLICT);
    assert!(big.body.contains("Confirm this credit adjustment"));
    assert_eq!(
        admin.account("bob@example.com").await.balance,
        "10".parse().expect("usd"),
        "not granted before the confirmation"
    );
    let csrf = op.get(&page).await.csrf();
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/credits", bob.id),
            Some(json!({"amount_usd": "-150", "reason": "big take-back"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.json()["error"]["code"], "confirmation_required");
    assert_eq!(r.json()["error"]["field"], "confirm");
    let csrf = op.get(&page).await.csrf();
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/credits", bob.id),
            Some(json!({"amount_usd": "-2.5", "reason": "correction"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["balance_usd"], "7.50");
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/credits", bob.id),
            Some(json!({"amount_usd": "-100", "reason": "too much"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot go below zero"))
    );
    let proof = admin.t.store.balance_proof(bob.id).await.expect("proof");
    assert!(proof.holds());
    assert_eq!(proof.cached, "7.50".parse().expect("usd"));
    // Credit a gateway holds leased is still the customer's: the API shows the whole credit,
    // as the dashboard does, and what part of it is leased.
    admin
        .t
        .store
        .take_lease(bob.id, "gw:1/1", "2".parse().expect("usd"))
        .await
        .expect("lease");
    let leased = op
        .json(
            Method::GET,
            &format!("/api/v1/operator/accounts/{}", bob.id),
            None,
            None,
        )
        .await
        .json();
    assert_eq!(
        (
            &leased["balance_usd"],
            &leased["leased_usd"],
            &leased["unleased_usd"]
        ),
        (&json!("7.50"), &json!("2.00"), &json!("5.50")),
        "{leased}"
    );
    admin
        .t
        .store
        .return_node_leases("gw:1/1")
        .await
        .expect("return");

    // Every action is in the audit log with who and why.
    let detail = op
        .json(
            Method::GET,
            &format!("/api/v1/operator/accounts/{}", bob.id),
            None,
            None,
        )
        .await
        .json();
    let actions: Vec<(String, String)> = detail["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (action, reason) in [
        ("account.suspended", "phishing reports (AUP)"),
        ("account.active", "cleared after review"),
        ("key.suspended", "abuse review"),
        ("key.revoke", "abuse review"),
    ] {
        assert!(
            actions.contains(&(action.to_owned(), reason.to_owned())),
            "{action}: {actions:?}"
        );
    }
    assert!(
        detail["audit"]
            .as_array()
            .expect("audit")
            .iter()
            .all(|e| e["actor"] == "operator:op@example.com")
    );

    // Operators cannot lock themselves out; termination ends the customer's session.
    let me = admin.account("op@example.com").await;
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/status", me.id),
            Some(json!({"status": "suspended", "reason": "oops"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/status", bob.id),
            Some(json!({"status": "terminated", "reason": "repeated fraud"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "termination waits for the confirmation"
    );
    assert_eq!(
        admin.account("bob@example.com").await.status,
        AccountStatus::Active
    );
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/accounts/{}/status", bob.id),
            Some(json!({"status": "terminated", "reason": "repeated fraud", "confirm": "bob@example.com"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.json()["status"], "terminated");
    assert_eq!(
        customer.get("/dashboard").await.status,
        StatusCode::SEE_OTHER,
        "signed out"
    );
}

async fn revenue_margin_and_upstream_health_come_from_the_records(backend: Backend) {
    // The gateway's metrics endpoint, saying one upstream is cooling down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics_addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                "duang_upstream_cooling{model=\"openai-model\",provider=\"openai\"} 1\nduang_upstream_cooling{model=\"anthropic-model\",provider=\"anthropic\"} 0\n"
            }),
        );
        let _ = axum::serve(listener, app).await;
    });
    let admin = Admin::with_conf(backend, |t| t.replace("127.0.0.1:9090", &metrics_addr)).await;
    let mut customer = admin.browser([10, 0, 0, 1]);
    customer.sign_up("cat@example.com").await;
    let cat = admin.account("cat@example.com").await;
    let (_, key) = support::new_key(&admin.t.store, cat.id).await;
    let now = duang::time::now_ms();
    let today = duang::time::format_date(now);
    admin
        .t
        .store
        .append_ledger(&NewLedgerEntry {
            account_id: cat.id,
            kind: LedgerKind::TopUp,
            amount: "20".parse().expect("usd"),
            external_ref: "stripe:checkout:cs_test_r".into(),
            actor: Some("stripe".into()),
            reason: None,
        })
        .await
        .expect("topup");
    let rec =
        |n: i64, tier: &str, provider: &str, status: i64, attempts: i64, billed: i64, cost: i64| {
            UsageRecord {
                request_id: format!("r{n}"),
                account_id: cat.id,
                key_id: key,
                tier: tier.into(),
                provider: Some(provider.into()),
                upstream_model: Some(format!("{provider}-model")),
                stream: false,
                input_tokens: 10,
                output_tokens: 5,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
                provider_cost: NanoUsd::from_nanos(cost),
                billed: NanoUsd::from_nanos(billed),
                http_status: status,
                error_code: None,
                attempts,
                latency_ms: 100 * (n + 1),
                ttft_ms: Some(10),
                started_at: now - 1000 * n,
                finished_at: now - 1000 * n + 5,
            }
        };
    admin
        .t
        .store
        .insert_usage_batch(&[
            rec(0, "budget", "openai", 200, 1, 3_000_000, 1_000_000),
            rec(1, "budget", "openai", 502, 1, 0, 0),
            rec(2, "premium", "anthropic", 200, 2, 9_000_000, 4_000_000),
            // Refused before it had a tier (an unknown model): traffic, but no tier's revenue.
            UsageRecord {
                provider: None,
                upstream_model: None,
                ..rec(3, "", "none", 404, 0, 0, 0)
            },
        ])
        .await
        .expect("usage");

    let mut op = admin.operator().await;
    let v = op
        .json(
            Method::GET,
            &format!("/api/v1/operator/revenue?from={today}&to={today}"),
            None,
            None,
        )
        .await
        .json();
    assert_eq!(v["days"].as_array().map(Vec::len), Some(1), "{v}");
    let d = &v["days"][0];
    assert_eq!(
        (
            d["topups_usd"].as_str(),
            d["billed_usd"].as_str(),
            d["provider_cost_usd"].as_str(),
            d["margin_usd"].as_str()
        ),
        (Some("20.00"), Some("0.012"), Some("0.005"), Some("0.007"))
    );
    assert_eq!(d["requests"], 4);
    assert_eq!(
        v["tiers"].as_array().map(Vec::len),
        Some(2),
        "no blank-tier row: {v}"
    );
    assert_eq!(
        v["tiers"][0],
        json!({"tier": "budget", "requests": 2, "billed_usd": "0.003", "provider_cost_usd": "0.001", "margin_usd": "0.002"})
    );
    assert_eq!(v["tiers"][1]["margin_usd"], "0.005");
    let page = op
        .get(&format!("/operator/revenue?from={today}&to={today}"))
        .await;
    assert!(page.body.contains("$20.00") && page.body.contains("$0.007"));
    let r = op
        .json(
            Method::GET,
            "/api/v1/operator/revenue?from=yesterday",
            None,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let u = op
        .json(Method::GET, "/api/v1/operator/upstreams", None, None)
        .await
        .json();
    let openai = u["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|s| s["provider"] == "openai")
        .expect("openai")
        .clone();
    assert_eq!(
        (
            openai["requests"].as_i64(),
            openai["errors"].as_i64(),
            openai["avg_latency_ms"].as_i64()
        ),
        (Some(2), Some(1), Some(150))
    );
    assert_eq!(openai["error_rate"], 0.5);
    assert!(openai["last_error_at_ms"].is_i64());
    let anthropic = u["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|s| s["provider"] == "anthropic")
        .expect("anthropic")
        .clone();
    assert_eq!(anthropic["fallbacks"], 1);
    assert_eq!(openai["cooling_down"], true, "as the gateway's metrics say");
    assert_eq!(anthropic["cooling_down"], false);
    let page = op.get("/operator/upstreams").await;
    assert!(page.body.contains("50.0%") && page.body.contains("anthropic-model"));
    assert!(page.body.contains("cooling down"));
    assert!(page.body.contains("None recorded"), "no prepaid credit yet");

    // A prepayment recorded: the page and the API show what is left of it (the usage above was
    // written before it, so none of it counts).
    admin
        .t
        .store
        .add_upstream_credit(
            "openai",
            "5".parse().expect("usd"),
            "INV-7",
            None,
            "cli:test",
        )
        .await
        .expect("prepaid");
    let u = op
        .json(Method::GET, "/api/v1/operator/upstreams", None, None)
        .await
        .json();
    assert_eq!(u["prepaid"][0]["provider"], "openai");
    assert_eq!(u["prepaid"][0]["remaining_usd"], "5.00");
    assert_eq!(u["prepaid"][0]["out_of_routing"], false);
    let page = op.get("/operator/upstreams").await;
    assert!(
        page.body.contains("Prepaid upstream credit") && page.body.contains("$5.00"),
        "{}",
        page.body
    );
}

/// The OpenAPI document lists every JSON route, and every route it lists is served.
#[tokio::test]
async fn the_openapi_document_describes_the_served_api() {
    let admin = Admin::new(Backend::Sqlite).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    let r = b.get("/api/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["servers"][0]["url"], "http://127.0.0.1:8081");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 25, "{}", paths.len());
    for must in [
        "/api/v1/signup",
        "/api/v1/keys",
        "/api/v1/keys/{id}/revoke",
        "/api/v1/credits/checkout",
        "/api/v1/operator/revenue",
    ] {
        assert!(paths.contains_key(must), "{must}");
    }
    assert_eq!(
        doc["paths"]["/api/v1/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["required"],
        json!(["name"])
    );
    // Every documented operation reaches a handler (not the fallback, not 405).
    let mut count = 0;
    for (path, ops) in paths {
        for method in ops.as_object().expect("ops").keys() {
            let m = method.to_uppercase().parse::<Method>().expect("method");
            let r = b.json(m, &path.replace("{id}", "1"), None, None).await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                !r.body.contains("Nothing lives at"),
                "{method} {path}: {}",
                r.body
            );
            count += 1;
        }
    }
    assert!(count >= 28);
}

async fn limits_and_throttles_are_set_with_reasons(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut customer = admin.browser([10, 0, 0, 1]);
    customer.sign_up("dot@example.com").await;
    let dot = admin.account("dot@example.com").await;
    let (_, key_id) = support::new_key(&admin.t.store, dot.id).await;
    let mut op = admin.operator().await;
    let page = format!("/operator/accounts/{}", dot.id);
    let csrf = op.get(&page).await.csrf();
    let api = |p: &str| format!("/api/v1/operator/accounts/{}/{p}", dot.id);

    let r = op
        .json(
            Method::POST,
            &api("limits"),
            Some(json!({"requests_per_minute": 0, "reason": "x"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "requests_per_minute");
    let r = op
        .json(
            Method::POST,
            &api("limits"),
            Some(json!({"requests_per_minute": 30, "in_flight": "4", "reason": "enterprise plan"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (
            r.json()["requests_per_minute"].as_i64(),
            r.json()["in_flight"].as_i64()
        ),
        (Some(30), Some(4))
    );

    for (body, field) in [
        (
            json!({"requests_per_minute": 5, "minutes": 0.5, "reason": "x"}),
            "minutes",
        ),
        (json!({"minutes": 10, "reason": "x"}), "requests_per_minute"),
        (
            json!({"requests_per_minute": -1, "minutes": 10, "reason": "x"}),
            "requests_per_minute",
        ),
    ] {
        let r = op
            .json(
                Method::POST,
                &api("throttle"),
                Some(body.clone()),
                Some(&csrf),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json()["error"]["field"], field, "{body}");
    }
    let r = op
        .json(
            Method::POST,
            &api("throttle"),
            Some(
                json!({"requests_per_minute": 5, "minutes": 30, "reason": "burst from a scraper"}),
            ),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["throttle"]["requests_per_minute"], 5);
    assert!(op.get(&page).await.body.contains("id=\"throttled\""));
    let r = op
        .json(
            Method::POST,
            &api("throttle"),
            Some(json!({"action": "lift", "reason": "calmed down"})),
            Some(&csrf),
        )
        .await;
    assert!(r.json()["throttle"].is_null(), "{}", r.body);
    let r = op
        .submit(
            &page,
            &format!("/operator/keys/{key_id}/throttle"),
            &[
                ("requests_per_minute", "2"),
                ("minutes", "5"),
                ("reason", "retry storm"),
                ("action", "throttle"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let key = admin.t.store.key(key_id).await.expect("key");
    assert_eq!(key.throttle.requests_per_minute, Some(2));
    assert!(key.throttle.active_at(duang::time::now_ms()));

    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/keys/{key_id}/limits"),
            Some(json!({"tokens_per_minute": 5000, "reason": "batch job"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["tokens_per_minute"], 5000);

    let audit = admin.t.store.audit_log(dot.id).await.expect("audit");
    let has = |action: &str, says: &str| {
        audit
            .iter()
            .any(|e| e.action == action && e.reason.as_deref().is_some_and(|r| r.contains(says)))
    };
    assert!(has("account.limits", "enterprise plan"));
    assert!(has("account.throttle", "burst from a scraper"));
    assert!(has("account.unthrottle", "calmed down"));
    assert!(has("key.throttle", "retry storm"));
    assert!(has("key.limits", "batch job"));
}

/// The operator's exports for accounting: each CSV streams (no `Content-Length`) exactly the
/// rows of the chosen days (and account), oldest first; the audit log filters by actor, action,
/// account and days, as a page, as JSON and as CSV.
async fn ledger_usage_and_audit_export_for_a_date_range(backend: Backend) {
    let admin = Admin::new(backend).await;
    let store = &admin.t.store;
    let mut customer = admin.browser([10, 0, 0, 1]);
    customer.sign_up("dan@example.com").await;
    let dan = admin.account("dan@example.com").await;
    let mut other = admin.browser([10, 0, 0, 2]);
    other.sign_up("eli@example.com").await;
    let eli = admin.account("eli@example.com").await;
    let (_, dan_key) = support::new_key(store, dan.id).await;
    let (_, eli_key) = support::new_key(store, eli.id).await;
    let day = |d: &str| duang::time::parse_date(d).expect("day");
    // Ledger entries and audit rows written on three days (straight into the tables: the
    // store stamps its own writes with the present).
    for (account, n, d) in [
        (dan.id, 1, "2026-10-01"),
        (dan.id, 2, "2026-10-02"),
        (eli.id, 3, "2026-10-02"),
        (dan.id, 4, "2026-10-02"),
        (dan.id, 5, "2026-10-03"),
    ] {
        sqlx::query(
            "INSERT INTO ledger (account_id, kind, amount_nano, external_ref, actor, reason, created_at)
             VALUES ($1, 'adjustment', $2, $3, 'cli', $4, $5)",
        )
        .bind(account)
        .bind(n * 1_000_000_000 + 5)
        .bind(format!("ref-{n}"))
        .bind(format!("reason, \"{n}\""))
        .bind(day(d) + n * 60_000)
        .execute(store.pool())
        .await
        .expect("ledger row");
        sqlx::query(
            "INSERT INTO audit_log (actor, action, account_id, key_id, reason, created_at)
             VALUES ($1, $2, $3, NULL, $4, $5)",
        )
        .bind(if n % 2 == 0 {
            "operator:op@example.com"
        } else {
            "cli"
        })
        .bind(if n == 4 {
            "key.revoke"
        } else {
            "account.suspended"
        })
        .bind(account)
        .bind(format!("audit {n}"))
        .bind(day(d) + n * 60_000)
        .execute(store.pool())
        .await
        .expect("audit row");
    }
    let usage = |n: i64, account_id: i64, key_id: i64, d: &str| UsageRecord {
        request_id: format!("u{n}"),
        account_id,
        key_id,
        tier: "budget".into(),
        provider: Some("openai".into()),
        upstream_model: Some("gpt-4.1-nano".into()),
        stream: false,
        input_tokens: 100,
        output_tokens: 50,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        provider_cost: NanoUsd::from_nanos(30_000),
        billed: NanoUsd::from_nanos(36_000 + n),
        http_status: 200,
        error_code: None,
        attempts: 1,
        latency_ms: 100,
        ttft_ms: None,
        started_at: day(d) + 3_600_000 - n * 1000,
        finished_at: day(d) + 3_600_000 - n * 1000 + 100,
    };
    let mut records: Vec<UsageRecord> = (0..300)
        .map(|n| usage(n, dan.id, dan_key, "2026-10-02"))
        .collect();
    records.push(usage(900, eli.id, eli_key, "2026-10-02"));
    records.push(usage(901, dan.id, dan_key, "2026-10-01"));
    records.push(usage(902, dan.id, dan_key, "2026-10-03"));
    store.insert_usage_batch(&records).await.expect("usage");

    let mut op = admin.operator().await;
    let csv = |frames: Vec<bytes::Bytes>| String::from_utf8(frames.concat()).expect("utf-8");
    let col = |body: &str, n: usize| -> Vec<String> {
        body.lines()
            .skip(1)
            .map(|l| l.split(',').nth(n).expect("column").to_owned())
            .collect()
    };

    // The ledger of one day, every account, oldest first; quoted where a field needs it.
    let (status, headers, frames) = op
        .get_frames("/operator/exports/ledger.csv?from=2026-10-02&to=2026-10-02")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get(axum::http::header::CONTENT_LENGTH).is_none());
    assert!(
        headers[axum::http::header::CONTENT_DISPOSITION]
            .to_str()
            .expect("ascii")
            .contains("duang-ledger-2026-10-02-to-2026-10-02.csv")
    );
    let body = csv(frames);
    assert!(body.starts_with("created_at_utc,entry_id,account_id,email,kind,amount_usd,"));
    assert_eq!(col(&body, 7), ["ref-2", "ref-3", "ref-4"], "{body}");
    assert!(
        body.contains(
            ",dan@example.com,adjustment,2.000000005,2000000005,ref-2,cli,\"reason, \"\"2\"\"\"\n"
        ),
        "{body}"
    );
    // One account, two days (its e-mail names it).
    let (_, _, frames) = op
        .get_frames(
            "/operator/exports/ledger.csv?from=2026-10-02&to=2026-10-03&account=dan@example.com",
        )
        .await;
    assert_eq!(col(&csv(frames), 7), ["ref-2", "ref-4", "ref-5"]);

    // Usage: the 301 records of 2026-10-02, in time order, with cost and e-mail.
    let (status, headers, frames) = op
        .get_frames("/operator/exports/usage.csv?from=2026-10-02&to=2026-10-02")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get(axum::http::header::CONTENT_LENGTH).is_none());
    assert!(
        frames.len() > 2,
        "streamed in batches: {} frames",
        frames.len()
    );
    let body = csv(frames);
    let mut expected: Vec<String> = (0..300).rev().map(|n| format!("u{n}")).collect();
    expected.insert(0, "u900".into());
    assert_eq!(col(&body, 1), expected);
    assert!(body.contains(",u0,"), "{body}");
    let first_dan = body.lines().find(|l| l.contains(",u299,")).expect("u299");
    assert!(
        first_dan.ends_with(&format!(",{},dan@example.com,{dan_key},budget,openai,gpt-4.1-nano,false,200,,1,100,50,0,0,0,0.000036299,0.00003,0.00,100,", dan.id)),
        "{first_dan}"
    );
    let (_, _, frames) = op
        .get_frames(&format!(
            "/operator/exports/usage.csv?from=2026-10-01&to=2026-10-03&account={}",
            eli.id
        ))
        .await;
    assert_eq!(col(&csv(frames), 1), ["u900"]);

    // The audit log: by actor, by action prefix, by account, by days.
    let v = op
        .json(
            Method::GET,
            "/api/v1/operator/audit?from=2026-10-01&to=2026-10-03&actor=cli",
            None,
            None,
        )
        .await
        .json();
    let reasons = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        reasons(&v),
        ["audit 5", "audit 3", "audit 1"],
        "newest first: {v}"
    );
    let v = op
        .json(
            Method::GET,
            "/api/v1/operator/audit?from=2026-10-01&to=2026-10-03&action=key.",
            None,
            None,
        )
        .await
        .json();
    assert_eq!(reasons(&v), ["audit 4"]);
    assert_eq!(v["data"][0]["email"], "dan@example.com");
    let v = op
        .json(
            Method::GET,
            &format!(
                "/api/v1/operator/audit?from=2026-10-02&to=2026-10-02&account={}",
                eli.id
            ),
            None,
            None,
        )
        .await
        .json();
    assert_eq!(reasons(&v), ["audit 3"]);
    let page = op
        .get("/operator/audit?from=2026-10-01&to=2026-10-03&actor=operator:op@example.com")
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let table = &page.body[page.body.find("id=\"audit\"").expect("table")..];
    assert!(table.contains("audit 2") && table.contains("audit 4") && !table.contains("audit 3"));
    let (status, _, frames) = op
        .get_frames(
            "/operator/audit.csv?from=2026-10-01&to=2026-10-03&actor=operator:op@example.com",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = csv(frames);
    assert!(body.starts_with("created_at_utc,actor,action,account_id,email,key_id,reason\n"));
    assert_eq!(
        col(&body, 6),
        ["audit 2", "audit 4"],
        "oldest first: {body}"
    );

    // Bad input is refused with what to fix.
    for path in [
        "/operator/exports/ledger.csv?from=2026-10-05&to=2026-10-01",
        "/operator/exports/usage.csv?from=2025-01-01&to=2026-10-01",
        "/operator/exports/usage.csv?account=nobody@example.com",
        "/operator/audit.csv?from=yesterday",
    ] {
        let r = op.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
}
