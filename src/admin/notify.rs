//! The mails the relay sends a customer, each written once as a [`Letter`] and sent with a
//! plain-text part and an HTML part in the operator's brand (product name and support address):
//! verification, password reset, "you already have an account", payment receipt, refund
//! requested and decided, low balance (once per crossing of `admin.low_balance_warning_cents`),
//! key created, and account suspended, reactivated or terminated (with the reason).
//!
//! A mail that cannot be sent is logged; the action that caused it stands (a payment is
//! credited, a key is created) and the page says nothing different.

use super::error::AdminError;
use super::server::AppState;
use crate::money::NanoUsd;
use crate::store::{Account, AccountStatus};
use maud::html;

/// One part of a mail's body.
#[derive(Clone)]
pub enum Part {
    Para(String),
    /// A link on its own line: its label and its URL.
    Link(String, String),
    /// Label and value rows (a receipt's lines).
    Facts(Vec<(String, String)>),
}

#[derive(Clone)]
pub struct Letter {
    pub subject: String,
    pub parts: Vec<Part>,
}

impl Letter {
    pub fn new(subject: impl Into<String>) -> Letter {
        Letter {
            subject: subject.into(),
            parts: Vec::new(),
        }
    }

    pub fn para(mut self, text: impl Into<String>) -> Letter {
        self.parts.push(Part::Para(text.into()));
        self
    }

    pub fn link(mut self, label: impl Into<String>, url: impl Into<String>) -> Letter {
        self.parts.push(Part::Link(label.into(), url.into()));
        self
    }

    pub fn facts(mut self, rows: Vec<(&str, String)>) -> Letter {
        self.parts.push(Part::Facts(
            rows.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ));
        self
    }

    pub fn text(&self, product: &str, support: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Para(t) => out.push_str(t),
                Part::Link(label, url) => out.push_str(&format!("{label}:\n{url}")),
                Part::Facts(rows) => {
                    let width = rows
                        .iter()
                        .map(|(k, _)| k.chars().count())
                        .max()
                        .unwrap_or(0);
                    let lines: Vec<String> = rows
                        .iter()
                        .map(|(k, v)| format!("{k:width$}  {v}"))
                        .collect();
                    out.push_str(&lines.join("\n"));
                }
            }
            out.push_str("\n\n");
        }
        out.push_str(&format!("{product} · Support: {support}\n"));
        out
    }

    pub fn html(&self, product: &str, support: &str) -> String {
        html! {
            (maud::DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { (self.subject) } }
                body style="font-family: system-ui, sans-serif; color: #1a1a1a; max-width: 36rem; margin: 0 auto; padding: 1rem;" {
                    p style="font-weight: bold; font-size: 1.1rem;" { (product) }
                    @for p in &self.parts {
                        @match p {
                            Part::Para(t) => { p { (t) } }
                            Part::Link(label, url) => { p { a href=(url) style="color: #1d4ed8;" { (label) } } }
                            Part::Facts(rows) => {
                                table style="border-collapse: collapse;" {
                                    @for (k, v) in rows {
                                        tr { th scope="row" style="text-align: left; padding: 0.2rem 1rem 0.2rem 0;" { (k) } td { (v) } }
                                    }
                                }
                            }
                        }
                    }
                    p style="color: #555; font-size: 0.9rem; border-top: 1px solid #ddd; padding-top: 0.5rem;" {
                        (product) " · Support: " a href={ "mailto:" (support) } { (support) }
                    }
                }
            }
        }
        .into_string()
    }
}

/// Sends `letter` to `to`; a failure is logged and answered with "try again later".
pub async fn send(
    state: &AppState,
    to: &str,
    purpose: &str,
    letter: Letter,
) -> Result<(), AdminError> {
    let product = &state.conf.brand.product_name;
    let support = &state.conf.admin.support_email;
    state
        .mailer
        .send(
            to,
            &letter.subject,
            letter.text(product, support),
            letter.html(product, support),
            purpose,
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::error!(error = %e, purpose, "sending mail failed");
            AdminError::Unavailable(
                "We could not send the mail right now. Try again in a few minutes.".into(),
            )
        })
}

/// Sends a mail that follows an action already done: a failure is only logged.
pub async fn tell(state: &AppState, to: &str, purpose: &str, letter: Letter) {
    if let Err(e) = send(state, to, purpose, letter).await {
        tracing::warn!(to, purpose, error = ?e, "a notice mail was not sent");
    }
}

pub fn url(state: &AppState, path: &str) -> String {
    format!(
        "{}{path}",
        state.conf.admin.public_url.as_str().trim_end_matches('/')
    )
}

// ── The notices ───────────────────────────────────────────────────────────────────────────────

/// A balance in a mail: cents, and the exact figure when it is not a whole number of cents.
fn shown(n: NanoUsd) -> String {
    let cents = n.rounded_to_cents();
    if cents == n {
        n.to_string()
    } else {
        format!("{cents} (exactly {n})")
    }
}

pub struct Receipt<'a> {
    pub amount: NanoUsd,
    pub paid_at_ms: i64,
    /// Stripe's payment reference (the PaymentIntent, or the Checkout Session without one).
    pub reference: &'a str,
    pub balance_after: NanoUsd,
    /// The receipt page for this payment.
    pub receipt_path: String,
}

pub async fn receipt(state: &AppState, to: &str, r: &Receipt<'_>) {
    let letter = Letter::new(format!("Receipt: {} of credits", r.amount))
        .para("Thank you for your payment. Your credits are on your balance now.")
        .facts(vec![
            ("Amount", r.amount.to_string()),
            ("Date (UTC)", crate::time::format_utc(r.paid_at_ms)),
            ("Payment reference", r.reference.to_owned()),
            ("Balance after", shown(r.balance_after)),
        ])
        .link(
            "Your receipt, to print or keep",
            url(state, &r.receipt_path),
        )
        .para("Unused credits can be refunded as the Refund Policy describes.");
    tell(state, to, "receipt", letter).await;
}

pub async fn refund_requested(state: &AppState, to: &str, amount_cents: i64, reason: &str) {
    let letter = Letter::new("We received your refund request")
        .para(format!(
            "You asked for a refund of {}. We review it and reply by e-mail, usually within a few business days.",
            super::pages::cents_text(amount_cents)
        ))
        .facts(vec![("Your reason", reason.to_owned())])
        .link("Your refund requests", url(state, "/refunds"));
    tell(state, to, "refund-requested", letter).await;
}

pub async fn refund_decided(
    state: &AppState,
    to: &str,
    amount_cents: i64,
    approved: bool,
    note: &str,
) {
    let amount = super::pages::cents_text(amount_cents);
    let letter = if approved {
        Letter::new(format!("Your refund of {amount} is approved"))
            .para(format!("We approved your refund of {amount}. It goes back to the card you paid with; banks usually show it within 5 to 10 business days."))
    } else {
        Letter::new(format!("Your refund request of {amount} was declined")).para(format!(
            "We reviewed your refund request of {amount} and declined it."
        ))
    };
    let letter = if note.trim().is_empty() {
        letter
    } else {
        letter.facts(vec![("Note from our team", note.trim().to_owned())])
    };
    tell(
        state,
        to,
        if approved {
            "refund-approved"
        } else {
            "refund-declined"
        },
        letter.link("Your refund requests", url(state, "/refunds")),
    )
    .await;
}

pub async fn key_created(state: &AppState, to: &str, key_name: &str, prefix: &str) {
    let letter = Letter::new(format!("A new API key was created: {key_name}"))
        .para(format!(
            "The API key “{key_name}” ({prefix}…) was created on your account at {} UTC.",
            crate::time::format_utc(crate::time::now_ms())
        ))
        .para("If it was not you, revoke it on the keys page and change your password.")
        .link("Your API keys", url(state, "/keys"));
    tell(state, to, "key-created", letter).await;
}

pub async fn status_changed(state: &AppState, a: &Account, reason: Option<&str>) {
    let (subject, what) = match a.status {
        AccountStatus::Suspended => (
            "Your account is suspended",
            "Your account is suspended under the Acceptable Use Policy: its API keys are refused until it is reactivated. Your balance is kept.",
        ),
        AccountStatus::Active => (
            "Your account is active again",
            "Your account is reactivated: your API keys work again.",
        ),
        AccountStatus::Terminated => (
            "Your account is terminated",
            "Your account is terminated under the Acceptable Use Policy: its API keys no longer work and it cannot log in. Contact support about any unused balance.",
        ),
    };
    let mut letter = Letter::new(subject).para(what);
    if let Some(r) = reason.map(str::trim).filter(|r| !r.is_empty()) {
        letter = letter.facts(vec![("Reason", r.to_owned())]);
    }
    let letter = letter.link(
        "The Acceptable Use Policy",
        url(state, "/policies/acceptable-use"),
    );
    tell(state, &a.email, "account-status", letter).await;
}

/// One pass of the low-balance notice: mails every account that crossed below the warning
/// since the last pass, and re-arms those back above it. Runs in the admin every minute.
pub async fn low_balance_pass(state: &AppState) -> Result<usize, AdminError> {
    let below = state.conf.admin.low_balance_warning;
    if below == NanoUsd::ZERO {
        return Ok(0);
    }
    state.store.clear_low_balance_marks(below).await?;
    let crossed = state.store.take_low_balance_crossings(below).await?;
    for (a, credit) in &crossed {
        let credit = shown(*credit);
        let letter = Letter::new(format!("Your balance is low: {credit}"))
            .para(format!(
                "The balance of your account is {credit}, below {below}. When it runs out, API requests are refused with 402 until you add credits."
            ))
            .link("Add credits", url(state, "/credits"));
        tell(state, &a.email, "low-balance", letter).await;
    }
    Ok(crossed.len())
}

/// Mails the operators when a provider's prepaid credit falls below its
/// `prepaid_alert_below_usd` (once per crossing; a credit back above it re-arms the mail).
/// Returns the providers mailed about.
pub async fn prepaid_pass(state: &AppState) -> Result<Vec<String>, AdminError> {
    let watched: Vec<_> = state
        .conf
        .providers
        .iter()
        .filter_map(|p| p.prepaid_alert_below.map(|b| (p, b)))
        .collect();
    if watched.is_empty() {
        return Ok(Vec::new());
    }
    let credits = state.store.provider_credits().await?;
    let mut mailed = Vec::new();
    for (p, below) in watched {
        let Some(c) = credits.iter().find(|c| c.provider == p.name) else {
            continue;
        };
        if c.remaining >= below {
            state.store.clear_upstream_alert(&p.name).await?;
            continue;
        }
        if !state.store.take_upstream_alert(&p.name).await? {
            continue;
        }
        let days = c
            .days_left()
            .map(|d| format!("about {d:.1} days at the last 7 days' rate"))
            .unwrap_or_else(|| "no spend in the last 7 days".into());
        let what_then = if p.leave_routing_when_prepaid_spent {
            "When it is spent, this provider's upstreams leave routing and each tier falls back to its next upstream."
        } else {
            "When it is spent, requests still go to this provider (leave_routing_when_prepaid_spent is off)."
        };
        let letter = Letter::new(format!(
            "Prepaid credit at {} is low: {} left",
            p.name, c.remaining
        ))
        .para(format!(
            "The prepaid credit recorded for {} is down to {}, below the {} you set (prepaid_alert_below_usd): {days}. {what_then}",
            p.name, c.remaining, below
        ))
        .para("Top it up at the provider, then record it: duang-admin upstream-credit add PROVIDER --usd AMOUNT --ref INVOICE.")
        .link("Upstream status", url(state, "/operator/upstreams"));
        for to in state.store.operator_emails().await? {
            tell(state, &to, "upstream-credit-low", letter.clone()).await;
        }
        mailed.push(p.name.clone());
    }
    Ok(mailed)
}

/// Runs [`low_balance_pass`] and [`prepaid_pass`] every `every` until the process ends.
pub async fn low_balance_loop(live: super::server::Live, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = live.state();
        if let Err(e) = low_balance_pass(&state).await {
            tracing::warn!(error = ?e, "low-balance pass failed; trying again next minute");
        }
        if let Err(e) = prepaid_pass(&state).await {
            tracing::warn!(error = ?e, "prepaid-credit pass failed; trying again next minute");
        }
    }
}
