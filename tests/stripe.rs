//! Buying credits through Stripe Checkout, against `duang-mock-stripe` (a local fake that speaks
//! Stripe's wire format and signs its webhook events as Stripe does), with the admin's webhook on
//! a real socket: a package and a custom amount, the browser's trip through the hosted page,
//! redeliveries and concurrent deliveries crediting once, delayed payments, and every kind of
//! bad input changing nothing.

mod support;

use axum::http::{Method, StatusCode};
use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::LedgerKind;
use serde_json::{Value, json};
use support::admin::{Admin, Browser, STRIPE_KEY};

support::on_both_stores!(
    a_package_bought_through_checkout_is_credited_once,
    concurrent_deliveries_of_one_payment_credit_once,
    a_delayed_payment_is_credited_when_it_succeeds,
    webhooks_that_are_not_genuine_change_nothing,
    amounts_outside_the_offer_and_unverified_accounts_are_refused,
    refunds_of_unused_balance_are_reviewed_paid_back_and_taken_once,
    refunds_and_disputes_made_in_stripe_are_taken_once,
    a_refund_stripe_cannot_pay_gives_the_credits_back,
    a_webhook_the_store_cannot_take_gets_a_5xx_and_stripes_retry_credits,
);

/// A verified, signed-in customer.
async fn customer<'a>(admin: &'a Admin, email: &str) -> (Browser<'a>, i64) {
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up(email).await;
    let id = admin.account(email).await.id;
    admin.t.store.mark_verified(id).await.expect("verify");
    (b, id)
}

async fn balance(admin: &Admin, id: i64) -> NanoUsd {
    let proof = admin.t.store.balance_proof(id).await.expect("proof");
    assert!(proof.holds(), "{proof:?}");
    proof.cached
}

async fn topups(admin: &Admin, id: i64) -> usize {
    admin
        .t
        .store
        .ledger(id, 100)
        .await
        .expect("ledger")
        .iter()
        .filter(|e| e.kind == LedgerKind::TopUp)
        .count()
}

async fn no_payments(admin: &Admin, id: i64) -> bool {
    let sessions = admin.t.store.checkout_sessions(id, 10).await;
    sessions.expect("sessions").is_empty()
}

/// Starts a Checkout through the credits page; returns the session id.
async fn checkout(b: &mut Browser<'_>, fields: &[(&str, &str)]) -> String {
    let r = b.submit("/credits", "/credits/checkout", fields).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let url = r.location().to_owned();
    url.rsplit('/').next().expect("session id").to_owned()
}

async fn a_package_bought_through_checkout_is_credited_once(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let fake = admin.fake();
    let (mut b, id) = customer(&admin, "ann@example.com").await;
    let page = b.get("/credits").await;
    assert!(page.body.contains("Buy $20.00"), "packages offered");

    let session = checkout(
        &mut b,
        &[("package_cents", "2000"), ("nonce", "abcdef0123456789")],
    )
    .await;
    assert!(session.starts_with("cs_test_"), "{session}");
    // What reached "Stripe": a form-encoded Checkout Session with an idempotency key.
    let requests = fake.get("/_fake/requests").await;
    let create = requests
        .as_array()
        .expect("list")
        .iter()
        .find(|r| r["path"] == "/v1/checkout/sessions")
        .expect("a Checkout Session was created");
    assert_eq!(
        create["params"]["line_items[0][price_data][unit_amount]"],
        "2000"
    );
    assert_eq!(
        create["params"]["line_items[0][price_data][currency]"],
        "usd"
    );
    assert_eq!(create["params"]["metadata[account_id]"], id.to_string());
    assert_eq!(create["params"]["mode"], "payment");
    assert!(
        create["idempotency_key"]
            .as_str()
            .is_some_and(|k| k.contains("abcdef0123456789"))
    );

    // The same click again (same nonce) gets the same session, not a second one.
    let again = checkout(
        &mut b,
        &[("package_cents", "2000"), ("nonce", "abcdef0123456789")],
    )
    .await;
    assert_eq!(again, session);
    assert_eq!(
        admin
            .t
            .store
            .checkout_sessions(id, 10)
            .await
            .expect("sessions")
            .len(),
        1
    );
    assert_eq!(
        balance(&admin, id).await,
        NanoUsd::ZERO,
        "nothing before payment"
    );

    // The browser pays on the hosted page and comes back to the success page.
    let r = fake
        .http
        .post(format!("{}/pay/{session}", fake.url))
        .send()
        .await
        .expect("pay");
    assert_eq!(r.status(), 303);
    let back = r.headers()["location"].to_str().expect("ascii").to_owned();
    assert!(
        back.ends_with(&format!("/credits/success?session_id={session}")),
        "{back}"
    );
    let path = back.trim_start_matches(admin.admin_url.as_deref().expect("url"));
    let done = b.get(path).await;
    assert!(
        done.body.contains("$20.00 was added to your balance"),
        "{}",
        done.body
    );
    assert_eq!(balance(&admin, id).await, "20".parse().expect("usd"));

    // Stripe delivers the same event again: nothing changes.
    let events = fake.get("/_fake/events").await;
    let event_id = events[0]["event"]["id"]
        .as_str()
        .expect("event id")
        .to_owned();
    let r = fake
        .post(&format!("/_fake/redeliver/{event_id}"), json!({}))
        .await;
    assert_eq!(r["delivery"]["status"], 200);
    assert_eq!(balance(&admin, id).await, "20".parse().expect("usd"));
    assert_eq!(topups(&admin, id).await, 1);
    let sessions = admin
        .t
        .store
        .checkout_sessions(id, 10)
        .await
        .expect("sessions");
    assert_eq!(sessions[0].2, "paid");
}

async fn concurrent_deliveries_of_one_payment_credit_once(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let fake = admin.fake();
    let (mut b, id) = customer(&admin, "bob@example.com").await;
    let session_id = checkout(&mut b, &[("amount_usd", "12.34")]).await;
    let mut session: Value = fake
        .http
        .get(format!("{}/v1/checkout/sessions/{session_id}", fake.url))
        .bearer_auth(support::admin::STRIPE_KEY)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(session["amount_total"], 1234);
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    session["payment_intent"] = json!("pi_concurrent");
    let send = |event_id: &'static str| {
        let body = json!({"type": "checkout.session.completed", "object": session.clone(), "event_id": event_id});
        async move { fake.post("/_fake/send", body).await }
    };
    // The same event twice at once, and a second event for the same session at once.
    let (a, bb, c) = tokio::join!(send("evt_same"), send("evt_same"), send("evt_other"));
    for r in [&a, &bb, &c] {
        assert_eq!(r["delivery"]["status"], 200, "{r}");
    }
    let credited = [&a, &bb, &c]
        .iter()
        .filter(|r| {
            serde_json::from_str::<Value>(r["delivery"]["body"].as_str().unwrap_or("{}"))
                .is_ok_and(|v| v["credited"] == true)
        })
        .count();
    assert_eq!(credited, 1);
    assert_eq!(balance(&admin, id).await, "12.34".parse().expect("usd"));
    assert_eq!(topups(&admin, id).await, 1);
}

async fn a_delayed_payment_is_credited_when_it_succeeds(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let fake = admin.fake();
    let (mut b, id) = customer(&admin, "cat@example.com").await;
    let csrf = b.get("/dashboard").await.csrf();
    let r = b
        .json(
            Method::POST,
            "/api/v1/credits/checkout",
            Some(json!({"package_cents": 500})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let session = r.json()["session_id"].as_str().expect("id").to_owned();
    assert!(
        r.json()["checkout_url"]
            .as_str()
            .expect("url")
            .contains(&session)
    );

    let r = fake
        .post(
            &format!("/_fake/pay/{session}"),
            json!({"payment_status": "unpaid"}),
        )
        .await;
    assert_eq!(r["delivery"]["status"], 200);
    assert_eq!(balance(&admin, id).await, NanoUsd::ZERO, "not paid yet");
    let r = fake
        .post(&format!("/_fake/async_succeed/{session}"), json!({}))
        .await;
    assert_eq!(
        r["event"]["type"],
        "checkout.session.async_payment_succeeded"
    );
    assert_eq!(r["delivery"]["status"], 200);
    assert_eq!(balance(&admin, id).await, "5".parse().expect("usd"));
    let listed = b
        .json(Method::GET, "/api/v1/credits", None, None)
        .await
        .json();
    assert_eq!(listed["payments"][0]["status"], "paid");
    assert_eq!(listed["packages_cents"], json!([500, 2000, 10000]));
}

async fn webhooks_that_are_not_genuine_change_nothing(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let fake = admin.fake();
    let (mut b, id) = customer(&admin, "dan@example.com").await;
    let session_id = checkout(&mut b, &[("package_cents", "500")]).await;
    let paid = json!({"id": session_id, "object": "checkout.session", "amount_total": 500, "currency": "usd", "payment_status": "paid", "status": "complete", "payment_intent": "pi_x"});
    let old = duang::time::now_ms() / 1000 - 301;
    for (body, status, says) in [
        (
            json!({"type": "checkout.session.completed", "object": paid, "signature": "bad"}),
            400,
            "no signature matches",
        ),
        (
            json!({"type": "checkout.session.completed", "object": paid, "signature": "none"}),
            400,
            "no Stripe-Signature header",
        ),
        (
            json!({"type": "checkout.session.completed", "object": paid, "timestamp": old}),
            400,
            "outside the 300 s tolerance",
        ),
        (
            json!({"type": "customer.created", "object": {"id": "cus_1"}}),
            200,
            "is not handled",
        ),
        // Paid, but for a session this relay never created, or for another amount.
        (
            json!({"type": "checkout.session.completed", "object": {"id": "cs_test_foreign", "amount_total": 500, "currency": "usd", "payment_status": "paid"}}),
            200,
            "unknown session",
        ),
        (
            json!({"type": "checkout.session.completed", "object": {"id": session_id, "amount_total": 50000, "currency": "usd", "payment_status": "paid"}}),
            200,
            "amount differs",
        ),
    ] {
        let r = fake.post("/_fake/send", body.clone()).await;
        assert_eq!(r["delivery"]["status"], status, "{body}: {r}");
        assert!(
            r["delivery"]["body"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{says}: {r}"
        );
        assert_eq!(balance(&admin, id).await, NanoUsd::ZERO, "{body}");
    }
    assert_eq!(topups(&admin, id).await, 0);
}

async fn amounts_outside_the_offer_and_unverified_accounts_are_refused(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let (mut b, id) = customer(&admin, "eve@example.com").await;
    for (fields, says) in [
        (vec![("package_cents", "700")], "not one of the packages"),
        (vec![("amount_usd", "4.99")], "outside the allowed range"),
        (vec![("amount_usd", "1000.01")], "outside the allowed range"),
        (
            vec![("amount_usd", "10.005")],
            "not a whole number of cents",
        ),
        (vec![("amount_usd", "ten")], "is not an amount"),
        (
            vec![("amount_usd", "")],
            "Enter an amount from $5.00 to $1,000.00",
        ),
    ] {
        let r = b.submit("/credits", "/credits/checkout", &fields).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{fields:?}");
        assert!(r.body.contains(says), "{says}: {fields:?}");
    }
    assert!(no_payments(&admin, id).await);
    let made = admin.fake().get("/_fake/requests").await;
    assert_eq!(
        made.as_array().map(Vec::len),
        Some(0),
        "Stripe was never called"
    );

    let mut unverified = admin.browser([10, 0, 0, 9]);
    unverified.sign_up("new@example.com").await;
    let r = unverified
        .submit("/credits", "/credits/checkout", &[("package_cents", "500")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.body
            .contains("Verify your e-mail address before buying credits")
    );

    // Stripe down: a clear 503, nothing recorded.
    let cookie = b.cookie.clone();
    drop((b, unverified));
    let mut admin = admin;
    admin.stripe.as_mut().expect("fake").stop();
    let mut b2 = admin.browser([10, 0, 0, 1]);
    b2.cookie = cookie;
    let r = b2
        .submit("/credits", "/credits/checkout", &[("package_cents", "500")])
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("Nothing was charged"));
    assert!(no_payments(&admin, id).await);
}

#[tokio::test]
async fn with_stripe_off_the_credits_page_says_so() {
    let admin = Admin::new(Backend::Sqlite).await;
    let (mut b, _) = customer(&admin, "off@example.com").await;
    let page = b.get("/credits").await;
    assert!(
        page.body
            .contains("Payments are not set up on this relay yet")
    );
    let r = b
        .submit("/credits", "/credits/checkout", &[("package_cents", "500")])
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = b
        .send(
            axum::http::Request::post("/stripe/webhook")
                .body(axum::body::Body::from("{}"))
                .expect("req"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// A verified customer who paid `cents` through Checkout; returns the browser, the account id
/// and the payment intent.
async fn paid_customer<'a>(
    admin: &'a Admin,
    email: &str,
    cents: &str,
) -> (Browser<'a>, i64, String) {
    let (mut b, id) = customer(admin, email).await;
    let session = checkout(&mut b, &[("package_cents", cents)]).await;
    let r = admin
        .fake()
        .post(&format!("/_fake/pay/{session}"), json!({}))
        .await;
    assert_eq!(r["delivery"]["status"], 200, "{r}");
    let pi = r["event"]["data"]["object"]["payment_intent"]
        .as_str()
        .expect("pi")
        .to_owned();
    (b, id, pi)
}

/// A mail's text with quoted-printable soft line breaks undone and `=3D` read back.
fn unfolded(mail: &str) -> String {
    mail.replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=")
}

/// Posts the refund form.
async fn ask_refund(b: &mut Browser<'_>, usd: &str, reason: &str) -> support::admin::Resp {
    b.submit(
        "/refunds",
        "/refunds",
        &[("amount_usd", usd), ("reason", reason)],
    )
    .await
}

/// Spends credits as the gateway would (a usage entry).
async fn spend(admin: &Admin, id: i64, usd: &str) {
    admin
        .t
        .store
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: id,
            kind: LedgerKind::Usage,
            amount: format!("-{usd}").parse().expect("usd"),
            external_ref: format!("usage-{}", rand::random::<u64>()),
            actor: None,
            reason: None,
        })
        .await
        .expect("spend");
}

/// Waits until the fake has delivered every `charge.refunded` event (it sends them just after
/// answering the refund) and the admin answered each.
async fn refund_events_delivered(admin: &Admin, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = admin.fake().get("/_fake/events").await;
        let done: Vec<Value> = events
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["event"]["type"] == "charge.refunded")
            .filter(|e| {
                e["attempts"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["status"] == 200))
            })
            .cloned()
            .collect();
        if done.len() >= n {
            return done;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "charge.refunded not delivered: {events}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn refunds_of_unused_balance_are_reviewed_paid_back_and_taken_once(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let (mut b, id, pi) = paid_customer(&admin, "ann@example.com", "2000").await;
    spend(&admin, id, "5").await;

    let r = ask_refund(&mut b, "16", "not needed").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body.contains("at most your unused balance, $15.00"),
        "{}",
        r.body
    );
    let r = ask_refund(&mut b, "10", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = ask_refund(&mut b, "10", "project cancelled").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = ask_refund(&mut b, "1", "and more").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("already waiting for review"));
    assert_eq!(
        balance(&admin, id).await,
        "15".parse().expect("usd"),
        "nothing moves before review"
    );

    // A customer cannot decide; the operator can.
    let request_id = admin
        .t
        .store
        .refund_requests(Some(id), None, 10)
        .await
        .expect("list")[0]
        .id;
    let r = b
        .submit(
            "/refunds",
            &format!("/operator/refunds/{request_id}/approve"),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let mut op = admin.operator().await;
    let queue = op.get("/operator/refunds").await;
    assert!(queue.body.contains("project cancelled") && queue.body.contains("$10.00"));
    let r = op
        .submit(
            "/operator/refunds",
            &format!("/operator/refunds/{request_id}/approve"),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.location()),
        (StatusCode::SEE_OTHER, "/operator/refunds"),
        "{}",
        r.body
    );

    let request = admin
        .t
        .store
        .refund_request(request_id)
        .await
        .expect("request");
    assert_eq!(request.status, "approved");
    assert!(
        request
            .stripe_refunds
            .as_deref()
            .is_some_and(|r| r.starts_with("re_"))
    );
    let sent: Vec<Value> = admin
        .fake()
        .get("/_fake/requests")
        .await
        .as_array()
        .expect("list")
        .iter()
        .filter(|r| r["path"] == "/v1/refunds")
        .cloned()
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["params"]["payment_intent"], pi.as_str());
    assert_eq!(sent[0]["params"]["amount"], "1000");
    assert!(
        sent[0]["idempotency_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("refund-"))
    );
    // Stripe's own charge.refunded for our refund takes nothing more.
    refund_events_delivered(&admin, 1).await;
    assert_eq!(balance(&admin, id).await, "5".parse().expect("usd"));
    let refunds = admin
        .t
        .store
        .ledger(id, 100)
        .await
        .expect("ledger")
        .into_iter()
        .filter(|e| e.kind == LedgerKind::Refund)
        .count();
    assert_eq!(refunds, 1);

    // The mails keep the pages' promises, each with a text and an HTML part: the receipt of the
    // payment, the request received, the approval.
    let receipt = support::browser::poll("the receipt mail", support::browser::WAIT, || async {
        admin
            .mails_to("ann@example.com")
            .into_iter()
            .find(|m| m.contains("Subject: Receipt"))
    })
    .await;
    for part in [
        "$20.00",
        pi.as_str(),
        "Balance after",
        "/credits/receipts/cs_",
    ] {
        assert!(unfolded(&receipt).contains(part), "{part} in {receipt}");
    }
    for m in admin.mails_to("ann@example.com") {
        assert!(
            m.contains("Content-Type: text/plain") && m.contains("Content-Type: text/html"),
            "{m}"
        );
    }
    let mails = admin.mails_to("ann@example.com");
    let about = |needle: &str| {
        mails
            .iter()
            .filter(|m| unfolded(m).contains(needle))
            .count()
    };
    assert_eq!(about("Subject: We received your refund request"), 1);
    assert_eq!(about("Subject: Your refund of $10.00 is approved"), 1);
    // The credits page and the receipt show the refunded part.
    let credits = b.get("/credits").await;
    assert!(credits.body.contains("$10.00 refunded"), "{}", credits.body);
    let path = unfolded(&receipt);
    let at = path.find("/credits/receipts/").expect("link");
    let link: String = path[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "/_-".contains(*c))
        .collect();
    let page = b.get(&link).await;
    assert_eq!(page.status, StatusCode::OK, "{link}");
    assert!(
        page.body.contains("id=\"receipt-refunded\">$10.00"),
        "{}",
        page.body
    );
    let receipts = b.get("/credits/receipts").await;
    assert!(receipts.body.contains(pi.as_str()));
    // Another account's receipt is not found.
    let (mut other, _) = customer(&admin, "zed@example.com").await;
    assert_eq!(other.get(&link).await.status, StatusCode::NOT_FOUND);

    // Deciding twice is refused; the customer sees the outcome.
    let r = op
        .submit(
            "/operator/refunds",
            &format!("/operator/refunds/{request_id}/approve"),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("is approved, not pending"));
    let mine = b
        .json(Method::GET, "/api/v1/refunds", None, None)
        .await
        .json();
    assert_eq!(mine["data"][0]["status"], "approved");

    // A declined request says why and changes nothing.
    let csrf = b.get("/dashboard").await.csrf();
    let r = b
        .json(
            Method::POST,
            "/api/v1/refunds",
            Some(json!({"amount_cents": 300, "reason": "again"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let second = r.json()["id"].as_i64().expect("id");
    let r = op
        .submit(
            "/operator/refunds",
            &format!("/operator/refunds/{second}/decline"),
            &[("note", "")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = op
        .submit(
            "/operator/refunds",
            &format!("/operator/refunds/{second}/decline"),
            &[("note", "credits were used for the outage test")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(
        b.get("/refunds")
            .await
            .body
            .contains("credits were used for the outage test")
    );
    let declined = admin
        .mails_to("ann@example.com")
        .into_iter()
        .find(|m| m.contains("was declined"))
        .expect("the declined mail");
    assert!(unfolded(&declined).contains("credits were used for the outage test"));
    assert_eq!(balance(&admin, id).await, "5".parse().expect("usd"));
}

async fn refunds_and_disputes_made_in_stripe_are_taken_once(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let (_b, id, pi) = paid_customer(&admin, "bob@example.com", "2000").await;
    // A refund made in Stripe's dashboard (straight to the API, not through the relay).
    let r = admin
        .fake()
        .http
        .post(format!("{}/v1/refunds", admin.fake().url))
        .bearer_auth(STRIPE_KEY)
        .form(&[("payment_intent", pi.as_str()), ("amount", "250")])
        .send()
        .await
        .expect("refund");
    assert_eq!(r.status(), 200);
    let delivered = refund_events_delivered(&admin, 1).await;
    assert_eq!(balance(&admin, id).await, "17.50".parse().expect("usd"));
    let event_id = delivered[0]["event"]["id"].as_str().expect("id").to_owned();
    let again = admin
        .fake()
        .post(&format!("/_fake/redeliver/{event_id}"), json!({}))
        .await;
    assert_eq!(again["delivery"]["status"], 200);
    assert_eq!(
        balance(&admin, id).await,
        "17.50".parse().expect("usd"),
        "a redelivery takes nothing"
    );

    // A dispute for more than is left: the balance goes to zero, never below, and the shortfall
    // is in the audit log.
    let r = admin
        .fake()
        .post(&format!("/_fake/dispute/{pi}"), json!({"amount": 2000}))
        .await;
    assert_eq!(r["delivery"]["status"], 200, "{r}");
    assert_eq!(balance(&admin, id).await, NanoUsd::ZERO);
    let audit = admin.t.store.audit_log(id).await.expect("audit");
    assert!(
        audit.iter().any(|e| e.action == "balance.shortfall"
            && e.reason.as_deref().is_some_and(|r| r.contains("$2.50"))),
        "{audit:?}"
    );
    let dispute_event = r["event"]["id"].as_str().expect("id").to_owned();
    let again = admin
        .fake()
        .post(&format!("/_fake/redeliver/{dispute_event}"), json!({}))
        .await;
    assert_eq!(again["delivery"]["status"], 200);
    let entries = admin.t.store.ledger(id, 100).await.expect("ledger");
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.external_ref.starts_with("stripe:dispute:"))
            .count(),
        1
    );
    // An event for a payment we do not know changes nothing.
    let r = admin.fake().post("/_fake/send", json!({"type": "charge.refunded", "object": {"id": "ch_x", "object": "charge", "payment_intent": "pi_unknown", "amount": 500, "amount_refunded": 500}})).await;
    assert!(
        r["delivery"]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown payment")
    );
}

async fn a_refund_stripe_cannot_pay_gives_the_credits_back(backend: Backend) {
    let mut admin = Admin::with_stripe(backend).await;
    let id = {
        let (mut b, id, _) = paid_customer(&admin, "cat@example.com", "500").await;
        let r = ask_refund(&mut b, "5", "duplicate charge").await;
        assert_eq!(r.status, StatusCode::CREATED);
        id
    };
    admin.stripe.as_mut().expect("fake").stop();
    let request_id = admin
        .t
        .store
        .refund_requests(Some(id), None, 10)
        .await
        .expect("list")[0]
        .id;
    let mut op = admin.operator().await;
    let csrf = op.get("/operator/refunds").await.csrf();
    let r = op
        .json(
            Method::POST,
            &format!("/api/v1/operator/refunds/{request_id}/approve"),
            None,
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["status"], "failed");
    assert!(
        r.json()["note"]
            .as_str()
            .is_some_and(|n| n.contains("Stripe unreachable"))
    );
    assert_eq!(
        balance(&admin, id).await,
        "5".parse().expect("usd"),
        "the credits came back"
    );
    assert_eq!(
        admin
            .t
            .store
            .refundable_cents(id)
            .await
            .expect("refundable"),
        500
    );
}

async fn a_webhook_the_store_cannot_take_gets_a_5xx_and_stripes_retry_credits(backend: Backend) {
    let admin = Admin::with_stripe(backend).await;
    let fake = admin.fake();
    let (mut b, id) = customer(&admin, "dee@example.com").await;
    let session = checkout(&mut b, &[("package_cents", "500")]).await;
    // The store fails (a table it needs is gone for a moment).
    let pool = admin.t.store.pool();
    sqlx::query("ALTER TABLE stripe_events RENAME TO stripe_events_away")
        .execute(pool)
        .await
        .expect("rename");
    let r = fake.post(&format!("/_fake/pay/{session}"), json!({})).await;
    assert_eq!(r["delivery"]["status"], 500, "{r}");
    assert!(
        r["delivery"]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("deliver again")
    );
    assert_eq!(
        balance(&admin, id).await,
        NanoUsd::ZERO,
        "nothing half-written"
    );
    assert!(no_payments_paid(&admin, id).await);
    // The store is back; Stripe's own retries (the fake retries a failed delivery) credit once.
    sqlx::query("ALTER TABLE stripe_events_away RENAME TO stripe_events")
        .execute(pool)
        .await
        .expect("rename back");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while balance(&admin, id).await == NanoUsd::ZERO {
        assert!(
            std::time::Instant::now() < deadline,
            "a retry was not credited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(balance(&admin, id).await, "5".parse().expect("usd"));
    assert_eq!(topups(&admin, id).await, 1);
}

async fn no_payments_paid(admin: &Admin, id: i64) -> bool {
    let sessions = admin
        .t
        .store
        .checkout_sessions(id, 10)
        .await
        .expect("sessions");
    sessions.iter().all(|s| s.2 != "paid")
}
