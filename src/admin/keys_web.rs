//! A customer's API keys: create (the key is shown once), list with last use, revoke; optional
//! per-key limits, spend cap and expiry, within the bounds in `[limits.key_max]`.
//! A key id that is not the caller's answers "not found", never "forbidden", so ids of other
//! accounts' keys cannot be probed.

use super::error::{AdminError, ApiError};
use super::pages::{csrf_field, form_error, page};
use super::server::AppState;
use super::web::SignedIn;
use crate::money::NanoUsd;
use crate::store::{Account, ApiKey, KeyStatus, LimitOverrides, NewKey};
use crate::time::{format_utc, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};

/// What a customer may ask for; empty fields keep the defaults. Numbers arrive as text from a
/// form and as numbers or text from JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyRequest {
    name: String,
    #[serde(deserialize_with = "lenient")]
    expires_in_days: Option<String>,
    #[serde(deserialize_with = "lenient")]
    requests_per_minute: Option<String>,
    #[serde(deserialize_with = "lenient")]
    tokens_per_minute: Option<String>,
    #[serde(deserialize_with = "lenient")]
    in_flight: Option<String>,
    #[serde(deserialize_with = "lenient")]
    spend_cap_usd: Option<String>,
    /// The second factor, when the session must show it again (see `security::step_up`).
    #[serde(deserialize_with = "lenient")]
    totp_code: Option<String>,
}

/// A string, a number or null, as text (`None` when empty).
pub fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(match v {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) => Some(s.trim().to_owned()),
        other => Some(other.to_string()),
    })
}

fn bounded(
    field: &'static str,
    v: &Option<String>,
    max: u64,
    what: &str,
) -> Result<Option<i64>, AdminError> {
    let Some(text) = v else { return Ok(None) };
    match text.parse::<i64>() {
        Ok(n) if n >= 1 && n as u64 <= max => Ok(Some(n)),
        _ => Err(AdminError::invalid(
            field,
            format!("{what} must be a whole number from 1 to {max}."),
        )),
    }
}

/// Checks a request against the operator's bounds and creates the key.
pub async fn create(
    state: &AppState,
    account: &Account,
    r: &KeyRequest,
) -> Result<(ApiKey, String), AdminError> {
    let name = r.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(AdminError::invalid(
            "name",
            "Give the key a name of 1 to 100 characters.",
        ));
    }
    let max = &state.conf.limits.key_max;
    let days = bounded(
        "expires_in_days",
        &r.expires_in_days,
        max.expiry_days.get().into(),
        "Expiry in days",
    )?;
    let limits = LimitOverrides {
        requests_per_minute: bounded(
            "requests_per_minute",
            &r.requests_per_minute,
            max.limits.requests_per_minute.get().into(),
            "Requests per minute",
        )?,
        tokens_per_minute: bounded(
            "tokens_per_minute",
            &r.tokens_per_minute,
            max.limits.tokens_per_minute.get(),
            "Tokens per minute",
        )?,
        in_flight: bounded(
            "in_flight",
            &r.in_flight,
            max.limits.in_flight.get().into(),
            "Requests in flight",
        )?,
    };
    let spend_cap = match &r.spend_cap_usd {
        None => None,
        Some(text) => match text.parse::<NanoUsd>() {
            Ok(v) if v.is_positive() && v <= max.spend_cap && v.as_whole_cents().is_some() => {
                Some(v)
            }
            _ => {
                return Err(AdminError::invalid(
                    "spend_cap_usd",
                    format!(
                        "The spend cap must be an amount in dollars and cents from 0.01 to {}.",
                        max.spend_cap
                    ),
                ));
            }
        },
    };
    let material = crate::keys::generate();
    let key = state
        .store
        .create_key(
            &NewKey {
                account_id: account.id,
                name: name.to_owned(),
                expires_at: days.map(|d| now_ms() + d * 86_400_000),
                limits,
                spend_cap,
                allowed_models: None,
            },
            &material.hash,
            &material.display_prefix,
        )
        .await?;
    super::notify::key_created(state, &account.email, &key.name, &key.display_prefix).await;
    Ok((key, material.plaintext.expose().clone()))
}

/// The caller's own key, or not found.
async fn own_key(state: &AppState, account: &Account, key_id: i64) -> Result<ApiKey, AdminError> {
    match state.store.key(key_id).await {
        Ok(k) if k.account_id == account.id => Ok(k),
        Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => {
            Err(AdminError::NotFound("No such key.".into()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn revoke(
    state: &AppState,
    account: &Account,
    key_id: i64,
) -> Result<ApiKey, AdminError> {
    let key = own_key(state, account, key_id).await?;
    if key.status == KeyStatus::Revoked {
        return Ok(key);
    }
    Ok(state
        .store
        .revoke_key(
            key.id,
            &format!("account:{}", account.id),
            Some("revoked by the customer"),
        )
        .await?)
}

pub fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.display_prefix,
        "status": k.status.as_str(),
        "created_at_ms": k.created_at,
        "last_used_at_ms": k.last_used_at,
        "expires_at_ms": k.expires_at,
        "revoked_at_ms": k.revoked_at,
        "requests_per_minute": k.limits.requests_per_minute,
        "tokens_per_minute": k.limits.tokens_per_minute,
        "in_flight": k.limits.in_flight,
        "throttle": k.throttle.active_at(crate::time::now_ms()).then(|| json!({"requests_per_minute": k.throttle.requests_per_minute, "tokens_per_minute": k.throttle.tokens_per_minute, "until_ms": k.throttle.until_ms})),
        "spend_cap_usd": k.spend_cap.map(NanoUsd::decimal),
    })
}

// ── Pages ─────────────────────────────────────────────────────────────────────────────────────

fn when(ms: Option<i64>) -> String {
    ms.map(format_utc).unwrap_or_else(|| "—".into())
}

/// What each key spent this calendar month (UTC) and in all, by key id.
pub struct KeySpend {
    month: Vec<(i64, i64, NanoUsd)>,
    lifetime: Vec<(i64, NanoUsd)>,
}

impl KeySpend {
    async fn load(state: &AppState, account_id: i64, keys: &[ApiKey]) -> Result<Self, AdminError> {
        let now = now_ms();
        let month_start = crate::time::month_start_ms(now);
        let ids: Vec<i64> = keys.iter().map(|k| k.id).collect();
        Ok(KeySpend {
            month: state
                .store
                .spend_by_key(account_id, month_start, now + 1)
                .await?,
            lifetime: state.store.key_spent(&ids).await?,
        })
    }

    fn month(&self, id: i64) -> NanoUsd {
        self.month
            .iter()
            .find(|(k, ..)| *k == id)
            .map(|r| r.2)
            .unwrap_or(NanoUsd::ZERO)
    }

    fn lifetime(&self, id: i64) -> NanoUsd {
        self.lifetime
            .iter()
            .find(|(k, _)| *k == id)
            .map(|r| r.1)
            .unwrap_or(NanoUsd::ZERO)
    }
}

fn keys_page(
    state: &AppState,
    s: &SignedIn,
    keys: &[ApiKey],
    spend: &KeySpend,
    created: Option<(&ApiKey, &str)>,
    error: Option<&str>,
) -> Markup {
    let max = &state.conf.limits.key_max;
    let d = &state.conf.limits.default_key;
    page(
        state,
        "API keys",
        Some(&s.visitor),
        html! {
            @if let Some((k, plaintext)) = created {
                section.success {
                    h2 { "Your new key “" (k.name) "”" }
                    p { "Copy it now: this is the only time it is shown. We keep only a hash." }
                    p.key { code #new-key { (plaintext) } }
                }
            }
            @if !s.account.is_verified() {
                p.notice { "Verify your e-mail address to use your keys: the API refuses them until then." }
            }
            section.card {
                h1 { "API keys" }
                @if keys.is_empty() {
                    p.muted { "No keys yet." }
                } @else {
                    table #keys {
                        thead { tr { th { "Name" } th { "Key" } th { "Status" } th { "Spent this month" } th { "Created" } th { "Last used" } th { "Expires" } th { "Limits" } th { span.visually-hidden { "Actions" } } } }
                        tbody {
                            @for k in keys {
                                tr {
                                    td { (k.name) }
                                    td { code { (k.display_prefix) "…" } }
                                    td class={ "status-" (k.status.as_str()) } { (k.status.as_str()) }
                                    td.spent {
                                        (spend.month(k.id))
                                        @if let Some(c) = k.spend_cap { br; span.muted { (spend.lifetime(k.id)) " of its " (c) " cap" } }
                                    }
                                    td { (format_utc(k.created_at)) }
                                    td { (when(k.last_used_at)) }
                                    td { (when(k.expires_at)) }
                                    td.muted {
                                        (k.limits.requests_per_minute.unwrap_or(d.requests_per_minute.get().into())) " req/min · "
                                        (k.limits.tokens_per_minute.unwrap_or(d.tokens_per_minute.get() as i64)) " tok/min · "
                                        (k.limits.in_flight.unwrap_or(d.in_flight.get().into())) " in flight"
                                        @if let Some(c) = k.spend_cap { " · cap " (c) }
                                    }
                                    td {
                                        @if k.status != KeyStatus::Revoked {
                                            form.inline method="post" action={ "/keys/" (k.id) "/revoke" } {
                                                (csrf_field(&s.visitor))
                                                button.danger type="submit" { "Revoke" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card {
                h2 { "Create a key" }
                (form_error(error))
                form.row method="post" action="/keys" {
                    (csrf_field(&s.visitor))
                    label { "Name" input type="text" name="name" required maxlength="100" placeholder="my app"; }
                    label { "Expires in days (optional, up to " (max.expiry_days) ")" input type="number" name="expires_in_days" min="1" max=(max.expiry_days); }
                    label { "Requests / minute (default " (d.requests_per_minute) ")" input type="number" name="requests_per_minute" min="1" max=(max.limits.requests_per_minute); }
                    label { "Tokens / minute (default " (d.tokens_per_minute) ")" input type="number" name="tokens_per_minute" min="1" max=(max.limits.tokens_per_minute); }
                    label { "In flight (default " (d.in_flight) ")" input type="number" name="in_flight" min="1" max=(max.limits.in_flight); }
                    label { "Spend cap in USD (optional)" input type="text" name="spend_cap_usd" inputmode="decimal" placeholder="50.00"; }
                    (super::security::code_field(state, &s.visitor))
                    button type="submit" { "Create key" }
                }
            }
        },
    )
}

pub async fn list_page(State(state): State<AppState>, s: SignedIn) -> Response {
    let loaded = async {
        let keys = state.store.list_keys(s.account.id).await?;
        let spend = KeySpend::load(&state, s.account.id, &keys).await?;
        Ok::<_, AdminError>((keys, spend))
    }
    .await;
    match loaded {
        Ok((keys, spend)) => keys_page(&state, &s, &keys, &spend, None, None).into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

pub async fn create_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Form(r): Form<KeyRequest>,
) -> Response {
    let created = match super::security::step_up(&state, &s.visitor, r.totp_code.as_deref()).await {
        Ok(()) => create(&state, &s.account, &r).await,
        Err(e) => Err(e),
    };
    let loaded = async {
        let keys = state.store.list_keys(s.account.id).await?;
        let spend = KeySpend::load(&state, s.account.id, &keys).await?;
        Ok::<_, AdminError>((keys, spend))
    }
    .await;
    let (keys, spend) = match loaded {
        Ok(l) => l,
        Err(e) => return e.into_page(Some(&s.visitor)),
    };
    match created {
        Ok((key, plaintext)) => (
            StatusCode::CREATED,
            keys_page(&state, &s, &keys, &spend, Some((&key, &plaintext)), None),
        )
            .into_response(),
        Err(e) => (
            e.status(),
            keys_page(&state, &s, &keys, &spend, None, Some(&e.message())),
        )
            .into_response(),
    }
}

pub async fn revoke_submit(
    State(state): State<AppState>,
    s: SignedIn,
    Path(id): Path<i64>,
) -> Response {
    match revoke(&state, &s.account, id).await {
        Ok(_) => Redirect::to("/keys").into_response(),
        Err(e) => e.into_page(Some(&s.visitor)),
    }
}

// ── JSON API ──────────────────────────────────────────────────────────────────────────────────

pub async fn api_list(State(state): State<AppState>, s: SignedIn) -> Result<Json<Value>, ApiError> {
    let keys = state.store.list_keys(s.account.id).await?;
    Ok(Json(
        json!({"data": keys.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

pub async fn api_create(
    State(state): State<AppState>,
    s: SignedIn,
    Json(r): Json<KeyRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    super::security::step_up(&state, &s.visitor, r.totp_code.as_deref()).await?;
    let (key, plaintext) = create(&state, &s.account, &r).await?;
    let mut v = key_json(&key);
    v["key"] = json!(plaintext);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn api_revoke(
    State(state): State<AppState>,
    s: SignedIn,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let key = revoke(&state, &s.account, id).await?;
    Ok(Json(key_json(&key)))
}
