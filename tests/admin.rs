//! The admin through `app(state)` (no socket) over real stores: sign-up, e-mail verification from
//! the outbox, log-in and log-out, password reset, CSRF, log-in limits, keys, the pages a
//! customer reads, and one account never reaching another's keys.

mod support;

use axum::http::{Method, StatusCode, header};
use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::{AccountRef, KeyStatus, UsageRecord};
use serde_json::json;
use support::admin::{Admin, PASSWORD, Resp, totp_at, unix_now};

support::on_both_stores!(
    sign_up_verify_from_the_outbox_log_out_and_in,
    sign_up_refuses_bad_input_and_changes_nothing,
    verification_links_that_are_tampered_expired_or_foreign_are_refused,
    forms_without_a_valid_csrf_token_are_refused,
    log_ins_are_limited_per_account_and_per_address,
    concurrent_guesses_cannot_slip_under_the_log_in_limit,
    the_log_in_redirects_only_to_paths_of_this_site,
    a_password_reset_ends_old_sessions_and_its_link_works_once,
    keys_are_shown_once_bounded_and_revocable,
    one_account_never_reaches_anothers_keys,
    the_json_api_signs_up_logs_in_and_manages_keys,
    usage_is_charted_filtered_paged_and_exported,
    the_usage_csv_streams_a_large_export,
    two_factor_enrols_and_guards_log_in_resets_and_sensitive_actions,
    operator_pages_stay_closed_until_two_factor_is_on,
    mails_tell_of_new_keys_status_changes_and_a_low_balance_once_per_crossing,
    the_operators_brand_and_policies_are_on_every_page_mail_and_error,
);

async fn sign_up_verify_from_the_outbox_log_out_and_in(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);

    let r = b.get("/signup").await;
    assert_eq!(r.status, StatusCode::OK);
    let cookie = r.headers["set-cookie"].to_str().expect("ascii");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert!(
        r.headers["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("default-src 'self'")
    );
    let anonymous = b.cookie.clone();

    b.sign_up("Ann@Example.com").await;
    assert_ne!(b.cookie, anonymous, "signing in rotates the session id");
    let dash = b.get("/dashboard?welcome=1").await;
    assert_eq!(dash.status, StatusCode::OK);
    assert!(dash.body.contains("ann@example.com"));
    assert!(
        dash.body.contains("verify-notice"),
        "unverified notice shown"
    );
    assert!(
        dash.body.contains("id=\"low-balance\""),
        "a zero balance is low"
    );

    let account = admin.account("ann@example.com").await;
    assert!(!account.is_verified());
    let stored = admin.t.store.password_hash(account.id).await.expect("hash");
    assert!(stored.is_some_and(|h| h.starts_with("$argon2id$")));

    // The link in the mail verifies the address.
    let link = admin.link_in_mail("ann@example.com", "/verify");
    let path = link.trim_start_matches("http://127.0.0.1:8081");
    let r = b.get(path).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("Your e-mail is verified"));
    let account = admin
        .t
        .store
        .account(&AccountRef::Id(account.id))
        .await
        .expect("account");
    assert!(account.is_verified());
    assert!(!b.get("/dashboard").await.body.contains("verify-notice"));

    // Credit a gateway holds for requests is still on the dashboard, with one line on what it is.
    admin
        .t
        .store
        .append_ledger(&duang::store::NewLedgerEntry {
            account_id: account.id,
            kind: duang::store::LedgerKind::TopUp,
            amount: "3".parse().expect("usd"),
            external_ref: "cs_dash".into(),
            actor: None,
            reason: None,
        })
        .await
        .expect("fund");
    admin
        .t
        .store
        .take_lease(account.id, "gw:1/1", "1".parse().expect("usd"))
        .await
        .expect("lease");
    let dash = b.get("/dashboard").await;
    assert!(dash.body.contains("$3.00"), "the whole credit");
    assert!(
        dash.body.contains(
            "id=\"held-note\"><span class=\"money\" title=\"Exactly $1.00\" data-exact=\"$1.00\">$1.00</span> of it is held"
        ),
        "{}",
        dash.body
    );
    admin
        .t
        .store
        .return_node_leases("gw:1/1")
        .await
        .expect("return");
    assert!(!b.get("/dashboard").await.body.contains("held-note"));

    // Log out: the session is gone, the dashboard sends us to log in.
    let csrf = b.get("/dashboard").await.csrf();
    let r = b.post_form("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(b.cookie.is_none(), "the cookie is cleared");
    let r = b.get("/dashboard").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/login?next=%2Fdashboard");

    // Log in again, landing where we were going; a foreign `next` is ignored.
    let r = b
        .submit(
            "/login",
            "/login",
            &[
                ("email", "ann@example.com"),
                ("password", PASSWORD),
                ("next", "/keys"),
            ],
        )
        .await;
    assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/keys"));
    let mut other = admin.browser([10, 0, 0, 2]);
    let r = other
        .submit(
            "/login",
            "/login",
            &[
                ("email", "ann@example.com"),
                ("password", PASSWORD),
                ("next", "//evil.example/x"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.location()),
        (StatusCode::SEE_OTHER, "/dashboard")
    );
}

async fn sign_up_refuses_bad_input_and_changes_nothing(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    for (email, password, status, message) in [
        (
            "not-an-email",
            PASSWORD,
            400,
            "Enter a valid e-mail address",
        ),
        // An address no mail can be sent to could never be verified.
        (
            "<script>alert(1)</script>@example.com",
            PASSWORD,
            400,
            "Enter a valid e-mail address",
        ),
        (
            "bob@example.com",
            "short1",
            400,
            "The password is too short",
        ),
        (
            "bob@example.com",
            "onlyletterslong",
            400,
            "The password is too weak",
        ),
    ] {
        let r = b
            .submit(
                "/signup",
                "/signup",
                &[("email", email), ("password", password)],
            )
            .await;
        assert_eq!(r.status.as_u16(), status, "{email} {password}");
        assert!(r.body.contains(message), "{message}: {}", r.body);
        assert!(
            b.get("/dashboard").await.status == StatusCode::SEE_OTHER,
            "not signed in"
        );
    }
    assert!(
        admin
            .t
            .store
            .search_accounts("", 10)
            .await
            .expect("list")
            .is_empty(),
        "nothing was created"
    );
    // The JSON API refuses it alike.
    let r = b
        .json(
            Method::POST,
            "/api/v1/signup",
            Some(json!({"email": "<script>alert(1)</script>@example.com", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // A new address and a taken one get the same answer: nobody learns which addresses have
    // accounts. The owner of the taken one gets a mail instead, and nothing changes.
    let mut first = admin.browser([10, 0, 0, 3]);
    let new = first.try_sign_up("bob@example.com").await;
    let mut again = admin.browser([10, 0, 0, 2]);
    let taken = again.try_sign_up("BOB@example.com").await;
    assert_eq!((new.status, taken.status), (StatusCode::OK, StatusCode::OK));
    let said = |r: &support::admin::Resp| {
        let at = r.body.find("id=\"signed-up\"").expect("the notice");
        r.body[at..at + 200].to_owned()
    };
    assert_eq!(said(&new), said(&taken));
    assert!(new.body.contains("Check your mailbox"));
    for r in [&new, &taken] {
        assert!(
            !r.headers.contains_key("location"),
            "no sign-in, no redirect"
        );
    }
    assert_eq!(
        again.get("/dashboard").await.status,
        StatusCode::SEE_OTHER,
        "sign-up signs nobody in"
    );
    let api = again
        .json(
            Method::POST,
            "/api/v1/signup",
            Some(json!({"email": "bob@example.com", "password": "another pass 77"})),
            None,
        )
        .await;
    assert_eq!(api.status, StatusCode::ACCEPTED, "{}", api.body);
    assert_eq!(api.json()["status"], "verification_sent");
    let mails = admin.mails_to("bob@example.com");
    assert_eq!(mails.len(), 3, "one verification mail, two notices");
    assert!(mails[0].contains("/verify?token="));
    for m in &mails[1..] {
        assert!(
            m.contains("already has one") && !m.contains("token="),
            "{m}"
        );
    }
    // The owner's password did not change.
    first.log_in("bob@example.com").await;
    assert_eq!(
        admin
            .t
            .store
            .search_accounts("", 10)
            .await
            .expect("list")
            .len(),
        1
    );
}

async fn verification_links_that_are_tampered_expired_or_foreign_are_refused(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("cat@example.com").await;
    let link = admin.link_in_mail("cat@example.com", "/verify");
    let token = link.split("token=").nth(1).expect("token").to_owned();
    let account = admin.account("cat@example.com").await;

    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let expired = admin.state.signer.link_token(
        "verify",
        account.id,
        duang::time::now_ms() - 1,
        &account.email,
    );
    let other_purpose = admin.state.signer.link_token(
        "reset",
        account.id,
        duang::time::now_ms() + 60_000,
        &account.email,
    );
    for (t, says) in [
        (tampered.as_str(), "not valid"),
        ("garbage", "not valid"),
        (expired.as_str(), "expired"),
        (other_purpose.as_str(), "not valid"),
    ] {
        let r = b.get(&format!("/verify?token={t}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{t}");
        assert!(r.body.contains(says), "{says}: {}", r.body);
    }
    let csrf = b.get("/dashboard").await.csrf();
    let r = b
        .json(
            Method::POST,
            "/api/v1/verify",
            Some(json!({"token": expired})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "token");
    let account = admin
        .t
        .store
        .account(&AccountRef::Id(account.id))
        .await
        .expect("account");
    assert!(!account.is_verified(), "no bad link verified anything");
}

async fn forms_without_a_valid_csrf_token_are_refused(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("dan@example.com").await;
    let mut other = admin.browser([10, 0, 0, 2]);
    let foreign = other.get("/signup").await.csrf();

    for fields in [
        vec![("name", "k")],
        vec![("name", "k"), ("csrf", foreign.as_str())],
    ] {
        let r = b.post_form("/keys", &fields).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(
            r.body
                .contains("This form has expired or came from another site")
        );
    }
    // A signed-in JSON call needs the header; a cross-site text/plain post is refused too.
    let r = b
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "k"})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    let r = b
        .send(
            axum::http::Request::post("/api/v1/login")
                .header("content-type", "text/plain")
                .body(axum::body::Body::from("{}"))
                .expect("req"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let account = admin.account("dan@example.com").await;
    assert!(
        admin
            .t
            .store
            .list_keys(account.id)
            .await
            .expect("keys")
            .is_empty()
    );
}

async fn log_ins_are_limited_per_account_and_per_address(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("eve@example.com").await;
    let mut attacker = admin.browser([10, 0, 0, 66]);
    for _ in 0..5 {
        let r = attacker
            .submit(
                "/login",
                "/login",
                &[
                    ("email", "eve@example.com"),
                    ("password", "wrong password 1"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.body.contains("The e-mail or the password is wrong."));
    }
    // Now even the right password waits, from any address.
    let mut owner = admin.browser([10, 0, 0, 2]);
    let r = owner
        .submit(
            "/login",
            "/login",
            &[("email", "eve@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.body.contains("Too many failed log-ins for this account"));

    // Per address: 30 attempts over any accounts, then the address waits.
    let mut sprayer = admin.browser([10, 0, 0, 99]);
    for i in 0..30 {
        let email = format!("nobody{i}@example.com");
        let r = sprayer
            .submit(
                "/login",
                "/login",
                &[("email", &email), ("password", "wrong password 1")],
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = sprayer
        .json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "x@example.com", "password": "y"})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json()["error"]["code"], "too_many_attempts");
}

async fn a_password_reset_ends_old_sessions_and_its_link_works_once(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("fay@example.com").await;
    let mut stranger = admin.browser([10, 0, 0, 2]);
    for email in ["fay@example.com", "nobody@example.com"] {
        let r = stranger
            .submit("/password/forgot", "/password/forgot", &[("email", email)])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.body.contains("If an account uses that address"),
            "same answer for both"
        );
    }
    assert!(admin.mails_to("nobody@example.com").is_empty());
    let link = admin.link_in_mail("fay@example.com", "/password/reset");
    let path = link.trim_start_matches("http://127.0.0.1:8081");
    let token = path.split("token=").nth(1).expect("token").to_owned();

    let r = stranger
        .submit(
            path,
            "/password/reset",
            &[("token", &token), ("password", "short")],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "a weak new password is refused"
    );
    let r = stranger
        .submit(
            path,
            "/password/reset",
            &[("token", &token), ("password", "brand new pass 7")],
        )
        .await;
    assert_eq!(
        (r.status, r.location()),
        (StatusCode::SEE_OTHER, "/login?reset=1")
    );

    // The old session ended; the old password is gone; the link cannot be used twice.
    assert_eq!(b.get("/dashboard").await.status, StatusCode::SEE_OTHER);
    let r = stranger
        .submit(
            "/login",
            "/login",
            &[("email", "fay@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = stranger
        .submit(
            path,
            "/password/reset",
            &[("token", &token), ("password", "another pass 8")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("already been used"));
    let r = stranger
        .submit(
            "/login",
            "/login",
            &[
                ("email", "fay@example.com"),
                ("password", "brand new pass 7"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let account = admin.account("fay@example.com").await;
    assert!(
        account.is_verified(),
        "a reset from the mailbox proves the address"
    );
}

async fn keys_are_shown_once_bounded_and_revocable(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("gus@example.com").await;
    let r = b
        .submit(
            "/keys",
            "/keys",
            &[
                ("name", "my app"),
                ("expires_in_days", "30"),
                ("requests_per_minute", "60"),
                ("spend_cap_usd", "25.50"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let at = r.body.find("sk-relay_").expect("the key is shown");
    let plaintext: String = r.body[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    assert_eq!(plaintext.len(), "sk-relay_".len() + 40);
    let listed = b.get("/keys").await;
    assert!(!listed.body.contains(&plaintext), "never shown again");
    assert!(
        listed.body.contains(&plaintext[..15]),
        "the prefix is shown"
    );

    let stored = admin
        .t
        .store
        .key_by_hash(&duang::keys::hash(&plaintext))
        .await
        .expect("lookup")
        .expect("stored by its hash");
    assert_eq!(stored.name, "my app");
    assert_eq!(stored.limits.requests_per_minute, Some(60));
    assert_eq!(stored.spend_cap, Some("25.50".parse().expect("usd")));
    assert!(stored.expires_at.is_some());

    for (field, value, says) in [
        ("name", "", "Give the key a name"),
        (
            "requests_per_minute",
            "6001",
            "Requests per minute must be a whole number from 1 to 6000",
        ),
        ("requests_per_minute", "0", "from 1 to"),
        (
            "expires_in_days",
            "366",
            "Expiry in days must be a whole number from 1 to 365",
        ),
        (
            "spend_cap_usd",
            "0.001",
            "The spend cap must be an amount in dollars and cents",
        ),
        ("spend_cap_usd", "-5", "The spend cap"),
    ] {
        let mut fields = vec![("name", "x")];
        fields.retain(|(k, _)| *k != field);
        fields.push((field, value));
        let r = b.submit("/keys", "/keys", &fields).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}={value}");
        assert!(r.body.contains(says), "{says}: {field}={value}");
    }
    assert_eq!(
        admin
            .t
            .store
            .list_keys(stored.account_id)
            .await
            .expect("keys")
            .len(),
        1,
        "no bad request made a key"
    );

    let r = b
        .submit("/keys", &format!("/keys/{}/revoke", stored.id), &[])
        .await;
    assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/keys"));
    let key = admin.t.store.key(stored.id).await.expect("key");
    assert_eq!(key.status, KeyStatus::Revoked);
    let audit = admin
        .t
        .store
        .audit_log(stored.account_id)
        .await
        .expect("audit");
    assert!(
        audit
            .iter()
            .any(|e| e.action == "key.revoke" && e.key_id == Some(stored.id))
    );
}

async fn one_account_never_reaches_anothers_keys(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut a = admin.browser([10, 0, 0, 1]);
    a.sign_up("a@example.com").await;
    let csrf_a = a.get("/dashboard").await.csrf();
    let r = a
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "a's key"})),
            Some(&csrf_a),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let key_id = r.json()["id"].as_i64().expect("id");

    let mut b = admin.browser([10, 0, 0, 2]);
    b.sign_up("b@example.com").await;
    let csrf_b = b.get("/dashboard").await.csrf();
    let r = b.json(Method::GET, "/api/v1/keys", None, None).await;
    assert_eq!(r.json()["data"], json!([]), "B lists only B's keys");
    let r = b
        .json(
            Method::POST,
            &format!("/api/v1/keys/{key_id}/revoke"),
            None,
            Some(&csrf_b),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "not 403: ids are not probeable"
    );
    let r = b
        .submit("/keys", &format!("/keys/{key_id}/revoke"), &[])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!b.get("/keys").await.body.contains("a&#39;s key"));
    assert_eq!(
        admin.t.store.key(key_id).await.expect("key").status,
        KeyStatus::Active
    );
    // Anonymous callers reach nothing.
    let mut anon = admin.browser([10, 0, 0, 3]);
    let r = anon.json(Method::GET, "/api/v1/keys", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anon.get("/keys").await.status, StatusCode::SEE_OTHER);
}

async fn the_json_api_signs_up_logs_in_and_manages_keys(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    let r = b
        .json(
            Method::POST,
            "/api/v1/signup",
            Some(json!({"email": "hal@example.com", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.json()["status"], "verification_sent");
    assert_eq!(
        b.json(Method::GET, "/api/v1/me", None, None).await.status,
        StatusCode::UNAUTHORIZED,
        "sign-up signs nobody in"
    );
    let r = b
        .json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "hal@example.com", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["account"]["email"], "hal@example.com");
    assert_eq!(v["account"]["email_verified"], false);
    assert_eq!(v["account"]["balance_usd"], "0.00");
    let csrf = v["csrf_token"].as_str().expect("token").to_owned();

    let r = b
        .json(Method::POST, "/api/v1/logout", None, Some(&csrf))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        b.json(Method::GET, "/api/v1/me", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = b
        .json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "hal@example.com", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let csrf = r.json()["csrf_token"].as_str().expect("token").to_owned();
    let me = b.json(Method::GET, "/api/v1/me", None, None).await.json();
    assert_eq!(me["account"]["email"], "hal@example.com");
    assert_eq!(me["csrf_token"], csrf.as_str());

    let r = b
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "ci", "tokens_per_minute": 1000, "in_flight": "4"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let k = r.json();
    assert!(k["key"].as_str().expect("key").starts_with("sk-relay_"));
    assert_eq!(k["tokens_per_minute"], 1000);
    assert_eq!(k["in_flight"], 4);
    let listed = b.json(Method::GET, "/api/v1/keys", None, None).await.json();
    assert_eq!(listed["data"].as_array().expect("list").len(), 1);
    assert!(
        listed["data"][0].get("key").is_none(),
        "the plaintext is never listed"
    );
    let r = b
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "bad", "in_flight": 100000})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "in_flight");
    let id = k["id"].as_i64().expect("id");
    let r = b
        .json(
            Method::POST,
            &format!("/api/v1/keys/{id}/revoke"),
            None,
            Some(&csrf),
        )
        .await;
    assert_eq!(r.json()["status"], "revoked");
    let r = b
        .json(Method::GET, "/api/v1/requests?limit=0", None, None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = b.json(Method::GET, "/api/v1/requests", None, None).await;
    assert_eq!(r.json()["data"], json!([]));
}

#[tokio::test]
async fn public_pages_show_the_conf_prices_the_base_url_and_the_policies() {
    let admin = Admin::new(Backend::Sqlite).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    let pricing = b.get("/pricing").await;
    assert_eq!(pricing.status, StatusCode::OK);
    for t in &admin.state.conf.tiers {
        assert!(pricing.body.contains(&format!("<code>{}</code>", t.name)));
        assert!(pricing.body.contains(&format!(
            "${} / 1M tokens",
            t.prices.input.usd_per_mtok_string()
        )));
    }
    assert!(
        pricing.body.contains("$0.12 / 1M tokens") && pricing.body.contains("$18.00 / 1M tokens")
    );
    let qs = b.get("/quickstart").await;
    assert!(qs.body.contains("OPENAI_BASE_URL=http://127.0.0.1:8080/v1"));
    assert!(
        qs.body
            .contains("curl http://127.0.0.1:8080/v1/chat/completions")
    );
    for (slug, text) in [
        (
            "terms",
            "Customers are responsible for keeping API keys secure",
        ),
        ("privacy", "Payment processing is handled by Stripe."),
        (
            "refunds",
            "Prepaid credits are generally refundable only for unused balances",
        ),
        (
            "acceptable-use",
            "We may throttle, suspend, or terminate accounts and API keys",
        ),
    ] {
        let r = b.get(&format!("/policies/{slug}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.contains(text), "{slug}");
        assert!(r.body.contains("support@duang-duang.com"));
    }
    assert_eq!(b.get("/policies/nope").await.status, StatusCode::NOT_FOUND);
    let r = b.get("/api/v1/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
    assert_eq!(b.get("/static/app.css").await.status, StatusCode::OK);
}

fn record(
    account_id: i64,
    key_id: i64,
    n: i64,
    day_ms: i64,
    tier: &str,
    status: i64,
) -> UsageRecord {
    UsageRecord {
        request_id: format!("req-{account_id}-{n}"),
        account_id,
        key_id,
        tier: tier.into(),
        provider: Some("mock".into()),
        upstream_model: Some("mock-small".into()),
        stream: n % 2 == 0,
        input_tokens: 10,
        output_tokens: if status == 200 { 5 } else { 0 },
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        provider_cost: NanoUsd::from_nanos(100),
        billed: NanoUsd::from_nanos(if status == 200 {
            1_000_000 * (n + 1)
        } else {
            0
        }),
        http_status: status,
        error_code: (status != 200).then(|| "=upstream_unavailable".to_owned()),
        attempts: 1,
        latency_ms: 40,
        ttft_ms: Some(12),
        started_at: day_ms + n * 1000,
        finished_at: day_ms + n * 1000 + 40,
    }
}

async fn usage_is_charted_filtered_paged_and_exported(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("ivy@example.com").await;
    let me = admin.account("ivy@example.com").await;
    let (_, key_a) = support::new_key(&admin.t.store, me.id).await;
    let (_, key_b) = support::new_key(&admin.t.store, me.id).await;
    let day1 = duang::time::parse_date("2026-11-01").expect("date");
    let day2 = duang::time::parse_date("2026-11-03").expect("date");
    let mut records = Vec::new();
    for n in 0..6 {
        let (day, tier, key) = if n < 4 {
            (day1, "budget", key_a)
        } else {
            (day2, "premium", key_b)
        };
        records.push(record(
            me.id,
            key,
            n,
            day,
            tier,
            if n == 3 { 502 } else { 200 },
        ));
    }
    // Someone else's usage, on the same days, never shows.
    let other = admin
        .t
        .store
        .create_account(&duang::store::NewAccount {
            email: "other@example.com".into(),
            password_hash: None,
            role: duang::store::Role::Customer,
            verified: true,
        })
        .await
        .expect("account");
    let (_, key_o) = support::new_key(&admin.t.store, other.id).await;
    records.push(record(other.id, key_o, 0, day1, "budget", 200));
    admin
        .t
        .store
        .insert_usage_batch(&records)
        .await
        .expect("usage");

    let range = "from=2026-11-01&to=2026-11-03";
    let daily = b
        .json(
            Method::GET,
            &format!("/api/v1/usage/daily?{range}"),
            None,
            None,
        )
        .await
        .json();
    assert_eq!(daily["from"], "2026-11-01");
    assert_eq!(daily["to"], "2026-11-03");
    // Budget: 1 + 2 + 3 millionths... in nano-USD 1e6*(n+1) for n = 0, 1, 2 (n = 3 failed, free).
    assert_eq!(
        daily["data"],
        json!([
            {"date": "2026-11-01", "tier": "budget", "requests": 4, "input_tokens": 40, "output_tokens": 15, "billed_usd": "0.006"},
            {"date": "2026-11-03", "tier": "premium", "requests": 2, "input_tokens": 20, "output_tokens": 10, "billed_usd": "0.011"},
        ])
    );
    assert_eq!(daily["total_billed_usd"], "0.017");

    let get = |q: String| {
        let mut bb = admin.browser([10, 0, 0, 1]);
        bb.cookie = b.cookie.clone();
        async move {
            bb.json(Method::GET, &format!("/api/v1/requests?{q}"), None, None)
                .await
        }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|r| r["request_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let all = get(range.to_owned()).await.json();
    assert_eq!(ids(&all).len(), 6, "only this account's records");
    assert_eq!(
        ids(&get(format!("{range}&tier=premium")).await.json()),
        ["req-{}-5", "req-{}-4"].map(|f| f.replace("{}", &me.id.to_string()))
    );
    let failed = get(format!("{range}&status=error")).await.json();
    assert_eq!(ids(&failed), [format!("req-{}-3", me.id)]);
    assert_eq!(
        get(format!("{range}&status=502")).await.json()["data"],
        failed["data"]
    );
    assert_eq!(
        ids(&get(format!("{range}&key_id={key_b}")).await.json()).len(),
        2
    );
    assert_eq!(
        ids(&get("from=2026-11-02&to=2026-11-02".into()).await.json()).len(),
        0
    );
    // Pages of two, newest first, with a cursor.
    let p1 = get(format!("{range}&limit=2")).await.json();
    let cursor = p1["next_before_ms"].as_i64().expect("cursor");
    let p2 = get(format!("{range}&limit=2&before_ms={cursor}"))
        .await
        .json();
    let mut both = ids(&p1);
    both.extend(ids(&p2));
    assert_eq!(both, ids(&all)[..4]);
    for (q, field) in [
        ("from=2026-13-01", "from"),
        ("tier=nope", "tier"),
        ("status=teapot", "status"),
        ("from=2026-11-05&to=2026-11-01", "from"),
        ("limit=501", "limit"),
    ] {
        let r = get(q.into()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(r.json()["error"]["field"], field, "{q}");
    }

    let page = b.get(&format!("/usage?{range}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("id=\"usage-chart\""));
    assert_eq!(
        page.body.matches("<rect x=").count(),
        2,
        "one bar segment per day and tier"
    );
    assert!(page.body.contains("$0.017"), "the range's total");
    let csv = b.get(&format!("/usage.csv?{range}&tier=budget")).await;
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    assert!(
        csv.headers["content-disposition"]
            .to_str()
            .expect("ascii")
            .contains("duang-usage-2026-11-01-to-2026-11-03.csv")
    );
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines.len(), 5, "{}", csv.body);
    assert!(lines[0].starts_with("started_at_utc,request_id,key_id,tier"));
    assert!(
        lines.iter().any(|l| l.contains(",'=upstream_unavailable,")),
        "formulas are defused"
    );
    assert!(!csv.body.contains("other@"), "nothing of the other account");
    let dash = b.get("/dashboard").await;
    assert!(dash.body.contains("id=\"usage-chart\""));

    // Spend per key and per tier for the chosen period (90 days takes in both days).
    let table = |body: &str, id: &str| {
        let at = body
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id}"));
        body[at..at + body[at..].find("</table>").expect("end")].to_owned()
    };
    let dash = b.get("/dashboard?days=90").await;
    assert!(dash.body.contains("Spend, last 90 days"));
    let tiers = table(&dash.body, "spend-by-tier");
    let budget = tiers.find("budget").expect("budget");
    let premium = tiers.find("premium").expect("premium");
    assert!(premium < budget, "most spent first: {tiers}");
    assert!(tiers.contains("<td>2</td><td>$0.011</td>"), "{tiers}");
    assert!(tiers.contains("<td>4</td><td>$0.006</td>"), "{tiers}");
    let keys = table(&dash.body, "spend-by-key");
    assert_eq!(
        keys.matches("<tr>").count(),
        3,
        "a header and two keys: {keys}"
    );
    assert!(!keys.contains("$0.00000"), "{keys}");
    let short = b.get("/dashboard?days=7").await;
    assert!(short.body.contains("No requests in this period."));
    // The keys page: this month's spend per key (one request of $0.01 today on the first key).
    admin
        .t
        .store
        .insert_usage_batch(&[record(
            me.id,
            key_a,
            9,
            duang::time::now_ms() - 60_000,
            "budget",
            200,
        )])
        .await
        .expect("usage");
    let page = b.get("/keys").await;
    assert!(page.body.contains("Spent this month"));
    assert!(
        page.body.contains("<td class=\"spent\">$0.01"),
        "{}",
        page.body
    );
}

/// The request log's CSV goes out as it is read: the header at once, then rows in batches (no
/// `Content-Length`, many body frames), every row of the range once, newest first.
async fn the_usage_csv_streams_a_large_export(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 7]);
    b.sign_up("una@example.com").await;
    let me = admin.account("una@example.com").await;
    let (_, key) = support::new_key(&admin.t.store, me.id).await;
    let day = duang::time::parse_date("2026-11-02").expect("day");
    let records: Vec<UsageRecord> = (0..1500)
        .map(|n| record(me.id, key, n, day + n * 10, "budget", 200))
        .collect();
    admin
        .t
        .store
        .insert_usage_batch(&records)
        .await
        .expect("usage");
    // A record the day after: outside the range.
    admin
        .t
        .store
        .insert_usage_batch(&[record(me.id, key, 5000, day + 86_400_000, "budget", 200)])
        .await
        .expect("usage");
    let (status, headers, frames) = b
        .get_frames("/usage.csv?from=2026-11-02&to=2026-11-02")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get(header::CONTENT_LENGTH).is_none(), "{headers:?}");
    assert!(
        frames.len() >= 5,
        "streamed in batches: {} frames",
        frames.len()
    );
    assert!(frames[0].starts_with(b"started_at_utc,request_id,"));
    let body = String::from_utf8(frames.concat()).expect("utf-8");
    let ids: Vec<&str> = body
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).expect("request id"))
        .collect();
    let expected: Vec<String> = (0..1500)
        .rev()
        .map(|n| format!("req-{}-{n}", me.id))
        .collect();
    assert_eq!(ids, expected);
}

/// With SMTP on, mails go to the relay over SMTP (logged in with the conf's credentials); when
/// the relay is down, sign-up still works and sending again says what happened.
#[tokio::test]
async fn mails_go_out_over_smtp_when_it_is_on() {
    let smtp = support::smtp::SmtpFake::start().await;
    let port = smtp.port;
    let admin = Admin::with_conf(Backend::Sqlite, |t| {
        t.replace("[smtp]\nenabled = false", "[smtp]\nenabled = true")
            .replace("host = \"smtp.example.com\"", "host = \"127.0.0.1\"")
            .replace("port = 587", &format!("port = {port}"))
            .replace("tls = \"starttls\"", "tls = \"none\"")
    })
    .await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("ivy@example.com").await;
    let got = smtp.received();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.to, ["<ivy@example.com>"]);
    assert_eq!(m.from, "<no-reply@duang-duang.com>");
    assert_eq!(m.auth.as_deref(), Some("relay-mailer:smtp-secret"));
    assert!(m.data.contains("Subject: Confirm your e-mail address"));
    assert!(!admin.outbox.exists(), "nothing written to the outbox");
    let text = m.data.replace("=\r\n", "").replace("=3D", "=");
    let at = text.find("/verify?token=").expect("link");
    let path: String = text[at..]
        .split_whitespace()
        .next()
        .expect("link")
        .to_owned();
    let r = b.get(&path).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(admin.account("ivy@example.com").await.is_verified());

    // The relay goes away: a new sign-up still works; a resend says the mail could not go.
    drop(smtp);
    let mut c = admin.browser([10, 0, 0, 2]);
    c.sign_up("jay@example.com").await;
    let r = c.submit("/dashboard", "/verify/resend", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("We could not send the mail right now"));
}

/// Twelve wrong passwords for one account at once, from twelve addresses: the limit is taken
/// before each password is hashed, so five are checked and the rest wait (the limit was read
/// before hashing and counted after, and all twelve were checked).
async fn concurrent_guesses_cannot_slip_under_the_log_in_limit(backend: Backend) {
    let admin = Admin::new(backend).await;
    admin
        .browser([10, 0, 0, 1])
        .sign_up("gil@example.com")
        .await;
    let mut attackers: Vec<_> = (0..12u8).map(|i| admin.browser([10, 0, 1, i])).collect();
    let guesses = attackers.iter_mut().map(|b| {
        b.json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "gil@example.com", "password": "wrong password 1"})),
            None,
        )
    });
    let answers = futures_util::future::join_all(guesses).await;
    let checked = answers
        .iter()
        .filter(|r| r.status == StatusCode::UNAUTHORIZED)
        .count();
    let waiting = answers
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((checked, waiting), (5, 7));
}

/// `next` is followed only to a path of this site; every other form goes to the dashboard, and
/// none is an error.
async fn the_log_in_redirects_only_to_paths_of_this_site(backend: Backend) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("hal@example.com").await;
    for (next, to) in [
        ("%2Fkeys", "/keys"),
        ("%2Fusage%3Ftier%3Dbudget", "/usage?tier=budget"),
        ("https%3A%2F%2Fevil.example", "/dashboard"),
        ("%2F%2Fevil.example", "/dashboard"),
        ("%2F%5Cevil.example", "/dashboard"),
        ("%2F%09%2Fevil.example%2Fx", "/dashboard"),
        ("%0A%2Fx", "/dashboard"),
        ("%2F%0D%0ASet-Cookie%3A%20x%3D1", "/dashboard"),
        ("%2Fcaf%C3%A9", "/dashboard"),
        ("evil.example", "/dashboard"),
    ] {
        let r = b.get(&format!("/login?next={next}")).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "next={next}");
        assert_eq!(r.location(), to, "next={next}");
    }
}

/// The text of the element with `id` (its first text node), for short values on a page.
fn text_of(r: &Resp, id: &str) -> String {
    let at = r
        .body
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {}", r.body));
    let rest = &r.body[at..];
    let start = rest.find('>').expect("tag end") + 1;
    let end = rest[start..].find('<').expect("text end");
    rest[start..start + end].trim().to_owned()
}

/// The recovery codes on the page that shows them once.
fn recovery_codes(r: &Resp) -> Vec<String> {
    let at = r.body.find("id=\"recovery-codes\"").expect("codes");
    let list = &r.body[at..r.body[at..].find("</ul>").expect("end") + at];
    list.split("<code>")
        .skip(1)
        .map(|c| c[..c.find('<').expect("end")].to_owned())
        .collect()
}

/// TOTP enrolment through the pages, log-in with a code (a replayed and an older code refused,
/// one step of clock skew accepted), recovery codes that work once, the second factor before
/// sensitive actions (asked every time here: `two_factor_reauth_minutes = 0`), a password
/// reset that needs the code too, and turning it off. Codes are computed by `totp-rs`.
async fn two_factor_enrols_and_guards_log_in_resets_and_sensitive_actions(backend: Backend) {
    let admin = Admin::with_conf(backend, |t| {
        t.replace(
            "two_factor_reauth_minutes = 10",
            "two_factor_reauth_minutes = 0",
        )
    })
    .await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("ivy@example.com").await;
    let mut earlier = admin.browser([10, 0, 0, 9]);
    earlier.log_in("ivy@example.com").await;
    let page = b.get("/account/security").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Off."), "{}", page.body);

    // Enrol: the secret as a QR code and as text; a wrong code keeps the set-up waiting.
    let setup = b
        .submit("/account/security", "/account/2fa/setup", &[])
        .await;
    assert_eq!(setup.status, StatusCode::OK, "{}", setup.body);
    assert!(setup.body.contains("<svg"), "a QR code");
    let secret = text_of(&setup, "totp-secret").replace(' ', "");
    assert_eq!(secret.len(), 32);
    let csrf = setup.csrf();
    let r = b
        .post_form(
            "/account/2fa/enable",
            &[("csrf", &csrf), ("totp_code", "000000")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("does not match"), "{}", r.body);
    assert_eq!(text_of(&r, "totp-secret").replace(' ', ""), secret);
    let t0 = unix_now();
    let r = b
        .post_form(
            "/account/2fa/enable",
            &[("csrf", &csrf), ("totp_code", &totp_at(&secret, t0))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let codes = recovery_codes(&r);
    assert_eq!(codes.len(), 10);
    assert_eq!(
        earlier.get("/dashboard").await.status,
        StatusCode::SEE_OTHER,
        "a browser signed in with the password alone is signed out"
    );
    assert_eq!(
        b.get("/dashboard").await.status,
        StatusCode::OK,
        "this one stays"
    );
    let page = b.get("/account/security").await;
    assert!(page.body.contains("On."));
    assert_eq!(text_of(&page, "recovery-left"), "10");

    // Log-in: the password alone leads to the code form, not to a session.
    b.submit("/dashboard", "/logout", &[]).await;
    let form = b
        .submit(
            "/login",
            "/login",
            &[("email", "ivy@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("Enter your authentication code"));
    assert_eq!(b.get("/dashboard").await.status, StatusCode::SEE_OTHER);
    // The code the enrolment used (same step) is a replay; the step before is older; both no.
    for used in [totp_at(&secret, t0), totp_at(&secret, t0 - 30)] {
        let r = b.enter_code(&form, &used).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{used}: {}", r.body);
        assert!(r.body.contains("used already"), "{}", r.body);
    }
    // A ticket from another browser is refused.
    let mut thief = admin.browser([10, 0, 0, 66]);
    let own_csrf = thief.get("/login").await.csrf();
    let stolen = thief
        .post_form(
            "/login/code",
            &[
                ("csrf", own_csrf.as_str()),
                (
                    "ticket",
                    support::admin::hidden(&form.body, "ticket").as_str(),
                ),
                ("totp_code", totp_at(&secret, t0 + 30).as_str()),
            ],
        )
        .await;
    assert_eq!(stolen.status, StatusCode::UNAUTHORIZED, "{}", stolen.body);
    // A phone one step ahead (the next step's code) is accepted.
    let r = b.enter_code(&form, &totp_at(&secret, t0 + 30)).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(b.get("/dashboard").await.status, StatusCode::OK);

    // Sensitive actions ask for a code (every time with reauth 0); a recovery code does.
    let r = b.submit("/keys", "/keys", &[("name", "no code")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(r.body.contains("Enter the 6-digit code"), "{}", r.body);
    assert!(
        r.body.contains("name=\"totp_code\""),
        "the form asks for it"
    );
    let r = b
        .submit(
            "/keys",
            "/keys",
            &[("name", "with code"), ("totp_code", &codes[0])],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let again = b
        .submit(
            "/keys",
            "/keys",
            &[("name", "spent code"), ("totp_code", &codes[0])],
        )
        .await;
    assert_eq!(
        again.status,
        StatusCode::BAD_REQUEST,
        "a recovery code works once"
    );
    let csrf = b.get("/keys").await.csrf();
    let r = b
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "api"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "two_factor_required");
    assert_eq!(r.json()["error"]["field"], "totp_code");
    let r = b
        .json(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"name": "api", "totp_code": codes[1]})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = b
        .json(
            Method::POST,
            "/api/v1/refunds",
            Some(json!({"amount_cents": 100, "reason": "test"})),
            Some(&csrf),
        )
        .await;
    assert_eq!(r.json()["error"]["code"], "two_factor_required");
    let r = b
        .submit(
            "/account/security",
            "/account/password",
            &[
                ("current_password", PASSWORD),
                ("new_password", "a new password 9"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);

    // The JSON log-in wants the code too; two log-ins racing with one recovery code: one wins.
    let mut api = admin.browser([10, 0, 0, 2]);
    let r = api
        .json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "ivy@example.com", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "two_factor_required");
    let mut racers: Vec<_> = (0..4u8).map(|i| admin.browser([10, 0, 2, i])).collect();
    let tries = racers.iter_mut().map(|b| {
        b.json(
            Method::POST,
            "/api/v1/login",
            Some(json!({"email": "ivy@example.com", "password": PASSWORD, "totp_code": codes[2]})),
            None,
        )
    });
    let answers = futures_util::future::join_all(tries).await;
    let ok = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(ok, 1, "one recovery code, one log-in");

    // A password reset from the mailbox alone does not change the password of a 2FA account.
    let mut reset = admin.browser([10, 0, 0, 3]);
    reset
        .submit(
            "/password/forgot",
            "/password/forgot",
            &[("email", "ivy@example.com")],
        )
        .await;
    let link = admin.link_in_mail("ivy@example.com", "/password/reset");
    let token = link.split("token=").nth(1).expect("token").to_owned();
    let token = url::form_urlencoded::parse(format!("t={token}").as_bytes())
        .next()
        .expect("t")
        .1
        .into_owned();
    let r = reset
        .submit(
            &link,
            "/password/reset",
            &[("token", &token), ("password", "a new password 9")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = reset
        .submit(
            &link,
            "/password/reset",
            &[
                ("token", &token),
                ("password", "a new password 9"),
                ("totp_code", &codes[3]),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);

    // Turning it off takes a code; afterwards the password alone logs in.
    let mut c = admin.browser([10, 0, 0, 4]);
    let form = c
        .submit(
            "/login",
            "/login",
            &[
                ("email", "ivy@example.com"),
                ("password", "a new password 9"),
            ],
        )
        .await;
    let r = c.enter_code(&form, &codes[4]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let r = c
        .submit(
            "/account/security",
            "/account/2fa/disable",
            &[("totp_code", "123456")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = c
        .submit(
            "/account/security",
            "/account/2fa/disable",
            &[("totp_code", &codes[5])],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("Two-factor authentication is off."));
    let audit = admin
        .t
        .store
        .audit_log(admin.account("ivy@example.com").await.id)
        .await
        .expect("audit");
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    for a in [
        "account.two_factor_enabled",
        "account.recovery_code_used",
        "account.two_factor_disabled",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    let r = c
        .submit("/account/security", "/keys", &[("name", "no 2FA now")])
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "no code needed with 2FA off");
}

/// An operator without 2FA is sent to enrol before any operator page or API call; with it (and
/// a session that passed it) they open, and the operator cannot turn it off.
async fn operator_pages_stay_closed_until_two_factor_is_on(backend: Backend) {
    let admin = Admin::new(backend).await;
    let op = admin
        .t
        .store
        .create_account(&duang::store::NewAccount {
            email: "boss@example.com".into(),
            password_hash: Some(duang::password::hash(PASSWORD)),
            role: duang::store::Role::Operator,
            verified: true,
        })
        .await
        .expect("operator");
    let mut b = admin.browser([10, 0, 0, 1]);
    b.log_in("boss@example.com").await;
    let r = b.get("/operator").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/account/security?required=operator");
    let r = b.get("/account/security?required=operator").await;
    assert!(
        r.body
            .contains("Operator pages open once two-factor authentication is on")
    );
    let r = b
        .json(Method::GET, "/api/v1/operator/accounts", None, None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("two-factor")
    );

    let setup = b
        .submit("/account/security", "/account/2fa/setup", &[])
        .await;
    let secret = text_of(&setup, "totp-secret").replace(' ', "");
    let r = b
        .post_form(
            "/account/2fa/enable",
            &[
                ("csrf", &setup.csrf()),
                ("totp_code", &totp_at(&secret, unix_now())),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(b.get("/operator").await.status, StatusCode::OK);
    let r = b
        .submit(
            "/account/security",
            "/account/2fa/disable",
            &[("totp_code", &recovery_codes(&r)[0])],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(
        admin
            .t
            .store
            .two_factor(op.id)
            .await
            .expect("2fa")
            .is_some_and(|t| t.enabled())
    );
}

/// The notices that follow an action: a key created, the account suspended and reactivated
/// (with the operator's reason), and a low balance, mailed once per crossing below
/// `admin.low_balance_warning_cents` ($1.00 shipped), each with a text and an HTML part.
async fn mails_tell_of_new_keys_status_changes_and_a_low_balance_once_per_crossing(
    backend: Backend,
) {
    let admin = Admin::new(backend).await;
    let mut b = admin.browser([10, 0, 0, 1]);
    b.sign_up("kim@example.com").await;
    let kim = admin.account("kim@example.com").await;
    let about = |needle: &str| {
        admin
            .mails_to("kim@example.com")
            .into_iter()
            .filter(|m| m.contains(needle))
            .collect::<Vec<_>>()
    };
    let r = b.submit("/keys", "/keys", &[("name", "laptop")]).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let created = about("Subject: A new API key was created: laptop");
    assert_eq!(created.len(), 1);
    assert!(created[0].contains("Content-Type: text/html") && created[0].contains("sk-relay_"));

    let mut op = admin.operator().await;
    let page = format!("/operator/accounts/{}", kim.id);
    for (status, reason) in [
        ("suspended", "spam reports (AUP 3.2)"),
        ("active", "cleared"),
    ] {
        let r = op
            .submit(
                &page,
                &format!("{page}/status"),
                &[("status", status), ("reason", reason)],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    }
    let suspended = about("Subject: Your account is suspended");
    assert_eq!(suspended.len(), 1);
    assert!(suspended[0].contains("spam reports (AUP 3.2)"));
    assert_eq!(about("Subject: Your account is active again").len(), 1);

    // Low balance: nothing for an account that never had credit; once per crossing after.
    let pass = || duang::admin::notify::low_balance_pass(&admin.state);
    assert_eq!(
        pass().await.expect("pass"),
        0,
        "a new $0 account is not told"
    );
    let entry = |kind, usd: &str| duang::store::NewLedgerEntry {
        account_id: kim.id,
        kind,
        amount: usd.parse().expect("usd"),
        external_ref: format!("t-{}", rand::random::<u64>()),
        actor: None,
        reason: None,
    };
    let store = &admin.t.store;
    use duang::store::LedgerKind::{TopUp, Usage};
    store
        .append_ledger(&entry(TopUp, "5"))
        .await
        .expect("top up");
    assert_eq!(pass().await.expect("pass"), 0);
    store
        .append_ledger(&entry(Usage, "-4.5"))
        .await
        .expect("spend");
    assert_eq!(pass().await.expect("pass"), 1);
    assert_eq!(pass().await.expect("pass"), 0, "once per crossing");
    let low = about("Subject: Your balance is low: $0.50");
    assert_eq!(low.len(), 1, "{:?}", admin.mails_to("kim@example.com"));
    store
        .append_ledger(&entry(TopUp, "5"))
        .await
        .expect("top up");
    assert_eq!(pass().await.expect("pass"), 0, "back above: re-armed");
    store
        .append_ledger(&entry(Usage, "-5.25"))
        .await
        .expect("spend");
    assert_eq!(
        pass().await.expect("pass"),
        1,
        "a second crossing is told again"
    );
}

/// A reseller's relay shows their name, company, support address and policy texts everywhere:
/// pages, the footer, error pages (404, a CSRF refusal), mails, receipts and the TOTP issuer.
async fn the_operators_brand_and_policies_are_on_every_page_mail_and_error(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let terms = dir.path().join("terms.md");
    std::fs::write(
        &terms,
        "# Acme Terms\n\n{product_name} is run by {legal_entity}.\n\n- Be kind\n- Pay on time\n\nWrite to {support_email}.\n",
    )
    .expect("write");
    let admin = Admin::with_conf(backend, |t| {
        t.replace("support_email = \"support@duang-duang.com\"", "support_email = \"help@acme.test\"")
            .replace(
                "\nproduct_name = \"Duang Duang\"",
                &format!(
                    "\nproduct_name = \"Acme AI\"\nlegal_entity = \"Acme Ltd\"\n[brand.policies.terms]\nfile = {:?}\nupdated = \"2026-11-30\"",
                    terms.display().to_string()
                ),
            )
    })
    .await;
    let mut b = admin.browser([10, 0, 0, 1]);
    let home = b.get("/").await;
    assert!(
        home.body
            .contains("<title>Prepaid AI API credits · Acme AI</title>")
    );
    assert!(home.body.contains("help@acme.test") && home.body.contains("Acme Ltd"));
    assert!(
        home.body.contains("Acme Terms"),
        "the footer names the policy by its title"
    );
    let terms = b.get("/policies/terms").await;
    assert_eq!(terms.status, StatusCode::OK);
    assert!(
        terms.body.contains("<p>Acme AI is run by Acme Ltd.</p>"),
        "{}",
        terms.body
    );
    assert!(terms.body.contains("<li>Pay on time</li>"));
    assert!(
        terms
            .body
            .contains("Last updated: <time datetime=\"2026-11-30\">")
    );
    // The others keep the shipped texts, with the brand filled in.
    let aup = b.get("/policies/acceptable-use").await;
    assert!(aup.body.contains("Customers must use Acme AI lawfully"));
    assert!(aup.body.contains("Report abuse to help@acme.test"));
    for r in [
        b.get("/nowhere").await,
        b.post_form("/logout", &[("csrf", "forged")]).await,
    ] {
        assert!(matches!(r.status.as_u16(), 403 | 404), "{}", r.status);
        assert!(
            r.body.contains("help@acme.test") && r.body.contains("Acme AI"),
            "{}",
            r.body
        );
        assert!(
            !r.body.contains("duang-duang.com") && !r.body.contains("Duang Duang"),
            "{}",
            r.body
        );
        assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
    }
    b.sign_up("lee@example.com").await;
    let mail = admin.mails_to("lee@example.com").remove(0);
    assert!(
        mail.contains("Welcome to Acme AI") && mail.contains("help@acme.test"),
        "{mail}"
    );
    assert!(
        mail.lines()
            .filter(|l| l.contains("Duang Duang"))
            .all(|l| l.starts_with("From: ")),
        "only the sender (smtp.from, the operator's to set) names Duang Duang: {mail}"
    );
    let setup = b
        .submit("/account/security", "/account/2fa/setup", &[])
        .await;
    assert!(
        setup
            .body
            .contains("otpauth://totp/Acme%20AI:lee%40example.com"),
        "{}",
        setup.body
    );
}
