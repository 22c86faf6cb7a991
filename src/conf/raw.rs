//! The conf file's shape, as serde sees it: strings and numbers with explicit defaults, unknown
//! keys refused. Nothing here is trusted; `super::convert` turns it into typed values.

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Visitor};
use std::fmt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConf {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub redis: RawRedis,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub tiers: IndexMap<String, RawTier>,
    #[serde(default)]
    pub providers: IndexMap<String, RawProvider>,
    #[serde(default)]
    pub stripe: RawStripe,
    #[serde(default)]
    pub smtp: RawSmtp,
    #[serde(default)]
    pub brand: RawBrand,
    #[serde(default)]
    pub usage: RawUsage,
}

/// `[usage]`: what happens to raw usage records over time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUsage {
    /// Days a raw usage record is kept; 0 keeps them forever.
    pub retention_days: i64,
}

impl Default for RawUsage {
    fn default() -> Self {
        RawUsage { retention_days: 90 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBrand {
    pub product_name: String,
    pub legal_entity: Option<String>,
    pub policies: IndexMap<String, RawPolicy>,
}

impl Default for RawBrand {
    fn default() -> Self {
        RawBrand {
            product_name: "Duang Duang".into(),
            legal_entity: None,
            policies: IndexMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub file: String,
    pub updated: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    pub listen: String,
    pub metrics_listen: String,
    pub public_base_url: String,
    pub max_request_body_bytes: i64,
    pub keepalive_idle_s: i64,
    pub header_read_timeout_ms: i64,
    pub body_read_timeout_ms: i64,
    pub max_header_bytes: i64,
    pub max_client_connections: i64,
    pub threads: i64,
    pub graceful_shutdown_timeout_ms: i64,
    pub node_id: Option<String>,
    pub journal_dir: Option<String>,
    pub journal_fsync_interval_ms: i64,
    pub lease_expiry_ms: i64,
    pub reuse_port: bool,
    pub cors: RawCors,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCors {
    pub allowed_origins: Vec<String>,
    pub max_age_s: i64,
}

impl Default for RawCors {
    fn default() -> Self {
        RawCors {
            allowed_origins: Vec::new(),
            max_age_s: 600,
        }
    }
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: "127.0.0.1:9090".into(),
            public_base_url: "http://127.0.0.1:8080/v1".into(),
            max_request_body_bytes: 10 * 1024 * 1024,
            keepalive_idle_s: 60,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
            max_header_bytes: 64 * 1024,
            max_client_connections: 10_000,
            threads: 1,
            graceful_shutdown_timeout_ms: 5000,
            node_id: None,
            journal_dir: None,
            journal_fsync_interval_ms: 1000,
            lease_expiry_ms: 300_000,
            reuse_port: false,
            cors: RawCors::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    pub public_url: String,
    pub support_email: String,
    pub secret_env: Option<String>,
    pub session_ttl_hours: i64,
    pub low_balance_warning_cents: i64,
    pub two_factor_reauth_minutes: i64,
    pub confirm_credits_above_cents: i64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:8081".into(),
            public_url: "http://127.0.0.1:8081".into(),
            support_email: "support@duang-duang.com".into(),
            secret_env: None,
            session_ttl_hours: 168,
            low_balance_warning_cents: 100,
            two_factor_reauth_minutes: 10,
            confirm_credits_above_cents: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub url: String,
    pub url_env: Option<String>,
    pub max_connections: i64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            url: "sqlite://data/duang.db".into(),
            url_env: None,
            max_connections: 8,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub key_prefix: Option<String>,
    pub on_outage: Option<String>,
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub default_key: RawKeyLimits,
    pub default_account: RawAccountLimits,
    pub key_max: RawKeyMax,
}

/// Limits of every account that has none of its own (all its keys together).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccountLimits {
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub in_flight: i64,
}

impl Default for RawAccountLimits {
    fn default() -> Self {
        RawAccountLimits {
            requests_per_minute: 1_200,
            tokens_per_minute: 4_000_000,
            in_flight: 64,
        }
    }
}

/// The most a customer may set on one of their own keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKeyMax {
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub in_flight: i64,
    pub spend_cap_cents: i64,
    pub expiry_days: i64,
}

impl Default for RawKeyMax {
    fn default() -> Self {
        RawKeyMax {
            requests_per_minute: 6_000,
            tokens_per_minute: 20_000_000,
            in_flight: 256,
            spend_cap_cents: 10_000_000,
            expiry_days: 365,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKeyLimits {
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub in_flight: i64,
}

impl Default for RawKeyLimits {
    fn default() -> Self {
        RawKeyLimits {
            requests_per_minute: 600,
            tokens_per_minute: 2_000_000,
            in_flight: 32,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    #[serde(default)]
    pub description: String,
    /// `"chat"` (the default) or `"embeddings"`: what the tier serves.
    pub kind: Option<String>,
    pub input_usd_per_mtok: MoneyText,
    /// Required for chat tiers; embeddings have no output tokens.
    pub output_usd_per_mtok: Option<MoneyText>,
    /// The customer's price for input the upstream read from its prompt cache (default: the
    /// input price).
    pub cached_input_usd_per_mtok: Option<MoneyText>,
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: i64,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// `"tier"` (the default) or `"upstream"`: what answers show in `model`.
    pub response_model: Option<String>,
}

fn default_max_output_tokens() -> i64 {
    4096
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub provider: String,
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: i64,
}

fn default_weight() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: String,
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// PEM file of extra trust roots for an https base URL (a self-hosted model behind a private CA).
    pub ca_file: Option<String>,
    pub enabled: Option<bool>,
    #[serde(default)]
    pub demo: bool,
    /// The provider serves OpenAI's Responses API at `{base_url}/responses`.
    #[serde(default)]
    pub responses_api: bool,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: i64,
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: i64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: i64,
    #[serde(default = "default_cooldown_after_failures")]
    pub cooldown_after_failures: i64,
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: i64,
    /// Mail the operators (and raise the metric's alert) once the prepaid credit recorded for
    /// this provider falls below this many US dollars.
    pub prepaid_alert_below_usd: Option<MoneyText>,
    /// Once the prepaid credit recorded for this provider is spent, its upstreams leave routing
    /// (each tier falls back to its next upstream).
    #[serde(default)]
    pub leave_routing_when_prepaid_spent: bool,
    #[serde(default)]
    pub models: IndexMap<String, RawModelPrices>,
}

fn default_connect_timeout_ms() -> i64 {
    3_000
}
fn default_first_byte_timeout_ms() -> i64 {
    60_000
}
fn default_idle_timeout_ms() -> i64 {
    30_000
}
fn default_cooldown_after_failures() -> i64 {
    3
}
fn default_cooldown_ms() -> i64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPrices {
    pub input_usd_per_mtok: MoneyText,
    pub output_usd_per_mtok: MoneyText,
    /// The most input tokens the provider counts for one image (default by provider kind).
    #[serde(default)]
    pub image_input_tokens_max: Option<i64>,
    /// What input read from the provider's prompt cache costs (default: the input price).
    pub cached_input_usd_per_mtok: Option<MoneyText>,
    /// What input written to the provider's prompt cache costs (default: the input price).
    pub cache_write_usd_per_mtok: Option<MoneyText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStripe {
    pub enabled: bool,
    pub secret_key_env: String,
    pub webhook_secret_env: String,
    pub api_base_url: String,
    pub currency: String,
    pub packages_cents: Vec<i64>,
    pub min_custom_amount_cents: i64,
    pub max_custom_amount_cents: i64,
}

impl Default for RawStripe {
    fn default() -> Self {
        RawStripe {
            enabled: false,
            secret_key_env: "STRIPE_SECRET_KEY".into(),
            webhook_secret_env: "STRIPE_WEBHOOK_SECRET".into(),
            api_base_url: "https://api.stripe.com".into(),
            currency: "usd".into(),
            packages_cents: vec![500, 2000, 10000],
            min_custom_amount_cents: 500,
            max_custom_amount_cents: 100_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSmtp {
    pub enabled: bool,
    pub host: String,
    pub port: i64,
    pub tls: String,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub from: String,
    pub outbox_dir: String,
}

impl Default for RawSmtp {
    fn default() -> Self {
        RawSmtp {
            enabled: false,
            host: "localhost".into(),
            port: 587,
            tls: "starttls".into(),
            username_env: None,
            password_env: None,
            from: "Duang Duang <no-reply@duang-duang.com>".into(),
            outbox_dir: "data/outbox".into(),
        }
    }
}

/// A money value as the operator wrote it: a decimal string (`"0.12"`) or a whole number (`18`).
/// A TOML float is refused with a message, because a float cannot hold most prices exactly.
#[derive(Debug, Clone)]
pub struct MoneyText(pub String);

impl<'de> Deserialize<'de> for MoneyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MoneyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string such as \"0.12\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MoneyText, E> {
                Ok(MoneyText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MoneyText, E> {
                Ok(MoneyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MoneyText, E> {
                Ok(MoneyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MoneyText, E> {
                Err(E::custom(format_args!(
                    "{v} is a float; write money as a decimal string, e.g. \"{v}\" (floats cannot hold most prices exactly)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}
