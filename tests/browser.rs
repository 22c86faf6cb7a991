//! What the product promises a new customer, in a real headless Chromium against the real
//! processes (`duang-admin serve`, `duang-gateway`, the mock upstream and the Stripe fake, on
//! loopback, one conf and one SQLite store): sign up, verify the e-mail from the mail's link, log
//! in, turn on two-factor authentication, log out and in with a code, create a key, buy $5.00 of credits through the hosted Checkout page, send a chat
//! completion with the key, and see the request, its cost and the chart on the dashboard.
//!
//! It needs Debian's `chromium` and `chromium-driver` packages (it fails, naming them, without
//! them). It takes screenshots of the main pages into `target/screenshots/`; with
//! `DUANG_UPDATE_SCREENSHOTS=1` it also refreshes `docs/screenshots/`.

mod support;

use duang::money::NanoUsd;
use serde_json::{Value, json};
use support::browser::{Browser, Chromedriver, Stack, WAIT, poll};

const EMAIL: &str = "new.customer@example.com";
const PASSWORD: &str = "tiny robots 2048";

/// `$4.99999496` → the amount.
fn usd(text: &str) -> NanoUsd {
    let plain = text.trim().trim_start_matches('$').replace(',', "");
    plain
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not an amount in USD"))
}

async fn log_in(b: &Browser) {
    b.click_on("a", "Log in").await;
    b.wait_for_url("/login").await;
    b.type_into("input[name=email]", EMAIL).await;
    b.type_into("input[name=password]", PASSWORD).await;
    b.click_on("button", "Log in").await;
    b.wait_for_url("/dashboard").await;
}

/// Clicks "Buy $5.00" on the credits page, which takes the browser on to the hosted Checkout
/// page (a URL that starts with `checkout_page`). The page's Content-Security-Policy must allow
/// that redirect (`form-action`): a browser that refused it would stay on /credits.
async fn buy_five_dollars(b: &Browser, checkout_page: &str) {
    b.click_on("button", "Buy $5.00").await;
    poll("the hosted Checkout page", WAIT, || async {
        b.current_url()
            .await
            .as_str()
            .starts_with(checkout_page)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_customer_signs_up_pays_and_uses_the_api_in_a_real_browser() {
    let stack = Stack::start().await;
    let b = Chromedriver::start().await.browser(&stack.admin_url).await;

    // The start page, as a visitor sees it.
    b.open("/").await;
    b.wait_for_text("h1", "Prepaid AI API credits").await;
    b.assert_clean_console("/").await;
    b.screenshot("home").await;

    // 1. Sign up through the form: the answer says to check the mailbox (the same answer an
    //    address with an account gets), and signs nobody in.
    b.click_on("a", "Sign up").await;
    b.wait_for_url("/signup").await;
    b.type_into("input[name=email]", EMAIL).await;
    b.type_into("input[name=password]", PASSWORD).await;
    b.screenshot("signup").await;
    b.assert_clean_console("/signup").await;
    b.click_on("button", "Sign up").await;
    b.wait_for_text("#signed-up", "Check your mailbox").await;
    assert!(!b.text("header").await.contains(EMAIL), "not signed in");

    // 2. The link from the mail, opened in the browser, verifies the address.
    poll("the verification mail", WAIT, || async {
        let mails = support::admin::mails_to(&stack.outbox, EMAIL);
        (!mails.is_empty()).then_some(())
    })
    .await;
    let link = support::admin::url_in_mail(&stack.outbox, EMAIL, "/verify");
    assert!(
        link.starts_with(&format!("{}/verify?token=", stack.admin_url)),
        "the mailed link points at the dashboard's public URL: {link}"
    );
    b.open(&link).await;
    b.wait_for_text("h1", "Your e-mail is verified").await;

    // 3. Log in; the navigation names the account, with a zero balance and no notice.
    log_in(&b).await;
    b.wait_for_text("header", EMAIL).await;
    assert_eq!(usd(&b.text("#balance").await), NanoUsd::ZERO);
    assert_eq!(
        b.count("#verify-notice").await,
        0,
        "no verification notice once verified"
    );

    // 3b. Turn on two-factor authentication from the account's security page: the key from the
    //     page into a TOTP library (as an app would), its code back; the recovery codes once.
    b.click_on("a", EMAIL).await;
    b.wait_for_url("/account/security").await;
    b.click_on("button", "Set up two-factor authentication")
        .await;
    let secret = b.wait_for_text("#totp-secret", "").await.replace(' ', "");
    assert_eq!(b.count(".qr svg").await, 1, "a QR code to scan");
    b.screenshot("two-factor-setup").await;
    let t0 = support::admin::unix_now();
    b.type_into(
        "input[name=totp_code]",
        &support::admin::totp_at(&secret, t0),
    )
    .await;
    b.click_on("button", "Turn on two-factor authentication")
        .await;
    b.wait_for_text("h1", "Two-factor authentication is on")
        .await;
    assert_eq!(b.count("#recovery-codes li").await, 10);
    b.assert_clean_console("/account/2fa/enable").await;

    // Log out from the navigation, and back in: password, then a code (the next step's: one
    // step of clock skew; the step the enrolment used would be a replay).
    b.click_on("button", "Log out").await;
    poll("the start page after logging out", WAIT, || async {
        (b.current_url().await.path() == "/").then_some(())
    })
    .await;
    b.wait_for_text("header", "Log in").await;
    assert!(
        !b.text("header").await.contains(EMAIL),
        "logged out, the navigation names nobody"
    );
    b.click_on("a", "Log in").await;
    b.wait_for_url("/login").await;
    b.type_into("input[name=email]", EMAIL).await;
    b.type_into("input[name=password]", PASSWORD).await;
    b.click_on("button", "Log in").await;
    b.wait_for_text("h1", "Enter your authentication code")
        .await;
    b.type_into(
        "input[name=totp_code]",
        &support::admin::totp_at(&secret, t0),
    )
    .await;
    b.click_on("button", "Log in").await;
    b.wait_for_text("p.error", "used already").await;
    // The refused code's 400 is the only error the console may hold.
    let logged = b.console().await;
    assert!(
        logged
            .iter()
            .filter(|e| e.starts_with("SEVERE"))
            .all(|e| e.contains("/login/code") && e.contains("400")),
        "{logged:#?}"
    );
    b.type_into(
        "input[name=totp_code]",
        &support::admin::totp_at(&secret, t0 + 30),
    )
    .await;
    b.click_on("button", "Log in").await;
    b.wait_for_url("/dashboard").await;
    b.wait_for_text("header", EMAIL).await;

    // 4. Create a key on the keys page; it is shown once, in full.
    b.click_on("a", "API keys").await;
    b.wait_for_url("/keys").await;
    b.type_into("input[name=name]", "e2e").await;
    b.click_on("button", "Create key").await;
    let key = b.wait_for_text("#new-key", "sk-relay_").await;
    let key = key.trim().to_owned();
    assert!(key.len() > 20, "the whole key is shown: {key}");
    b.wait_for_text("#keys", "e2e").await;
    b.assert_clean_console("/keys").await;
    b.screenshot("keys").await;

    // 5. Buy $5.00: the hosted Checkout page, pay, back to the success page.
    b.click_on("a", "Credits").await;
    b.wait_for_url("/credits").await;
    let checkout_page = format!("{}/pay/cs_test_", stack.stripe.url);
    buy_five_dollars(&b, &checkout_page).await;
    b.wait_for_url(&checkout_page).await;
    assert_eq!(b.text("#amount").await, "$5.00");
    b.screenshot("checkout").await;
    b.click("#pay").await;
    b.wait_for_url("/credits/success?").await;
    assert!(
        b.current_url().await.as_str().starts_with(&stack.admin_url),
        "back on the dashboard's site"
    );
    b.wait_for_text("main", "$5.00 was added to your balance")
        .await;
    assert_eq!(b.text("#balance").await, "$5.00");
    b.click_on("a", "Go to the dashboard").await;
    b.wait_for_url("/dashboard").await;
    assert_eq!(b.text("#balance").await, "$5.00");
    b.open("/credits").await;
    b.wait_for_text("#payments", "$5.00").await;
    assert!(b.text("#payments").await.contains("paid"));
    b.assert_clean_console("/credits").await;
    b.screenshot("credits").await;
    // The receipt comes by mail too, with the payment's reference and a printable copy.
    let receipt_mail = poll("the receipt mail", WAIT, || async {
        support::admin::mails_to(&stack.outbox, EMAIL)
            .into_iter()
            .find(|m| m.contains("Subject: Receipt: $5.00 of credits"))
    })
    .await;
    assert!(receipt_mail.contains("Payment reference") && receipt_mail.contains("pi_"));
    assert!(receipt_mail.contains("Content-Type: text/html"));

    // 6. A chat completion through the gateway with the new key.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/chat/completions", stack.gateway_url))
        .bearer_auth(&key)
        .json(&json!({
            "model": "budget",
            "messages": [{"role": "user", "content": "Say ok in one word."}],
            "max_tokens": 50,
        }))
        .send()
        .await
        .expect("the gateway answers");
    let status = r.status();
    let body: Value = r.json().await.expect("JSON");
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.is_empty(), "an answer with content: {body}");
    let stats = stack.mock.stats().await;
    assert_eq!(stats["requests"], 1, "the mock upstream served it: {stats}");

    // 7. The dashboard shows the request (usage is written in batches), the chart has a bar,
    //    and the balance went down.
    b.open("/dashboard").await;
    poll("the request on the dashboard", WAIT, || async {
        b.client.refresh().await.expect("reload");
        let rows = b.count("#requests tbody tr").await;
        let bars = b.count("#usage-chart rect").await;
        (rows >= 1 && bars >= 1).then_some(())
    })
    .await;
    let row = b.text("#requests tbody tr").await;
    assert!(row.contains("budget"), "{row}");
    assert!(row.contains("200"), "{row}");
    // The tier's customer price, not the demo model's zero cost, is billed.
    let cost = usd(&b.text("#requests tbody tr td:nth-child(5)").await);
    assert!(cost.is_positive(), "the request cost something: {row}");
    assert_eq!(
        usd(&b.text("#usage-total").await),
        cost,
        "the chart's total"
    );
    // The balance reads in cents; its exact figure is on hover (and in a detail line).
    let balance = usd(&b.attr("#balance .money", "data-exact").await);
    assert_eq!(usd(&b.text("#balance").await), balance.rounded_to_cents());
    let five: NanoUsd = "5".parse().expect("usd");
    // Exactly $5.00 less the cost: credit a gateway holds leased is still the customer's.
    assert_eq!(
        balance,
        five.checked_sub(cost).expect("no overflow"),
        "the request was billed, and only that"
    );
    b.assert_clean_console("/dashboard").await;
    b.screenshot("dashboard").await;

    // 8. The other main pages, through the navigation.
    b.click_on("a", "Usage").await;
    b.wait_for_url("/usage").await;
    b.wait_for_text("#requests", "budget").await;
    assert!(
        b.count("#usage-chart rect").await >= 1,
        "a bar on the chart"
    );
    b.assert_clean_console("/usage").await;
    b.screenshot("usage").await;
    b.click_on("a", "Pricing").await;
    b.wait_for_url("/pricing").await;
    b.wait_for_text("table.prices", "$0.12 / 1M tokens").await;
    b.assert_clean_console("/pricing").await;
    b.screenshot("pricing").await;
    b.click_on("a", "Quick start").await;
    b.wait_for_url("/quickstart").await;
    b.wait_for_text("#base-url", "/v1").await;
    b.assert_clean_console("/quickstart").await;
    b.screenshot("quickstart").await;

    // 8b. Ask for a refund of $1.00: the page says a mail follows, and it does.
    b.click_on("a", "Refunds").await;
    b.wait_for_url("/refunds").await;
    b.type_into("input[name=amount_usd]", "1.00").await;
    b.type_into("input[name=reason]", "trying the refund flow")
        .await;
    b.click_on("button", "Ask for the refund").await;
    b.wait_for_text("main", "We review it and reply by e-mail")
        .await;
    poll("the refund-requested mail", WAIT, || async {
        support::admin::mails_to(&stack.outbox, EMAIL)
            .iter()
            .any(|m| m.contains("Subject: We received your refund request"))
            .then_some(())
    })
    .await;

    // 9. Every page this customer can open: no critical or serious axe violation in light and
    //    dark; at a phone's width nothing is wider than the screen.
    let axe = support::browser::axe_source();
    let mut problems = Vec::new();
    let receipt = {
        b.open("/credits").await;
        b.attr("#payments a[href^='/credits/receipts/']", "href")
            .await
    };
    let receipt = url::Url::parse(&receipt)
        .map(|u| u.path().to_owned())
        .unwrap_or(receipt);
    let customer_pages: Vec<&str> = vec![
        "/",
        "/pricing",
        "/quickstart",
        "/policies/terms",
        "/policies/privacy",
        "/policies/refunds",
        "/policies/acceptable-use",
        "/dashboard",
        "/keys",
        "/usage",
        "/credits",
        "/credits/receipts",
        &receipt,
        "/refunds",
        "/account/security",
        "/nowhere",
    ];
    sweep(&b, &axe, &customer_pages, &mut problems).await;

    // On a phone the navigation is a menu that opens; dark mode is honoured.
    b.phone(true).await;
    b.open("/dashboard").await;
    let nav_display =
        "return getComputedStyle(document.querySelector('nav[aria-label=Main]')).display";
    assert_eq!(b.run_js(nav_display).await, "none", "folded on a phone");
    b.click(".menu-button").await;
    assert_eq!(b.run_js(nav_display).await, "flex", "the menu opens");
    b.screenshot("dashboard-phone-menu").await;
    b.dark(true).await;
    b.open("/dashboard").await;
    assert_eq!(
        b.run_js("return getComputedStyle(document.body).backgroundColor")
            .await,
        "rgb(18, 21, 28)",
        "the dark palette"
    );
    b.screenshot("dashboard-phone-dark").await;
    b.phone(false).await;
    b.screenshot("dashboard-dark").await;
    b.dark(false).await;

    // The pages of a visitor who is not signed in.
    b.open("/dashboard").await;
    b.click_on("button", "Log out").await;
    poll("logged out", WAIT, || async {
        (b.current_url().await.path() == "/").then_some(())
    })
    .await;
    sweep(
        &b,
        &axe,
        &["/signup", "/login", "/password/forgot"],
        &mut problems,
    )
    .await;

    // 10. An operator (made with the CLI) must turn on 2FA before the operator pages open;
    //     then every operator page passes the same checks.
    let made = support::run(
        support::ADMIN_BIN,
        &stack.conf_path,
        &[
            "account",
            "create",
            "--email",
            "op@example.com",
            "--operator",
            "--verified",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    // A prepayment to a provider, so the upstream page shows its prepaid-credit table.
    let prepaid = support::run(
        support::ADMIN_BIN,
        &stack.conf_path,
        &[
            "upstream-credit",
            "add",
            "openai",
            "--usd",
            "500",
            "--ref",
            "INV-1",
        ],
        None,
    );
    assert_eq!(prepaid.code, 0, "{}", prepaid.stderr);
    b.open("/login?next=/operator").await;
    b.type_into("input[name=email]", "op@example.com").await;
    b.type_into("input[name=password]", PASSWORD).await;
    b.click_on("button", "Log in").await;
    b.wait_for_url("/account/security?required=operator").await;
    b.click_on("button", "Set up two-factor authentication")
        .await;
    let secret = b.wait_for_text("#totp-secret", "").await.replace(' ', "");
    b.type_into(
        "input[name=totp_code]",
        &support::admin::totp_at(&secret, support::admin::unix_now()),
    )
    .await;
    b.click_on("button", "Turn on two-factor authentication")
        .await;
    b.wait_for_text("h1", "Two-factor authentication is on")
        .await;
    sweep(
        &b,
        &axe,
        &[
            "/operator",
            "/operator/accounts/1",
            "/operator/refunds",
            "/operator/revenue",
            "/operator/upstreams",
            "/operator/audit",
        ],
        &mut problems,
    )
    .await;
    assert!(
        problems.is_empty(),
        "accessibility and phone-layout problems:\n{}",
        problems.join("\n")
    );
    b.close().await;
}

/// Opens each page at desktop width (light) and at a phone's width (light and dark): axe must
/// find no critical or serious violation, nothing may be wider than the phone's screen, and the
/// console must stay clean. Screenshots of each at both widths.
async fn sweep(b: &Browser, axe: &str, pages: &[&str], problems: &mut Vec<String>) {
    for (mode, phone, dark) in [
        ("desktop", false, false),
        ("phone", true, false),
        ("phone dark", true, true),
    ] {
        b.phone(phone).await;
        b.dark(dark).await;
        for path in pages {
            b.open(path).await;
            let here = b.current_url().await;
            if here.path() != path.split('?').next().unwrap_or(path) {
                problems.push(format!("{path} ({mode}): landed on {here}"));
                continue;
            }
            for v in b.axe_violations(axe).await {
                problems.push(format!("{path} ({mode}): {v}"));
            }
            if phone {
                for o in b.overflowing().await {
                    problems.push(format!("{path} ({mode}): wider than the screen: {o}"));
                }
            }
            if !dark {
                let name = screenshot_name(path);
                b.screenshot(&if phone { format!("{name}-phone") } else { name })
                    .await;
            }
            if *path != "/nowhere" {
                b.assert_clean_console(path).await;
            } else {
                b.console().await;
            }
        }
    }
    b.phone(false).await;
    b.dark(false).await;
}

/// `/policies/terms` → `policies-terms`; `/` → `home`; a receipt's id is left out.
fn screenshot_name(path: &str) -> String {
    let name = path.trim_matches('/').replace('/', "-");
    match name.as_str() {
        "" => "home".into(),
        n if n.starts_with("credits-receipts-") => "receipt".into(),
        n if n.starts_with("operator-accounts-") => "operator-account".into(),
        n => n.to_owned(),
    }
}
