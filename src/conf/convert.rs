//! From the raw file shape to the typed [`Conf`]: every judgement on a value happens here, and
//! every problem is collected with its key path so the operator sees them all at once.

use super::raw::{MoneyText, RawConf, RawKeyLimits, RawProvider, RawSmtp, RawStripe, RawTier};
use super::*;
use crate::money::{CachePrices, PricePerMtok, TokenPrices};
use std::collections::HashSet;

/// Longest timeout we accept anywhere: one hour.
const MAX_TIMEOUT_MS: i64 = 3_600_000;
/// Stripe's smallest and largest USD charge.
const STRIPE_MIN_CENTS: i64 = 50;
const STRIPE_MAX_CENTS: i64 = 99_999_999;

pub(super) fn parse(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    service_secrets: bool,
) -> Result<Conf, ConfErrors> {
    let raw = parse_raw(text, file)?;
    let mut c = Checker {
        file,
        env,
        service_secrets,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let conf = c.conf(raw);
    if c.errors.is_empty() {
        conf.map(|mut conf| {
            conf.warnings = c.warnings;
            conf
        })
        .ok_or_else(|| ConfErrors(Vec::new()))
    } else {
        Err(ConfErrors(c.errors))
    }
}

fn parse_raw(text: &str, file: &str) -> Result<RawConf, ConfErrors> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize::<_, RawConf>(de).map_err(|e| {
        let inner = e.inner();
        let line = inner
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let mut key = e.path().to_string();
        if key == "." {
            key.clear();
        }
        let mut message = inner.message().trim().to_string();
        if let Some(line) = line {
            message.push_str(&format!(" (line {line})"));
        }
        ConfErrors(vec![ConfError {
            file: file.to_owned(),
            key,
            message,
        }])
    })
}

struct Checker<'a> {
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Whether Stripe's and SMTP's secrets are read (false for CLI commands that call neither:
    /// their secret fields are then empty).
    service_secrets: bool,
    errors: Vec<ConfError>,
    warnings: Vec<String>,
}

impl Checker<'_> {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfError {
            file: self.file.to_owned(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Collects an error and yields `None`, so a conversion can go on and report more problems.
    fn ok<T, E: fmt::Display>(&mut self, key: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(key, e.to_string());
                None
            }
        }
    }

    fn env_var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    fn conf(&mut self, raw: RawConf) -> Option<Conf> {
        let gateway = self.gateway(&raw);
        let admin = self.admin(&raw);
        let store = self.store(&raw);
        let redis = self.redis(&raw);
        let default_key = self.key_limits("limits.default_key", &raw.limits.default_key);
        let key_max = self.key_max(&raw.limits.key_max);
        let a = &raw.limits.default_account;
        let default_account = self.key_limits(
            "limits.default_account",
            &RawKeyLimits {
                requests_per_minute: a.requests_per_minute,
                tokens_per_minute: a.tokens_per_minute,
                in_flight: a.in_flight,
            },
        );
        let providers = self.providers(&raw);
        let tiers = providers.as_ref().and_then(|p| self.tiers(&raw.tiers, p));
        let stripe = self.stripe(&raw.stripe);
        let mail = self.mail(&raw.smtp);
        let brand = self.brand(&raw.brand);
        let usage = self.usage(&raw.usage);
        Some(Conf {
            source: self.file.to_owned(),
            gateway: gateway?,
            admin: admin?,
            store: store?,
            redis: redis?,
            limits: LimitsConf {
                default_key: default_key?,
                default_account: default_account?,
                key_max: key_max?,
            },
            tiers: tiers?,
            providers: providers?,
            stripe: stripe?,
            mail: mail?,
            brand: brand?,
            usage: usage?,
            warnings: Vec::new(),
        })
    }

    fn usage(&mut self, u: &super::raw::RawUsage) -> Option<UsageConf> {
        const MAX_DAYS: i64 = 3650;
        match u.retention_days {
            0 => Some(UsageConf { retention: None }),
            d if (1..=MAX_DAYS).contains(&d) => Some(UsageConf {
                retention: Some(Duration::from_secs(d as u64 * 86_400)),
            }),
            d => {
                self.err(
                    "usage.retention_days",
                    format!(
                        "{d} is out of range: expected 0 (keep raw usage records forever) or 1 to {MAX_DAYS} days (ten years)"
                    ),
                );
                None
            }
        }
    }

    fn brand(&mut self, b: &super::raw::RawBrand) -> Option<super::BrandConf> {
        let name = b.product_name.trim();
        if name.is_empty() || name.chars().count() > 80 {
            self.err("brand.product_name", "give a name of 1 to 80 characters");
        }
        let legal = b
            .legal_entity
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .unwrap_or(name);
        for slug in b.policies.keys() {
            if !super::POLICY_SLUGS.contains(&slug.as_str()) {
                self.err(
                    format!("brand.policies.{slug}"),
                    format!(
                        "no policy named {slug:?} (the policies are {})",
                        super::POLICY_SLUGS.join(", ")
                    ),
                );
            }
        }
        let base = std::path::Path::new(self.file)
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let mut policies = Vec::new();
        for (i, slug) in super::POLICY_SLUGS.iter().enumerate() {
            let Some(p) = b.policies.get(*slug) else {
                policies.push(super::PolicyDoc::shipped(i));
                continue;
            };
            let key = format!("brand.policies.{slug}");
            if crate::time::parse_date(p.updated.trim()).is_none() {
                self.err(
                    format!("{key}.updated"),
                    format!("{:?} is not a date: use YYYY-MM-DD", p.updated),
                );
            }
            let path = base.join(&p.file);
            match std::fs::read_to_string(&path) {
                Ok(text) => match super::PolicyDoc::parse(slug, &text, p.updated.trim()) {
                    Some(doc) => policies.push(doc),
                    None => self.err(
                        format!("{key}.file"),
                        format!(
                            "{}: the first line must be the title, as \"# Terms of Service\"",
                            path.display()
                        ),
                    ),
                },
                Err(e) => self.err(
                    format!("{key}.file"),
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
        }
        (policies.len() == super::POLICY_SLUGS.len()).then(|| super::BrandConf {
            product_name: name.to_owned(),
            legal_entity: legal.to_owned(),
            policies,
        })
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        let r = value.parse::<SocketAddr>().map_err(|_| {
            format!(
                "{value:?} is not a socket address (expected host:port, e.g. \"127.0.0.1:8080\")"
            )
        });
        self.ok(key, r)
    }

    fn http_url(&mut self, key: &str, value: &str) -> Option<Url> {
        let r = Url::parse(value)
            .map_err(|e| {
                format!(
                    "{value:?} is not a URL ({e}); expected e.g. \"https://api.example.com/v1\""
                )
            })
            .and_then(|u| match u.scheme() {
                "http" | "https" if u.host().is_some() => Ok(u),
                _ => Err(format!("{value:?} is not an http:// or https:// URL")),
            });
        self.ok(key, r)
    }

    fn positive<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        value: i64,
        max: i64,
        unit: &str,
    ) -> Option<T> {
        if value <= 0 || value > max {
            self.err(
                key,
                format!("{value} is out of range: expected 1 to {max} {unit}"),
            );
            return None;
        }
        T::try_from(value).ok()
    }

    fn duration_ms(&mut self, key: &str, value: i64) -> Option<Duration> {
        let ms: u64 = self.positive(key, value, MAX_TIMEOUT_MS, "ms")?;
        Some(Duration::from_millis(ms))
    }

    fn gateway(&mut self, raw: &RawConf) -> Option<GatewayConf> {
        let g = &raw.gateway;
        let listen = self.addr("gateway.listen", &g.listen);
        let metrics_listen = self.addr("gateway.metrics_listen", &g.metrics_listen);
        if listen.is_some() && listen == metrics_listen {
            self.err(
                "gateway.metrics_listen",
                format!(
                    "{:?} is also gateway.listen; metrics need their own port",
                    g.metrics_listen
                ),
            );
        }
        let public_base_url = self.http_url("gateway.public_base_url", &g.public_base_url);
        let max_body = self.positive::<u64>(
            "gateway.max_request_body_bytes",
            g.max_request_body_bytes,
            1 << 30,
            "bytes (1 GiB)",
        );
        let keepalive = self.positive::<u64>(
            "gateway.keepalive_idle_s",
            g.keepalive_idle_s,
            3600,
            "seconds (an hour)",
        );
        let header_timeout: Option<u64> = self.positive(
            "gateway.header_read_timeout_ms",
            g.header_read_timeout_ms,
            600_000,
            "ms (ten minutes)",
        );
        let body_timeout: Option<u64> = self.positive(
            "gateway.body_read_timeout_ms",
            g.body_read_timeout_ms,
            3_600_000,
            "ms (an hour)",
        );
        let max_header = if (1024..=1024 * 1024).contains(&g.max_header_bytes) {
            Some(g.max_header_bytes as usize)
        } else {
            self.err(
                "gateway.max_header_bytes",
                format!(
                    "{} is out of range: expected 1024 to 1048576 bytes (Pingora reads no head larger than 1 MiB)",
                    g.max_header_bytes
                ),
            );
            None
        };
        let max_connections: Option<usize> = self.positive(
            "gateway.max_client_connections",
            g.max_client_connections,
            1_000_000,
            "connections",
        );
        let threads = self.positive::<u32>("gateway.threads", g.threads, 256, "threads");
        let grace = self.duration_ms(
            "gateway.graceful_shutdown_timeout_ms",
            g.graceful_shutdown_timeout_ms,
        );
        let node_id = match &g.node_id {
            Some(n)
                if n.is_empty()
                    || n.len() > 100
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c)) =>
            {
                self.err(
                    "gateway.node_id",
                    format!("{n:?} is not a node name: use 1 to 100 letters, digits, '.', '_', ':' or '-'"),
                );
                None
            }
            Some(n) => Some(n.clone()),
            None => {
                let host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "gateway".into());
                let host: String = host
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._-".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                listen.map(|l| format!("{host}:{}", l.port()))
            }
        };
        let journal_dir = match &g.journal_dir {
            Some(d) if d.trim().is_empty() => {
                self.err("gateway.journal_dir", "empty path");
                None
            }
            Some(d) => Some(Some(PathBuf::from(d))),
            None => Some(None),
        };
        let fsync: Option<u64> = self.positive(
            "gateway.journal_fsync_interval_ms",
            g.journal_fsync_interval_ms,
            60_000,
            "ms",
        );
        let lease_expiry = if g.lease_expiry_ms < 3_000 || g.lease_expiry_ms > 3_600_000 {
            self.err(
                "gateway.lease_expiry_ms",
                format!(
                    "{} is out of range: expected 3000 to 3600000 ms (it must leave room for several heartbeats, one every {} ms)",
                    g.lease_expiry_ms,
                    crate::gateway::nodes::HEARTBEAT_EVERY.as_millis()
                ),
            );
            None
        } else {
            Some(Duration::from_millis(g.lease_expiry_ms as u64))
        };
        let cors = self.cors(&g.cors);
        Some(GatewayConf {
            cors: cors?,
            node_id: node_id?,
            journal_dir: journal_dir?,
            journal_fsync_interval: Duration::from_millis(fsync?),
            lease_expiry: lease_expiry?,
            reuse_port: g.reuse_port,
            listen: listen?,
            metrics_listen: metrics_listen?,
            public_base_url: public_base_url?,
            max_request_body_bytes: NonZeroU64::new(max_body?)?,
            keepalive_idle_s: keepalive?,
            header_read_timeout: Duration::from_millis(header_timeout?),
            body_read_timeout: Duration::from_millis(body_timeout?),
            max_header_bytes: max_header?,
            max_client_connections: max_connections?,
            threads: NonZeroU32::new(threads?)?,
            graceful_shutdown_timeout: grace?,
        })
    }

    fn cors(&mut self, c: &super::raw::RawCors) -> Option<super::Cors> {
        let mut ok = true;
        for o in &c.allowed_origins {
            let fine = o == "*"
                || Url::parse(o).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some()
                        && u.path() == "/"
                        && !o.ends_with('/')
                        && u.query().is_none()
                });
            if !fine {
                self.err(
                    "gateway.cors.allowed_origins",
                    format!("{o:?} is not an origin: write scheme://host[:port], such as \"https://app.example.com\", without a path or trailing slash (or \"*\" for any)"),
                );
                ok = false;
            }
        }
        let max_age = self.positive::<u32>("gateway.cors.max_age_s", c.max_age_s, 86_400, "s");
        if c.allowed_origins.iter().any(|o| o == "*") {
            self.warnings.push(format!("{}: gateway.cors.allowed_origins has \"*\": any web page may call the API with a key it holds", self.file));
        }
        Some(super::Cors {
            allowed_origins: c.allowed_origins.clone(),
            max_age_s: max_age?,
        })
        .filter(|_| ok)
    }

    fn admin(&mut self, raw: &RawConf) -> Option<AdminConf> {
        let a = &raw.admin;
        let listen = self.addr("admin.listen", &a.listen);
        let public_url = self.http_url("admin.public_url", &a.public_url);
        if !crate::email::is_valid(&a.support_email) {
            self.err(
                "admin.support_email",
                format!("{:?} is not an e-mail address", a.support_email),
            );
        }
        let signing_secret = match &a.secret_env {
            None => Some(None),
            Some(var) => match self.env_var(var) {
                Some(v) if v.len() >= 32 => Some(Some(Secret::new(v))),
                Some(_) => {
                    self.err("admin.secret_env", format!("environment variable {var} is too short: use at least 32 random characters (e.g. `openssl rand -hex 32`)"));
                    None
                }
                None => {
                    self.err("admin.secret_env", format!("environment variable {var} is not set; set it or remove secret_env to let the admin keep its own key in the store"));
                    None
                }
            },
        };
        let ttl_hours = self.positive::<u64>(
            "admin.session_ttl_hours",
            a.session_ttl_hours,
            24 * 366,
            "hours (a year)",
        );
        let low = if a.low_balance_warning_cents < 0 {
            self.err(
                "admin.low_balance_warning_cents",
                format!(
                    "{} is negative; use 0 to turn the warning off",
                    a.low_balance_warning_cents
                ),
            );
            None
        } else {
            crate::money::NanoUsd::from_cents(a.low_balance_warning_cents).ok()
        };
        let reauth = if (0..=24 * 60).contains(&a.two_factor_reauth_minutes) {
            Some(Duration::from_secs(a.two_factor_reauth_minutes as u64 * 60))
        } else {
            self.err(
                "admin.two_factor_reauth_minutes",
                format!(
                    "{} is out of range: 0 (ask for a code before every sensitive action) to 1440 (a day)",
                    a.two_factor_reauth_minutes
                ),
            );
            None
        };
        let confirm_above = if a.confirm_credits_above_cents < 0 {
            self.err(
                "admin.confirm_credits_above_cents",
                format!(
                    "{} is negative; use 0 to confirm every adjustment",
                    a.confirm_credits_above_cents
                ),
            );
            None
        } else {
            crate::money::NanoUsd::from_cents(a.confirm_credits_above_cents).ok()
        };
        Some(AdminConf {
            listen: listen?,
            public_url: public_url?,
            support_email: a.support_email.clone(),
            signing_secret: signing_secret?,
            session_ttl: Duration::from_secs(ttl_hours? * 3600),
            low_balance_warning: low?,
            two_factor_reauth: reauth?,
            confirm_credits_above: confirm_above?,
        })
    }

    /// `url_env` (when set and present) wins over `url`; a password may only come from the env.
    fn url_from(
        &mut self,
        section: &str,
        url: Option<&str>,
        url_env: Option<&str>,
    ) -> Option<(String, bool)> {
        if let Some(var) = url_env {
            if let Some(v) = self.env_var(var) {
                return Some((v, true));
            }
            if url.is_none() {
                self.err(
                    format!("{section}.url_env"),
                    format!("environment variable {var} is not set (and {section}.url is absent)"),
                );
                return None;
            }
        }
        url.map(|u| (u.to_owned(), false))
    }

    fn store(&mut self, raw: &RawConf) -> Option<StoreConf> {
        let s = &raw.store;
        let (url, from_env) = self.url_from("store", Some(&s.url), s.url_env.as_deref())?;
        let key = if from_env {
            "store.url_env"
        } else {
            "store.url"
        };
        let shown = if from_env {
            format!("${}", s.url_env.as_deref().unwrap_or(""))
        } else {
            format!("{url:?}")
        };
        let backend = if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match Url::parse(&url) {
                Ok(u) if u.password().is_some() && !from_env => {
                    self.err(key, "the URL carries a password; secrets never live in the conf file: put the URL in an environment variable and name it in store.url_env");
                    None
                }
                Ok(_) => Some(Backend::Postgres),
                Err(e) => {
                    self.err(key, format!("{shown} is not a PostgreSQL URL ({e})"));
                    None
                }
            }
        } else {
            self.err(
                key,
                format!(
                    "{shown} is not a store URL: expected sqlite://PATH or postgres://USER@HOST/DB"
                ),
            );
            None
        };
        let max_connections = self.positive::<u32>(
            "store.max_connections",
            s.max_connections,
            1000,
            "connections",
        );
        Some(StoreConf {
            url: Secret::new(url),
            backend: backend?,
            max_connections: NonZeroU32::new(max_connections?)?,
        })
    }

    fn redis(&mut self, raw: &RawConf) -> Option<Option<RedisConf>> {
        let r = &raw.redis;
        if r.url.is_none() && r.url_env.is_none() {
            return Some(None);
        }
        let (url, from_env) = self.url_from("redis", r.url.as_deref(), r.url_env.as_deref())?;
        let key = if from_env {
            "redis.url_env"
        } else {
            "redis.url"
        };
        match Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "redis" | "rediss" | "redis+unix" | "unix") => {
                if u.password().is_some() && !from_env {
                    self.err(key, "the URL carries a password; put it in an environment variable and name it in redis.url_env");
                    return None;
                }
                let prefix = r.key_prefix.clone().unwrap_or_else(|| "duang".into());
                let prefix_ok = !prefix.is_empty()
                    && prefix.len() <= 64
                    && prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
                if !prefix_ok {
                    self.err("redis.key_prefix", format!("{prefix:?}: use 1 to 64 letters, digits, '-', '_', '.' or ':' (no braces: the gateway adds the hash tag)"));
                }
                let on_outage = match r.on_outage.as_deref().unwrap_or("local") {
                    "local" => Some(OutagePolicy::Local),
                    "refuse" => Some(OutagePolicy::Refuse),
                    other => {
                        self.err("redis.on_outage", format!("{other:?} is not a policy: use \"local\" (enforce limits per node while Redis is down) or \"refuse\" (answer 503)"));
                        None
                    }
                };
                let timeout = self.duration_ms("redis.timeout_ms", r.timeout_ms.unwrap_or(100));
                Some(Some(RedisConf {
                    url: Secret::new(url),
                    key_prefix: prefix,
                    on_outage: on_outage?,
                    timeout: timeout?,
                }))
            }
            _ => {
                let shown = if from_env {
                    "the URL".to_owned()
                } else {
                    format!("{url:?}")
                };
                self.err(key, format!("{shown} is not a Redis URL: expected redis://HOST:PORT[/DB] or rediss://..."));
                None
            }
        }
    }

    fn key_max(&mut self, raw: &super::raw::RawKeyMax) -> Option<KeyMax> {
        let limits = self.key_limits(
            "limits.key_max",
            &RawKeyLimits {
                requests_per_minute: raw.requests_per_minute,
                tokens_per_minute: raw.tokens_per_minute,
                in_flight: raw.in_flight,
            },
        );
        let cap = self.positive::<i64>(
            "limits.key_max.spend_cap_cents",
            raw.spend_cap_cents,
            1_000_000_000_000,
            "cents",
        );
        let days = self.positive::<u32>(
            "limits.key_max.expiry_days",
            raw.expiry_days,
            36_500,
            "days",
        );
        Some(KeyMax {
            limits: limits?,
            spend_cap: crate::money::NanoUsd::from_cents(cap?).ok()?,
            expiry_days: NonZeroU32::new(days?)?,
        })
    }

    fn key_limits(&mut self, key: &str, raw: &RawKeyLimits) -> Option<KeyLimits> {
        let rpm = self.positive::<u32>(
            &format!("{key}.requests_per_minute"),
            raw.requests_per_minute,
            10_000_000,
            "requests per minute",
        );
        let tpm = self.positive::<u64>(
            &format!("{key}.tokens_per_minute"),
            raw.tokens_per_minute,
            1 << 40,
            "tokens per minute",
        );
        let inf = self.positive::<u32>(
            &format!("{key}.in_flight"),
            raw.in_flight,
            100_000,
            "requests in flight",
        );
        Some(KeyLimits {
            requests_per_minute: NonZeroU32::new(rpm?)?,
            tokens_per_minute: NonZeroU64::new(tpm?)?,
            in_flight: NonZeroU32::new(inf?)?,
        })
    }

    fn name(&mut self, key: &str, what: &str, name: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            self.err(key, format!("{name:?} is not a valid {what} name (expected 1-64 of a-z, A-Z, 0-9, '-', '_', '.')"));
        }
        ok
    }

    /// An optional price (zero allowed): `Some(None)` when absent, `None` when invalid.
    fn optional_price(
        &mut self,
        key: &str,
        text: Option<&MoneyText>,
    ) -> Option<Option<PricePerMtok>> {
        match text {
            None => Some(None),
            Some(t) => self.price(key, t, true).map(Some),
        }
    }

    fn price(&mut self, key: &str, text: &MoneyText, allow_zero: bool) -> Option<PricePerMtok> {
        let p = self.ok(key, text.0.parse::<PricePerMtok>())?;
        if p.nanos_per_mtok() == 0 && !allow_zero {
            self.err(
                key,
                format!("{:?} is zero; a tier's price must be positive", text.0),
            );
            return None;
        }
        Some(p)
    }

    fn providers(&mut self, raw: &RawConf) -> Option<Vec<Provider>> {
        if raw.providers.is_empty() {
            self.err(
                "providers",
                "no providers: define at least one [providers.NAME] section",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut complete = true;
        for (name, p) in &raw.providers {
            match self.provider(name, p) {
                Some(p) => out.push(p),
                None => complete = false,
            }
        }
        complete.then_some(out)
    }

    fn provider(&mut self, name: &str, p: &RawProvider) -> Option<Provider> {
        let at = format!("providers.{name}");
        self.name(&at, "provider", name);
        let kind = match p.kind.as_str() {
            "openai" => Some(ProviderKind::OpenAi),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" => Some(ProviderKind::Gemini),
            other => {
                self.err(
                    format!("{at}.kind"),
                    format!(
                        "unknown provider kind {other:?} (known: {})",
                        ProviderKind::NAMES.join(", ")
                    ),
                );
                None
            }
        };
        let base_url = self.http_url(&format!("{at}.base_url"), &p.base_url);
        let api_key = p.api_key_env.as_deref().and_then(|v| self.env_var(v));
        // The key goes into each request's head as it is: a line break (a key pasted with its
        // newline) would end the head early.
        if let (Some(key), Some(var)) = (&api_key, &p.api_key_env)
            && key.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            self.err(
                format!("{at}.api_key_env"),
                format!("environment variable {var} holds a control character (a line break?); set it to the key alone"),
            );
        }
        let enabled = match (p.enabled, &p.api_key_env) {
            (Some(false), _) => false,
            (Some(true), Some(var)) if api_key.is_none() => {
                self.err(format!("{at}.enabled"), format!("the provider is enabled but environment variable {var} (api_key_env) is not set"));
                false
            }
            (_, Some(_)) => api_key.is_some(),
            (_, None) => true,
        };
        let ca_certs = match (&p.ca_file, &base_url) {
            (None, _) => Some(Vec::new()),
            (Some(path), Some(url)) if url.scheme() != "https" => {
                self.err(
                    format!("{at}.ca_file"),
                    format!("{path:?} is set but base_url is not https://; a CA file only applies to TLS"),
                );
                None
            }
            (Some(path), _) => {
                let r = read_ca_file(Path::new(path));
                self.ok(&format!("{at}.ca_file"), r)
            }
        };
        let connect = self.duration_ms(&format!("{at}.connect_timeout_ms"), p.connect_timeout_ms);
        let first_byte = self.duration_ms(
            &format!("{at}.first_byte_timeout_ms"),
            p.first_byte_timeout_ms,
        );
        let idle = self.duration_ms(&format!("{at}.idle_timeout_ms"), p.idle_timeout_ms);
        let after = self.positive::<u32>(
            &format!("{at}.cooldown_after_failures"),
            p.cooldown_after_failures,
            1000,
            "failures in a row",
        );
        let cooldown = self.duration_ms(&format!("{at}.cooldown_ms"), p.cooldown_ms);
        let prepaid_alert = match &p.prepaid_alert_below_usd {
            None => Some(None),
            Some(text) => {
                let key = format!("{at}.prepaid_alert_below_usd");
                match text.0.parse::<crate::money::NanoUsd>() {
                    Ok(n) if n.is_positive() => Some(Some(n)),
                    _ => {
                        self.err(
                            key,
                            format!(
                                "{:?} is not a positive amount of US dollars: expected a decimal string such as \"50\" or \"12.50\"",
                                text.0
                            ),
                        );
                        None
                    }
                }
            }
        };
        if p.models.is_empty() {
            self.err(
                format!("{at}.models"),
                "no models: list each upstream model with its input and output price",
            );
        }
        let mut models = Vec::new();
        let mut image_tokens = Vec::new();
        let mut cache_prices = Vec::new();
        for (model, prices) in &p.models {
            let key = format!("{at}.models.{model}");
            let input = self.price(
                &format!("{key}.input_usd_per_mtok"),
                &prices.input_usd_per_mtok,
                true,
            );
            let output = self.price(
                &format!("{key}.output_usd_per_mtok"),
                &prices.output_usd_per_mtok,
                true,
            );
            let image = match (prices.image_input_tokens_max, kind) {
                (Some(n), _) if !(1..=1_000_000).contains(&n) => {
                    self.err(
                        format!("{key}.image_input_tokens_max"),
                        format!("{n} is out of range: expected 1 to 1000000 tokens"),
                    );
                    None
                }
                (Some(n), _) => Some(n as u64),
                (None, Some(k)) => Some(default_image_input_tokens_max(k)),
                (None, None) => None,
            };
            let cached = self.optional_price(
                &format!("{key}.cached_input_usd_per_mtok"),
                prices.cached_input_usd_per_mtok.as_ref(),
            );
            let write = self.optional_price(
                &format!("{key}.cache_write_usd_per_mtok"),
                prices.cache_write_usd_per_mtok.as_ref(),
            );
            if let (Some(input), Some(output), Some(image), Some(cached), Some(write)) =
                (input, output, image, cached, write)
            {
                models.push((model.clone(), TokenPrices { input, output }));
                image_tokens.push(image);
                cache_prices.push(CachePrices {
                    cached_input: cached,
                    cache_write: write,
                });
            }
        }
        Some(Provider {
            name: name.to_owned(),
            kind: kind?,
            base_url: base_url?,
            api_key_env: p.api_key_env.clone(),
            api_key: api_key.map(Secret::new),
            ca_file: p.ca_file.as_ref().map(PathBuf::from),
            ca_certs: ca_certs?,
            enabled,
            demo: p.demo,
            responses_api: p.responses_api,
            connect_timeout: connect?,
            first_byte_timeout: first_byte?,
            idle_timeout: idle?,
            cooldown_after_failures: after?,
            cooldown: cooldown?,
            prepaid_alert_below: prepaid_alert?,
            leave_routing_when_prepaid_spent: p.leave_routing_when_prepaid_spent,
            models,
            image_input_tokens_max: image_tokens,
            cache_prices,
        })
    }

    fn tiers(
        &mut self,
        raw: &indexmap::IndexMap<String, RawTier>,
        providers: &[Provider],
    ) -> Option<Vec<Tier>> {
        if raw.is_empty() {
            self.err("tiers", "no tiers: define at least one [tiers.NAME] section (e.g. budget, standard, premium)");
            return None;
        }
        let mut out = Vec::new();
        let mut complete = true;
        for (name, t) in raw {
            match self.tier(name, t, providers) {
                Some(t) => out.push(t),
                None => complete = false,
            }
        }
        complete.then_some(out)
    }

    fn tier(&mut self, name: &str, t: &RawTier, providers: &[Provider]) -> Option<Tier> {
        let at = format!("tiers.{name}");
        self.name(&at, "tier", name);
        let input = self.price(
            &format!("{at}.input_usd_per_mtok"),
            &t.input_usd_per_mtok,
            false,
        );
        let kind = match t.kind.as_deref() {
            None | Some("chat") => Some(super::TierKind::Chat),
            Some("embeddings") => Some(super::TierKind::Embeddings),
            Some(other) => {
                self.err(
                    format!("{at}.kind"),
                    format!("{other:?}: expected \"chat\" (the default) or \"embeddings\""),
                );
                None
            }
        };
        let output = match (kind, &t.output_usd_per_mtok) {
            (Some(super::TierKind::Embeddings), None) => Some(PricePerMtok::from_nanos_per_mtok(0)),
            (Some(super::TierKind::Embeddings), Some(_)) => {
                self.err(
                    format!("{at}.output_usd_per_mtok"),
                    "an embeddings tier has no output tokens: leave output_usd_per_mtok out (it is priced per input token)",
                );
                None
            }
            // The kind is wrong (reported above): what it needs is unknown.
            (None, _) => None,
            (_, Some(text)) => self.price(&format!("{at}.output_usd_per_mtok"), text, false),
            (_, None) => {
                self.err(
                    format!("{at}.output_usd_per_mtok"),
                    "required: the customer's price per million output tokens, e.g. \"0.48\"",
                );
                None
            }
        };
        let cached_input = self
            .optional_price(
                &format!("{at}.cached_input_usd_per_mtok"),
                t.cached_input_usd_per_mtok.as_ref(),
            )
            .and_then(|p| match (p, input) {
                // Holds count every input token at the input price: a dearer cached price
                // would bill past them.
                (Some(c), Some(i)) if c > i => {
                    self.err(
                        format!("{at}.cached_input_usd_per_mtok"),
                        "the cached-input price must not be above the input price",
                    );
                    None
                }
                (p, _) => Some(p),
            });
        let cap = self.positive::<u32>(
            &format!("{at}.default_max_output_tokens"),
            t.default_max_output_tokens,
            10_000_000,
            "tokens",
        );
        if t.upstreams.is_empty() {
            self.err(format!("{at}.upstreams"), "the tier has no upstreams: list at least one { provider = \"...\", model = \"...\" }");
            return None;
        }
        let known = providers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut upstreams = Vec::new();
        let mut seen = HashSet::new();
        let mut weight_sum: i64 = 0;
        let mut image_max = 0u64;
        for (i, u) in t.upstreams.iter().enumerate() {
            let key = format!("{at}.upstreams[{i}]");
            let Some(pi) = providers.iter().position(|p| p.name == u.provider) else {
                self.err(
                    format!("{key}.provider"),
                    format!("no provider named {:?} (known: {known})", u.provider),
                );
                continue;
            };
            let provider = &providers[pi];
            let Some(mi) = provider.models.iter().position(|(m, _)| *m == u.model) else {
                let models = provider
                    .models
                    .iter()
                    .map(|(m, _)| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                self.err(
                    format!("{key}.model"),
                    format!(
                        "provider {:?} has no model {:?} in its models table (known: {models})",
                        u.provider, u.model
                    ),
                );
                continue;
            };
            let cost = &provider.models[mi].1;
            let cache = provider.cache_prices[mi];
            if kind == Some(super::TierKind::Embeddings) && provider.kind == ProviderKind::Anthropic
            {
                self.err(
                    format!("{key}.provider"),
                    format!("provider {:?} is of kind anthropic, which serves no embeddings: use an openai or gemini provider", u.provider),
                );
                continue;
            }
            image_max = image_max.max(provider.image_input_tokens_max[mi]);
            if !seen.insert((u.provider.as_str(), u.model.as_str())) {
                self.err(
                    key.clone(),
                    format!("duplicate upstream {}/{} in the tier", u.provider, u.model),
                );
            }
            if !(0..=1_000_000).contains(&u.weight) {
                self.err(
                    format!("{key}.weight"),
                    format!("{} is out of range: expected 0 to 1000000", u.weight),
                );
                continue;
            }
            weight_sum += u.weight;
            upstreams.push(Upstream {
                provider: pi,
                provider_name: provider.name.clone(),
                model: u.model.clone(),
                weight: u32::try_from(u.weight).unwrap_or(0),
                cost: *cost,
                cache,
                enabled: provider.enabled,
            });
        }
        if upstreams.len() == t.upstreams.len() && weight_sum == 0 {
            self.err(
                format!("{at}.upstreams"),
                "the weights sum to zero: at least one upstream needs a positive weight",
            );
        }
        // A demo upstream steps aside as soon as a real one in the same tier is on.
        let real_on = upstreams
            .iter()
            .any(|u| u.enabled && !providers[u.provider].demo);
        for u in &mut upstreams {
            if providers[u.provider].demo && real_on {
                u.enabled = false;
            }
        }
        if upstreams.len() == t.upstreams.len() {
            if !upstreams.iter().any(|u| u.enabled) {
                let vars: Vec<_> = upstreams
                    .iter()
                    .filter_map(|u| providers[u.provider].api_key_env.clone())
                    .collect();
                self.warnings.push(format!("{}: {at}: no upstream is enabled, so requests for {name:?} will fail (set one of: {})", self.file, vars.join(", ")));
            } else if upstreams
                .iter()
                .any(|u| u.enabled && providers[u.provider].demo)
            {
                self.warnings.push(format!("{}: {at}: served by the LOCAL DEMO upstream (canned answers); set a provider key to serve it for real", self.file));
            }
        }
        let response_model = match t.response_model.as_deref() {
            None | Some("tier") => Some(super::ResponseModel::Tier),
            Some("upstream") => Some(super::ResponseModel::Upstream),
            Some(other) => {
                self.err(
                    format!("{at}.response_model"),
                    format!("{other:?}: expected \"tier\" (answers show the tier's name) or \"upstream\" (they show the upstream's model)"),
                );
                None
            }
        };
        Some(Tier {
            cache: CachePrices {
                cached_input: cached_input?,
                cache_write: None,
            },
            kind: kind?,
            response_model: response_model?,
            name: name.to_owned(),
            description: t.description.clone(),
            prices: TokenPrices {
                input: input?,
                output: output?,
            },
            default_max_output_tokens: NonZeroU32::new(cap?)?,
            image_input_tokens_max: image_max,
            upstreams,
        })
    }

    fn required_env(&mut self, key: &str, var: &str, section: &str) -> Option<Secret<String>> {
        if !self.service_secrets {
            return Some(Secret::new(String::new()));
        }
        match self.env_var(var) {
            Some(v) => Some(Secret::new(v)),
            None => {
                self.err(
                    key,
                    format!("{section} is enabled but environment variable {var} is not set"),
                );
                None
            }
        }
    }

    fn cents(&mut self, key: &str, value: i64) -> Option<u32> {
        if !(STRIPE_MIN_CENTS..=STRIPE_MAX_CENTS).contains(&value) {
            self.err(key, format!("{value} is out of range: expected {STRIPE_MIN_CENTS} to {STRIPE_MAX_CENTS} cents (Stripe's limits)"));
            return None;
        }
        u32::try_from(value).ok()
    }

    fn stripe(&mut self, s: &RawStripe) -> Option<Option<StripeConf>> {
        // Amounts are checked even while Stripe is off, so turning it on cannot surprise.
        let mut packages = Vec::new();
        for (i, c) in s.packages_cents.iter().enumerate() {
            let key = format!("stripe.packages_cents[{i}]");
            if let Some(c) = self.cents(&key, *c) {
                if packages.contains(&c) {
                    self.err(key, format!("duplicate package {c}"));
                }
                packages.push(c);
            }
        }
        let min = self.cents("stripe.min_custom_amount_cents", s.min_custom_amount_cents);
        let max = self.cents("stripe.max_custom_amount_cents", s.max_custom_amount_cents);
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            self.err(
                "stripe.min_custom_amount_cents",
                format!("{lo} is above stripe.max_custom_amount_cents ({hi})"),
            );
        }
        let currency_ok =
            s.currency.len() == 3 && s.currency.bytes().all(|b| b.is_ascii_lowercase());
        if !currency_ok {
            self.err(
                "stripe.currency",
                format!(
                    "{:?} is not a lowercase ISO currency code such as \"usd\"",
                    s.currency
                ),
            );
        }
        let api_base_url = self.http_url("stripe.api_base_url", &s.api_base_url);
        if !s.enabled {
            return Some(None);
        }
        let secret_key = self.required_env("stripe.secret_key_env", &s.secret_key_env, "stripe");
        let webhook_secret =
            self.required_env("stripe.webhook_secret_env", &s.webhook_secret_env, "stripe");
        Some(Some(StripeConf {
            secret_key: secret_key?,
            webhook_secret: webhook_secret?,
            api_base_url: api_base_url?,
            currency: s.currency.clone(),
            packages_cents: packages,
            min_custom_amount_cents: min?,
            max_custom_amount_cents: max?,
        }))
    }

    fn mail(&mut self, s: &RawSmtp) -> Option<MailConf> {
        if s.from.trim().is_empty() {
            self.err(
                "smtp.from",
                "empty sender: expected e.g. \"Duang Duang <no-reply@example.com>\"",
            );
        }
        if s.outbox_dir.trim().is_empty() {
            self.err("smtp.outbox_dir", "empty path");
        }
        let smtp = if s.enabled {
            let port = self.positive::<u16>("smtp.port", s.port, 65535, "(a TCP port)");
            let tls = match s.tls.as_str() {
                "starttls" => Some(SmtpTls::StartTls),
                "tls" => Some(SmtpTls::Tls),
                "none" => Some(SmtpTls::None),
                other => {
                    self.err(
                        "smtp.tls",
                        format!("{other:?} is not a TLS mode (expected starttls, tls or none)"),
                    );
                    None
                }
            };
            if s.host.trim().is_empty() {
                self.err("smtp.host", "empty host");
            }
            let username = match &s.username_env {
                Some(v) => Some(self.required_env("smtp.username_env", v, "smtp")?),
                None => None,
            };
            let password = match &s.password_env {
                Some(v) => Some(self.required_env("smtp.password_env", v, "smtp")?),
                None => None,
            };
            Some(SmtpConf {
                host: s.host.clone(),
                port: port?,
                tls: tls?,
                username,
                password,
            })
        } else {
            None
        };
        Some(MailConf {
            from: s.from.clone(),
            smtp,
            outbox_dir: PathBuf::from(&s.outbox_dir),
        })
    }
}

/// Reads the PEM certificates of a provider's `ca_file` and checks each is a usable trust root.
fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert =
            cert.map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
        let mut roots = pingora::tls::RootCertStore::empty();
        roots.add(cert.clone()).map_err(|e| {
            format!(
                "{}: a certificate cannot be a trust root ({e})",
                path.display()
            )
        })?;
        out.push(cert.to_vec());
    }
    if out.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(out)
}
