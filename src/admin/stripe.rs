//! Stripe: a small client for the calls we make (create a Checkout Session, create a refund),
//! and the webhook's signature check. Requests are form-encoded with Stripe's bracket notation
//! and carry an `Idempotency-Key`, so a retry after a timeout never charges or refunds twice.

use crate::conf::StripeConf;
use crate::secret::Secret;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use std::time::Duration;

/// How far a webhook's signed timestamp may be from our clock (Stripe's libraries use 300 s).
pub const SIGNATURE_TOLERANCE_S: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeError {
    /// Stripe answered with an error object.
    Api {
        status: u16,
        kind: String,
        code: Option<String>,
        message: String,
    },
    /// No answer (connection, timeout) or one we could not read.
    Transport(String),
}

impl std::fmt::Display for StripeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StripeError::Api {
                status,
                kind,
                code,
                message,
            } => write!(
                f,
                "Stripe answered {status} {kind}{}: {message}",
                code.as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            ),
            StripeError::Transport(m) => write!(f, "Stripe unreachable: {m}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub url: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub payment_status: String,
    pub status: Option<String>,
    pub payment_intent: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Refund {
    pub id: String,
    pub amount: i64,
    pub status: Option<String>,
}

/// What a Checkout Session is for.
pub struct CheckoutRequest<'a> {
    pub account_id: i64,
    pub email: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
    pub product_name: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
}

pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    secret_key: Secret<String>,
}

impl StripeClient {
    pub fn new(conf: &StripeConf) -> StripeClient {
        StripeClient {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client with rustls builds"),
            base: conf.api_base_url.as_str().trim_end_matches('/').to_owned(),
            secret_key: conf.secret_key.clone(),
        }
    }

    /// POSTs a form; retries twice (same idempotency key) on no answer, 429 or 5xx.
    async fn post(
        &self,
        path: &str,
        params: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<Value, StripeError> {
        let mut last = StripeError::Transport("not sent".into());
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let sent = self
                .http
                .post(format!("{}{path}", self.base))
                .bearer_auth(self.secret_key.expose())
                .header("Idempotency-Key", idempotency_key)
                .form(params)
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = StripeError::Transport(e.to_string());
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let body: Value = match resp.json().await {
                Ok(v) => v,
                Err(e) => {
                    last = StripeError::Transport(format!("unreadable answer ({status}): {e}"));
                    continue;
                }
            };
            if (200..300).contains(&status) {
                return Ok(body);
            }
            let err = &body["error"];
            last = StripeError::Api {
                status,
                kind: err["type"].as_str().unwrap_or("api_error").to_owned(),
                code: err["code"].as_str().map(str::to_owned),
                message: err["message"].as_str().unwrap_or("no message").to_owned(),
            };
            if status != 429 && status < 500 {
                break;
            }
        }
        Err(last)
    }

    pub async fn create_checkout_session(
        &self,
        r: &CheckoutRequest<'_>,
        idempotency_key: &str,
    ) -> Result<CheckoutSession, StripeError> {
        let p = |k: &str, v: String| (k.to_owned(), v);
        let params = vec![
            p("mode", "payment".into()),
            p("success_url", r.success_url.into()),
            p("cancel_url", r.cancel_url.into()),
            p("client_reference_id", r.account_id.to_string()),
            p("customer_email", r.email.into()),
            p("metadata[account_id]", r.account_id.to_string()),
            p(
                "payment_intent_data[metadata][account_id]",
                r.account_id.to_string(),
            ),
            p("line_items[0][quantity]", "1".into()),
            p("line_items[0][price_data][currency]", r.currency.into()),
            p(
                "line_items[0][price_data][unit_amount]",
                r.amount_cents.to_string(),
            ),
            p(
                "line_items[0][price_data][product_data][name]",
                r.product_name.into(),
            ),
        ];
        let v = self
            .post("/v1/checkout/sessions", &params, idempotency_key)
            .await?;
        serde_json::from_value(v)
            .map_err(|e| StripeError::Transport(format!("unexpected Checkout Session: {e}")))
    }

    pub async fn create_refund(
        &self,
        payment_intent: &str,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<Refund, StripeError> {
        let params = vec![
            ("payment_intent".to_owned(), payment_intent.to_owned()),
            ("amount".to_owned(), amount_cents.to_string()),
            ("reason".to_owned(), "requested_by_customer".to_owned()),
        ];
        let v = self.post("/v1/refunds", &params, idempotency_key).await?;
        serde_json::from_value(v)
            .map_err(|e| StripeError::Transport(format!("unexpected refund: {e}")))
    }
}

/// Why a webhook's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    Mismatch,
    /// Signed too long ago (or too far ahead): a replay, or a clock that is off.
    OutsideTolerance,
}

impl SignatureError {
    pub fn message(self) -> &'static str {
        match self {
            SignatureError::Missing => "no Stripe-Signature header",
            SignatureError::Malformed => "the Stripe-Signature header is not t=…,v1=…",
            SignatureError::Mismatch => {
                "no signature matches the payload for this endpoint's secret"
            }
            SignatureError::OutsideTolerance => {
                "the signature's timestamp is outside the 300 s tolerance"
            }
        }
    }
}

/// Checks `Stripe-Signature: t=…,v1=…[,v1=…]` over the raw body: HMAC-SHA256 of `"{t}.{body}"`
/// keyed with the endpoint secret, compared in constant time, and `t` within the tolerance.
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    now_s: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t: Option<&str> = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let t_text = t.ok_or(SignatureError::Malformed)?;
    let ts: i64 = t_text.parse().map_err(|_| SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t_text.as_bytes());
    mac.update(b".");
    mac.update(body);
    let matched = sigs
        .iter()
        .any(|s| hex::decode(s).is_ok_and(|bytes| mac.clone().verify_slice(&bytes).is_ok()));
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if (now_s - ts).abs() > SIGNATURE_TOLERANCE_S {
        return Err(SignatureError::OutsideTolerance);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked_over_the_raw_body_with_a_tolerance() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign("whsec_a", 1_000, body);
        assert_eq!(verify_signature(Some(&h), body, "whsec_a", 1_000), Ok(()));
        assert_eq!(verify_signature(Some(&h), body, "whsec_a", 1_300), Ok(()));
        assert_eq!(
            verify_signature(Some(&h), body, "whsec_a", 1_301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            verify_signature(Some(&h), body, "whsec_b", 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(Some(&h), br#"{"id":"evt_2"}"#, "whsec_a", 1_000),
            Err(SignatureError::Mismatch)
        );
        // A rolled secret: Stripe sends one v1 per secret; any may match.
        let two = format!("{h},v1=00ff");
        assert_eq!(verify_signature(Some(&two), body, "whsec_a", 1_000), Ok(()));
        assert_eq!(
            verify_signature(None, body, "whsec_a", 1_000),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(Some("v1=abc"), body, "whsec_a", 1_000),
            Err(SignatureError::Malformed)
        );
        // A timestamp changed after signing breaks the signature, not only the tolerance.
        let moved = h.replacen("t=1000", "t=1001", 1);
        assert_eq!(
            verify_signature(Some(&moved), body, "whsec_a", 1_000),
            Err(SignatureError::Mismatch)
        );
    }
}
