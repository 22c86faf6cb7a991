//! The JSON API as one table: each row is a route's handler and its description, so the router
//! and the OpenAPI document served at `GET /api/v1/openapi.json` are built from the same rows and
//! cannot drift apart.

use super::server::AppState;
use super::{account, credits, dashboard, exports, keys_web, operator, refunds, security, usage};
use axum::Json;
use axum::extract::State;
use axum::routing::{MethodRouter, get, post};
use serde_json::{Map, Value, json};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (JSON bodies need no CSRF token while signed out).
    Public,
    /// A signed-in account; state-changing calls send `x-csrf-token`.
    Customer,
    /// A signed-in operator.
    Operator,
}

/// A body or query field: name, JSON type, required, what it means.
pub type Field = (&'static str, &'static str, bool, &'static str);

pub struct ApiRoute {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub query: &'static [Field],
    pub body: &'static [Field],
    /// The success status and what it returns.
    pub ok: (u16, &'static str),
    pub handler: MethodRouter<super::server::Live>,
}

const DATES: &[Field] = &[
    (
        "from",
        "string",
        false,
        "first day, YYYY-MM-DD (UTC); default 30 days before `to`",
    ),
    ("to", "string", false, "last day, inclusive; default today"),
];
const LOGIN: &[Field] = &[
    ("email", "string", true, "the account's e-mail"),
    (
        "password",
        "string",
        true,
        "at least 10 characters, letters and digits or symbols",
    ),
];
const LOGIN_2FA: &[Field] = &[
    ("email", "string", true, "the account's e-mail"),
    ("password", "string", true, "the account's password"),
    (
        "totp_code",
        "string",
        false,
        "with 2FA on: a code from the authenticator app or a recovery code (without it: 401 two_factor_required)",
    ),
];
const TOTP: Field = (
    "totp_code",
    "string",
    false,
    "with 2FA on and the session's last code older than admin.two_factor_reauth_minutes: a code (else 401 two_factor_required)",
);
const CODE: &[Field] = &[(
    "totp_code",
    "string",
    true,
    "a code from the authenticator app (or a recovery code)",
)];
const LIMITS: &[Field] = &[
    (
        "requests_per_minute",
        "integer",
        false,
        "1 or more; absent: the default",
    ),
    (
        "tokens_per_minute",
        "integer",
        false,
        "1 or more; absent: the default",
    ),
    (
        "in_flight",
        "integer",
        false,
        "1 or more; absent: the default",
    ),
    ("reason", "string", true, "why (kept in the audit log)"),
];
const THROTTLE: &[Field] = &[
    ("requests_per_minute", "integer", false, "the lowered limit"),
    ("tokens_per_minute", "integer", false, "the lowered limit"),
    (
        "minutes",
        "integer",
        false,
        "for how long (1 minute to a year)",
    ),
    ("action", "string", false, "`lift` ends a throttle"),
    ("reason", "string", true, "why (kept in the audit log)"),
];
const STATUS: &[Field] = &[
    ("status", "string", true, "the new status"),
    ("reason", "string", true, "why (kept in the audit log)"),
];

macro_rules! route {
    ($m:ident $method:literal $path:literal, $access:ident, $summary:literal, q $query:expr, b $body:expr, $ok:literal $ret:literal, $h:expr) => {
        ApiRoute {
            method: $method,
            path: $path,
            access: Access::$access,
            summary: $summary,
            query: $query,
            body: $body,
            ok: ($ok, $ret),
            handler: $m($h),
        }
    };
}

/// Every JSON API route.
pub fn routes() -> Vec<ApiRoute> {
    vec![
        route!(post "post" "/api/v1/signup", Public, "Sign up: mails the verification link to a new address, or a notice to the owner of an existing one (the same answer either way); then log in", q &[], b LOGIN, 202 "{status, message}", account::api_signup),
        route!(post "post" "/api/v1/login", Public, "Sign in (sets the session cookie)", q &[], b LOGIN_2FA, 200 "{account, csrf_token}", account::api_login),
        route!(get "get" "/api/v1/account/2fa", Customer, "Whether two-factor authentication is on, and the recovery codes left", q &[], b &[], 200 "{enabled, recovery_codes_left}", security::api_status),
        route!(post "post" "/api/v1/account/2fa/setup", Customer, "Start a TOTP enrolment: the secret and the otpauth:// link for the app", q &[], b &[], 200 "{secret, otpauth_uri}", security::api_setup),
        route!(post "post" "/api/v1/account/2fa/enable", Customer, "Confirm the enrolment with a code; the recovery codes, shown once", q &[], b CODE, 200 "{enabled, recovery_codes}", security::api_enable),
        route!(post "post" "/api/v1/account/2fa/disable", Customer, "Turn 2FA off with a fresh code (operators cannot)", q &[], b CODE, 200 "{enabled, recovery_codes_left}", security::api_disable),
        route!(post "post" "/api/v1/account/2fa/recovery-codes", Customer, "New recovery codes (the old ones stop working)", q &[], b &[TOTP], 200 "{recovery_codes}", security::api_recovery),
        route!(post "post" "/api/v1/logout", Customer, "Sign out", q &[], b &[], 204 "nothing", account::api_logout),
        route!(get "get" "/api/v1/me", Customer, "The signed-in account and its CSRF token", q &[], b &[], 200 "{account, csrf_token}", account::api_me),
        route!(post "post" "/api/v1/verify", Public, "Verify the e-mail with the token from the mailed link", q &[], b &[("token", "string", true, "the link's token")], 200 "{account}", account::api_verify),
        route!(post "post" "/api/v1/verify/resend", Customer, "Mail the verification link again", q &[], b &[], 202 "nothing", account::api_resend),
        route!(post "post" "/api/v1/password/forgot", Public, "Mail a password reset link (the same answer whether or not the address has an account)", q &[], b &[("email", "string", true, "the account's e-mail")], 202 "nothing", account::api_forgot),
        route!(post "post" "/api/v1/password/reset", Public, "Set a new password with the mailed token; ends every session", q &[], b &[("token", "string", true, "the link's token"), ("password", "string", true, "the new password"), ("totp_code", "string", false, "required when the account has 2FA on")], 204 "nothing", account::api_reset),
        route!(get "get" "/api/v1/balance", Customer, "The account with its balance", q &[], b &[], 200 "{id, email, balance_usd, balance_nano_usd, low_balance, ...}", dashboard::api_balance),
        route!(get "get" "/api/v1/requests", Customer, "The request log, newest first", q &[("from", "string", false, "first day, YYYY-MM-DD"), ("to", "string", false, "last day, inclusive"), ("key_id", "integer", false, "only this key"), ("tier", "string", false, "only this tier"), ("status", "string", false, "ok, error, or an HTTP status"), ("limit", "integer", false, "1 to 500, default 50"), ("before_ms", "integer", false, "the cursor from next_before_ms")], b &[], 200 "{data: [request], next_before_ms}", usage::api_requests),
        route!(get "get" "/api/v1/usage/daily", Customer, "Requests, tokens and billed USD per UTC day and tier", q DATES, b &[], 200 "{from, to, total_billed_usd, data}", usage::api_daily),
        route!(get "get" "/api/v1/keys", Customer, "The account's API keys (prefixes only)", q &[], b &[], 200 "{data: [key]}", keys_web::api_list),
        route!(post "post" "/api/v1/keys", Customer, "Create an API key; the full key is in `key`, this once", q &[], b &[("name", "string", true, "1 to 100 characters"), ("expires_in_days", "integer", false, "up to limits.key_max.expiry_days"), ("requests_per_minute", "integer", false, "up to limits.key_max"), ("tokens_per_minute", "integer", false, "up to limits.key_max"), ("in_flight", "integer", false, "up to limits.key_max"), ("spend_cap_usd", "string", false, "dollars and cents, up to limits.key_max.spend_cap_cents"), TOTP], 201 "{key, id, name, prefix, ...}", keys_web::api_create),
        route!(post "post" "/api/v1/keys/{id}/revoke", Customer, "Revoke one of the account's keys for good", q &[], b &[], 200 "{key}", keys_web::api_revoke),
        route!(get "get" "/api/v1/credits", Customer, "What can be bought (packages, custom bounds) and past payments", q &[], b &[], 200 "{enabled, packages_cents, payments, ...}", credits::api_options),
        route!(post "post" "/api/v1/credits/checkout", Customer, "Start a Stripe Checkout for a package or a custom amount", q &[], b &[("package_cents", "integer", false, "one of the packages"), ("amount_usd", "string", false, "a custom amount in dollars and cents"), ("nonce", "string", false, "the same nonce twice makes one session")], 201 "{session_id, checkout_url}", credits::api_checkout),
        route!(get "get" "/api/v1/refunds", Customer, "The account's refund requests and what can be refunded now", q &[], b &[], 200 "{refundable_cents, data}", refunds::api_list),
        route!(post "post" "/api/v1/refunds", Customer, "Ask for a refund of unused balance", q &[], b &[("amount_cents", "integer", false, "the amount in cents (or amount_usd)"), ("amount_usd", "string", false, "the amount in dollars and cents"), ("reason", "string", true, "why"), TOTP], 201 "{refund request}", refunds::api_create),
        route!(get "get" "/api/v1/operator/accounts", Operator, "Search accounts by e-mail", q &[("q", "string", false, "part of the e-mail")], b &[], 200 "{data: [account]}", operator::api_accounts),
        route!(get "get" "/api/v1/operator/accounts/{id}", Operator, "One account with its keys and audit log", q &[], b &[], 200 "{account, keys, audit}", operator::api_account),
        route!(post "post" "/api/v1/operator/accounts/{id}/status", Operator, "Suspend, reactivate or terminate an account", q &[], b STATUS, 200 "{account}", operator::api_account_status),
        route!(post "post" "/api/v1/operator/accounts/{id}/credits", Operator, "Grant or take back credits (never below zero)", q &[], b &[("amount_usd", "string", true, "positive grants, negative takes back"), ("reason", "string", true, "why (kept in the audit log)")], 200 "{account}", operator::api_credits),
        route!(post "post" "/api/v1/operator/keys/{id}/status", Operator, "Suspend, reactivate or revoke a key", q &[], b STATUS, 200 "{key}", operator::api_key_status),
        route!(post "post" "/api/v1/operator/accounts/{id}/limits", Operator, "Set an account's own rate limits (empty: the conf's defaults)", q &[], b LIMITS, 200 "{account}", operator::api_limits),
        route!(post "post" "/api/v1/operator/accounts/{id}/throttle", Operator, "Throttle an account (lower its limits for a while) or lift it", q &[], b THROTTLE, 200 "{account}", operator::api_throttle),
        route!(post "post" "/api/v1/operator/keys/{id}/limits", Operator, "Set a key's own rate limits (empty: the conf's defaults)", q &[], b LIMITS, 200 "{key}", operator::api_key_limits),
        route!(post "post" "/api/v1/operator/keys/{id}/throttle", Operator, "Throttle a key or lift it", q &[], b THROTTLE, 200 "{key}", operator::api_key_throttle),
        route!(get "get" "/api/v1/operator/refunds", Operator, "The refund requests waiting for review", q &[], b &[], 200 "{data: [refund request]}", refunds::api_queue),
        route!(post "post" "/api/v1/operator/refunds/{id}/approve", Operator, "Approve: take the credits, refund the payments through Stripe", q &[], b &[], 200 "{refund request}", refunds::api_approve),
        route!(post "post" "/api/v1/operator/refunds/{id}/decline", Operator, "Decline with a note to the customer", q &[], b &[("note", "string", true, "why")], 200 "{refund request}", refunds::api_decline),
        route!(get "get" "/api/v1/operator/revenue", Operator, "Top-ups, refunds, billed usage, provider cost and margin per day and tier", q DATES, b &[], 200 "{days, tiers}", operator::api_revenue),
        route!(get "get" "/api/v1/operator/upstreams", Operator, "Requests, errors, latency and fallbacks per upstream model over 24 hours, and each provider's prepaid credit left", q &[], b &[], 200 "{data, prepaid}", operator::api_upstreams),
        route!(get "get" "/api/v1/operator/audit", Operator, "The audit log, newest first, filtered (the CSV of every match is /operator/audit.csv; the ledger's and usage's for a date range are /operator/exports/ledger.csv and usage.csv)", q &[("from", "string", false, "first day, YYYY-MM-DD"), ("to", "string", false, "last day, inclusive"), ("account", "string", false, "an account id or e-mail"), ("actor", "string", false, "exactly this actor"), ("action", "string", false, "actions starting with this"), ("limit", "integer", false, "1 to 200, default 200")], b &[], 200 "{from, to, data: [entry]}", exports::api_audit),
        route!(get "get" "/api/v1/openapi.json", Public, "This description", q &[], b &[], 200 "an OpenAPI 3.1 document", openapi_json),
    ]
}

fn schema_of(fields: &[Field]) -> Value {
    let mut props = Map::new();
    for (name, ty, _, what) in fields {
        props.insert((*name).into(), json!({"type": ty, "description": what}));
    }
    let required: Vec<&str> = fields.iter().filter(|f| f.2).map(|f| f.0).collect();
    json!({"type": "object", "properties": props, "required": required})
}

/// The OpenAPI 3.1 document of [`routes`].
pub fn document(public_url: &str) -> Value {
    let mut paths = Map::new();
    for r in routes() {
        let mut params: Vec<Value> = r
            .query
            .iter()
            .map(|(name, ty, required, what)| json!({"name": name, "in": "query", "required": required, "description": what, "schema": {"type": ty}}))
            .collect();
        if r.path.contains("{id}") {
            params.push(json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}));
        }
        let security = match r.access {
            Access::Public => json!([]),
            Access::Customer | Access::Operator => json!([{"session": [], "csrf": []}]),
        };
        let tag = match r.access {
            Access::Operator => "operator",
            _ if r.path.starts_with("/api/v1/keys") => "keys",
            _ if r.path.starts_with("/api/v1/credits") || r.path.starts_with("/api/v1/refunds") => {
                "payments"
            }
            _ if r.path.starts_with("/api/v1/requests")
                || r.path.starts_with("/api/v1/usage")
                || r.path == "/api/v1/balance" =>
            {
                "usage"
            }
            _ => "account",
        };
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}_{}", r.method, r.path.trim_start_matches("/api/v1/").replace(['/', '.', '{', '}'], "_")),
            "tags": [tag],
            "security": security,
            "parameters": params,
            "responses": {
                r.ok.0.to_string(): {"description": r.ok.1},
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
                "404": {"$ref": "#/components/responses/Error"},
                "429": {"$ref": "#/components/responses/Error"},
                "503": {"$ref": "#/components/responses/Error"},
            },
        });
        if !r.body.is_empty() {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema_of(r.body)}}});
        }
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Duang Duang relay: dashboard API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The admin's JSON API: accounts, keys, usage, payments and operator actions. Sign in with /api/v1/login (or /api/v1/signup): the session cookie `duang_sid` authenticates later calls, and every state-changing call of a signed-in session sends the `csrf_token` it got back in the `x-csrf-token` header. Errors are {\"error\": {\"message\", \"code\", \"field\"}}. The model API (/v1/chat/completions) is served by the gateway and follows OpenAI's.",
        },
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "duang_sid"},
                "csrf": {"type": "apiKey", "in": "header", "name": "x-csrf-token"},
            },
            "responses": {
                "Error": {
                    "description": "What went wrong",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"error": {"type": "object", "properties": {
                            "message": {"type": "string"},
                            "code": {"type": "string"},
                            "field": {"type": ["string", "null"]},
                        }, "required": ["message", "code"]}},
                        "required": ["error"],
                    }}},
                },
            },
        },
    })
}

pub async fn openapi_json(State(state): State<AppState>) -> Json<Value> {
    Json(document(
        state.conf.admin.public_url.as_str().trim_end_matches('/'),
    ))
}
