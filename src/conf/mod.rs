//! The operator's conf file (`conf/duang.toml`), read by both binaries.
//!
//! Two steps, as in river: `raw` is the file's shape for serde (unknown keys refused, explicit
//! defaults); `convert` turns it into the typed [`Conf`] below (durations, non-zero limits, money
//! types, resolved provider references) and is the only place that judges values. Every error
//! names the file, the key path, the bad value and what was expected.

mod convert;
mod raw;

use crate::money::{CachePrices, TokenPrices};
use crate::secret::Secret;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// The default conf path, relative to the working directory.
pub const DEFAULT_CONF_PATH: &str = "conf/duang.toml";

/// One problem in the conf file, located by key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfError {
    pub file: String,
    /// Dotted key path, e.g. `tiers.premium.upstreams[1].provider`; empty for the whole file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Everything wrong with a conf file (all validation problems are reported at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfErrors(pub Vec<ConfError>);

impl fmt::Display for ConfErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfErrors {}

/// The validated conf. Built only by [`Conf::load`] or [`Conf::parse`].
#[derive(Debug, Clone)]
pub struct Conf {
    /// The file it came from, as given (used in messages).
    pub source: String,
    pub gateway: GatewayConf,
    pub admin: AdminConf,
    pub store: StoreConf,
    pub redis: Option<RedisConf>,
    pub limits: LimitsConf,
    pub tiers: Vec<Tier>,
    pub providers: Vec<Provider>,
    /// `None` when Stripe is off: the dashboard says payments are not available.
    pub stripe: Option<StripeConf>,
    pub mail: MailConf,
    pub brand: BrandConf,
    pub usage: UsageConf,
    /// Things that are allowed but probably not meant (printed by `check-conf` and at start).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct GatewayConf {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub public_base_url: Url,
    pub max_request_body_bytes: NonZeroU64,
    /// A kept-alive client connection with no new request for this long is closed.
    pub keepalive_idle_s: u64,
    /// A request's line and headers must arrive whole within this, counted from the
    /// connection's start for its first request and from the first byte for later ones.
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this after its head.
    pub body_read_timeout: Duration,
    /// The most a request's line and headers may take.
    pub max_header_bytes: usize,
    /// Client connections this process holds open at once; past it a new one is answered 503.
    pub max_client_connections: usize,
    pub threads: NonZeroU32,
    pub graceful_shutdown_timeout: Duration,
    /// This node's stable name (default `{hostname}:{listen port}`); each process adds its start
    /// to it for its leases (see `gateway::nodes`).
    pub node_id: String,
    /// Where settlements are journaled before they are stored; `None`: beside the SQLite file
    /// (`<file>.settlements`), or `data/settlements` for PostgreSQL.
    pub journal_dir: Option<PathBuf>,
    /// How often the journal is flushed to disk: what a power loss can lose at most.
    pub journal_fsync_interval: Duration,
    /// A gateway instance that has not renewed its heartbeat for this long is gone: its leases
    /// return to the balances.
    pub lease_expiry: Duration,
    /// Listen with SO_REUSEPORT, so a new process can take the port beside a draining old one
    /// (a rolling deploy on one machine). Off by default: with it, a second gateway started on
    /// the same port by mistake shares the traffic instead of failing to start.
    pub reuse_port: bool,
    /// Browser apps allowed to call the API directly (`[gateway.cors]`).
    pub cors: Cors,
}

/// `[gateway.cors]`: the origins whose browser apps may call the API (none by default).
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`), or `*` for any.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age_s: u32,
}

impl Cors {
    /// Whether a browser app at `origin` may call the API.
    pub fn allows(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// What a tier serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TierKind {
    /// Chat completions, Messages and Responses (`/v1/chat/completions`, ...).
    #[default]
    Chat,
    /// Embeddings (`/v1/embeddings`), priced per input token.
    Embeddings,
}

/// What a tier's answers show in `model`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResponseModel {
    /// The tier's name, as the customer asked (the default: a reseller need not show its
    /// upstreams).
    #[default]
    Tier,
    /// The upstream's own model name.
    Upstream,
}

/// The operator's brand: what every page, mail and error names, and the policy texts.
#[derive(Debug, Clone)]
pub struct BrandConf {
    pub product_name: String,
    /// Who provides the service (receipts, footer, policies); default: the product name.
    pub legal_entity: String,
    /// Terms, Privacy, Refund and Acceptable Use, in that order.
    pub policies: Vec<PolicyDoc>,
}

/// A policy text: Markdown whose first line is `# Title`; `{product_name}`, `{legal_entity}` and
/// `{support_email}` in it are replaced when it is shown.
#[derive(Debug, Clone)]
pub struct PolicyDoc {
    pub slug: &'static str,
    pub title: String,
    /// The Markdown after the title line.
    pub body: String,
    /// `YYYY-MM-DD`.
    pub updated: String,
}

/// The policies every relay publishes, by URL slug, with the shipped texts (the seeds').
pub const POLICY_SLUGS: [&str; 4] = ["terms", "privacy", "refunds", "acceptable-use"];
const SHIPPED_POLICIES: [&str; 4] = [
    include_str!("../../conf/policies/terms.md"),
    include_str!("../../conf/policies/privacy.md"),
    include_str!("../../conf/policies/refunds.md"),
    include_str!("../../conf/policies/acceptable-use.md"),
];
/// When the shipped texts last changed.
pub const SHIPPED_POLICIES_UPDATED: &str = "2026-12-01";

impl PolicyDoc {
    /// Splits `# Title` off the text; `None` when the first line is not a title.
    pub fn parse(slug: &'static str, text: &str, updated: &str) -> Option<PolicyDoc> {
        let text = text.trim_start_matches('\u{feff}').trim_start();
        let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
        let title = first.strip_prefix("# ")?.trim();
        (!title.is_empty()).then(|| PolicyDoc {
            slug,
            title: title.to_owned(),
            body: rest.trim().to_owned(),
            updated: updated.to_owned(),
        })
    }

    pub fn shipped(i: usize) -> PolicyDoc {
        PolicyDoc::parse(
            POLICY_SLUGS[i],
            SHIPPED_POLICIES[i],
            SHIPPED_POLICIES_UPDATED,
        )
        .expect("the shipped policies start with a title")
    }
}

#[derive(Debug, Clone)]
pub struct AdminConf {
    pub listen: SocketAddr,
    pub public_url: Url,
    pub support_email: String,
    /// Signs e-mailed links and CSRF tokens; `None`: a random key made once and kept in the store.
    pub signing_secret: Option<Secret<String>>,
    pub session_ttl: Duration,
    /// The dashboard warns below this balance.
    pub low_balance_warning: crate::money::NanoUsd,
    /// A session that passed the second factor this recently is not asked again before a
    /// sensitive action (key creation, refund request, password change); zero: always asked.
    pub two_factor_reauth: Duration,
    /// An operator's credit grant or adjustment larger than this (either sign) needs a typed
    /// confirmation, like terminating an account or revoking a key.
    pub confirm_credits_above: crate::money::NanoUsd,
}

/// `[usage]`: raw usage records and their retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConf {
    /// How long a raw usage record is kept (the admin deletes older ones in the background;
    /// hourly roll-ups are kept); `None` keeps them forever.
    pub retention: Option<Duration>,
}

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct StoreConf {
    /// May carry a password (only when it came from the environment).
    pub url: Secret<String>,
    pub backend: Backend,
    pub max_connections: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct RedisConf {
    pub url: Secret<String>,
    /// Every key the gateway writes starts with this (then a `{a<account>}` hash tag).
    pub key_prefix: String,
    pub on_outage: OutagePolicy,
    /// A limit check that takes longer counts as Redis being down.
    pub timeout: Duration,
}

/// What the gateway does while a configured Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutagePolicy {
    /// Enforce the limits per node, in process, until Redis is back (the default).
    Local,
    /// Refuse requests (503) until Redis is back.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct LimitsConf {
    pub default_key: KeyLimits,
    /// For every account without its own limits (all its keys together).
    pub default_account: KeyLimits,
    pub key_max: KeyMax,
}

/// Bounds on what a customer may set on their own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMax {
    pub limits: KeyLimits,
    pub spend_cap: crate::money::NanoUsd,
    pub expiry_days: NonZeroU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: NonZeroU32,
    pub tokens_per_minute: NonZeroU64,
    pub in_flight: NonZeroU32,
}

/// What a customer names in `model`, priced at the customer's rate.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: String,
    pub description: String,
    /// The customer's rate.
    pub prices: TokenPrices,
    /// Output cap used for the hold when a request sets no `max_tokens`.
    pub default_max_output_tokens: NonZeroU32,
    /// In fallback order.
    pub upstreams: Vec<Upstream>,
    /// The most input tokens one image part costs on any of the tier's upstreams: what a hold
    /// adds per image (an image URL is a few bytes of the body and many tokens upstream).
    pub image_input_tokens_max: u64,
    /// What answers show in `model`.
    pub response_model: ResponseModel,
    pub kind: TierKind,
    /// The customer's price for cached input (`cached_input_usd_per_mtok`); never a
    /// cache-write price (writes are billed as fresh input).
    pub cache: CachePrices,
}

impl Tier {
    /// The upstreams requests may go to now, in fallback order.
    pub fn enabled_upstreams(&self) -> impl Iterator<Item = &Upstream> {
        self.upstreams.iter().filter(|u| u.enabled)
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// Index into [`Conf::providers`].
    pub provider: usize,
    pub provider_name: String,
    pub model: String,
    pub weight: u32,
    /// What the provider charges us for this model.
    pub cost: TokenPrices,
    /// What it charges for cached input and cache writes.
    pub cache: CachePrices,
    /// The provider is on, and this is not a demo upstream displaced by a real one.
    pub enabled: bool,
}

/// The most input tokens one image costs, by provider kind, when a model's conf does not say:
/// from the providers' published rules. OpenAI: 85 + 170 per 512-px tile in high detail (1,105
/// for the largest image) and up to 1,536 32-px patches for the mini models; Anthropic: about
/// width × height / 750 with images resized to 1.15 megapixels (about 1,600); Gemini: 258 per
/// 768-px tile, or up to 1,120 at high media resolution (3,000 covers the tiling of large images).
pub fn default_image_input_tokens_max(kind: ProviderKind) -> u64 {
    match kind {
        ProviderKind::OpenAi => 1_536,
        ProviderKind::Anthropic => 1_600,
        ProviderKind::Gemini => 3_000,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat-completions API.
    OpenAi,
    /// Anthropic's native Messages API.
    Anthropic,
    /// Google's Gemini OpenAI-compatible endpoint.
    Gemini,
}

impl ProviderKind {
    pub const NAMES: [&'static str; 3] = ["openai", "anthropic", "gemini"];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: Url,
    /// The env var named by `api_key_env`, if any.
    pub api_key_env: Option<String>,
    pub api_key: Option<Secret<String>>,
    /// `ca_file` and the DER certificates read from it: the only roots trusted for this provider.
    /// Without it, the system's roots are used.
    pub ca_file: Option<PathBuf>,
    pub ca_certs: Vec<Vec<u8>>,
    pub enabled: bool,
    pub demo: bool,
    /// Serves OpenAI's Responses API (`responses_api`): Responses clients are passed through.
    pub responses_api: bool,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Failures in a row that start a cool-down, and how long it lasts.
    pub cooldown_after_failures: u32,
    pub cooldown: Duration,
    /// Below this much prepaid credit left (`duang-admin upstream-credit`), the operators are
    /// mailed and the metric's alert fires.
    pub prepaid_alert_below: Option<crate::money::NanoUsd>,
    /// Once its prepaid credit is spent, the provider's upstreams leave routing.
    pub leave_routing_when_prepaid_spent: bool,
    /// Upstream model name → what it costs us.
    pub models: Vec<(String, TokenPrices)>,
    /// The most input tokens each model (in `models` order) counts for one image.
    pub image_input_tokens_max: Vec<u64>,
    /// Each model's prompt-cache prices (in `models` order).
    pub cache_prices: Vec<CachePrices>,
}

#[derive(Debug, Clone)]
pub struct StripeConf {
    pub secret_key: Secret<String>,
    pub webhook_secret: Secret<String>,
    pub api_base_url: Url,
    pub currency: String,
    pub packages_cents: Vec<u32>,
    pub min_custom_amount_cents: u32,
    pub max_custom_amount_cents: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    StartTls,
    Tls,
    None,
}

#[derive(Debug, Clone)]
pub struct SmtpConf {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<Secret<String>>,
    pub password: Option<Secret<String>>,
}

#[derive(Debug, Clone)]
pub struct MailConf {
    pub from: String,
    /// `None`: mails go to [`MailConf::outbox_dir`].
    pub smtp: Option<SmtpConf>,
    pub outbox_dir: PathBuf,
}

impl Conf {
    /// Reads and validates a conf file, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Conf, ConfErrors> {
        Conf::load_with(path, true)
    }

    /// Like [`Conf::load`] but without Stripe's and SMTP's secrets (their fields are left
    /// empty): for the CLI's store commands, which call neither, so an operator can create an
    /// account or grant credit on a machine that does not hold those secrets.
    pub fn load_without_service_secrets(path: &Path) -> Result<Conf, ConfErrors> {
        Conf::load_with(path, false)
    }

    fn load_with(path: &Path, service_secrets: bool) -> Result<Conf, ConfErrors> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfErrors(vec![ConfError {
                file: label.clone(),
                key: String::new(),
                message: format!("cannot read the conf file: {e}"),
            }])
        })?;
        convert::parse(
            &text,
            &label,
            &|name| std::env::var(name).ok(),
            service_secrets,
        )
    }

    /// Validates conf text; `env` answers environment variable look-ups (tests pass their own).
    pub fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Conf, ConfErrors> {
        convert::parse(text, file, env, true)
    }

    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// The settings that differ between this running conf and `new` and that a reload cannot
    /// apply (a listener, the store, the process's threads and its node identity, Redis, the
    /// client-connection bounds, the admin's listener and signing key): each as its conf key.
    /// Everything else (tiers, prices, upstreams and weights, provider timeouts and cool-downs,
    /// limits and key caps, body size and timeout, CORS, brand, mail, Stripe) a reload applies.
    /// Why `new` cannot replace this running conf by a reload, if it cannot: the restart-only
    /// settings it changes, named.
    pub fn reload_refusal(&self, new: &Conf) -> Option<String> {
        let restart = self.restart_only_changes(new);
        (!restart.is_empty()).then(|| {
            format!(
                "{}: not reloaded: {} take{} effect only when the process restarts (restart it, or put the running value back); the running conf stays",
                self.source,
                restart.join(", "),
                if restart.len() == 1 { "s" } else { "" },
            )
        })
    }

    pub fn restart_only_changes(&self, new: &Conf) -> Vec<&'static str> {
        let (a, b) = (&self.gateway, &new.gateway);
        let redis = |c: &Conf| {
            c.redis.as_ref().map(|r| {
                (
                    r.url.expose().clone(),
                    r.key_prefix.clone(),
                    r.on_outage,
                    r.timeout,
                )
            })
        };
        let secret = |c: &Conf| c.admin.signing_secret.as_ref().map(|s| s.expose().clone());
        [
            ("gateway.listen", a.listen != b.listen),
            (
                "gateway.metrics_listen",
                a.metrics_listen != b.metrics_listen,
            ),
            ("gateway.threads", a.threads != b.threads),
            (
                "gateway.keepalive_idle_s",
                a.keepalive_idle_s != b.keepalive_idle_s,
            ),
            (
                "gateway.header_read_timeout_ms",
                a.header_read_timeout != b.header_read_timeout,
            ),
            (
                "gateway.max_header_bytes",
                a.max_header_bytes != b.max_header_bytes,
            ),
            (
                "gateway.max_client_connections",
                a.max_client_connections != b.max_client_connections,
            ),
            (
                "gateway.graceful_shutdown_timeout_ms",
                a.graceful_shutdown_timeout != b.graceful_shutdown_timeout,
            ),
            ("gateway.node_id", a.node_id != b.node_id),
            ("gateway.journal_dir", a.journal_dir != b.journal_dir),
            (
                "gateway.journal_fsync_interval_ms",
                a.journal_fsync_interval != b.journal_fsync_interval,
            ),
            ("gateway.lease_expiry_ms", a.lease_expiry != b.lease_expiry),
            ("gateway.reuse_port", a.reuse_port != b.reuse_port),
            (
                "store.url",
                self.store.url.expose() != new.store.url.expose(),
            ),
            (
                "store.max_connections",
                self.store.max_connections != new.store.max_connections,
            ),
            ("redis", redis(self) != redis(new)),
            ("admin.listen", self.admin.listen != new.admin.listen),
            ("admin.secret_env", secret(self) != secret(new)),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}
