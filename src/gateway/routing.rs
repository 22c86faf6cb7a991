//! What a conf reload replaces: the conf and everything the gateway makes from it for requests
//! (upstream endpoints, weighted-pick counters, cool-down state, `/v1/models` objects, metric
//! handles). A request takes the current [`Routing`] once, when it arrives, and keeps it to its
//! end: a reload mid-stream changes nothing for it, and it is billed at the prices it was
//! admitted at. See [`super::Gateway::reload`].

use super::health::HealthBook;
use super::metrics::TierMetrics;
use super::upstream::Endpoint;
use crate::conf::Conf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub struct Routing {
    pub conf: Arc<Conf>,
    /// One per provider, in conf order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// One weighted-pick counter per tier.
    pub picks: Vec<AtomicU64>,
    /// Cool-down state of every tier's upstreams.
    pub health: HealthBook,
    /// Each tier's `/v1/models` object, in conf order.
    pub models: Vec<serde_json::Value>,
    /// What each tier's answers show in `model`, as the inside of a JSON string (`None`: the
    /// upstream's own), made once rather than per stream.
    pub shown_models: Vec<Option<Box<[u8]>>>,
    /// Each tier's metric handles, in conf order.
    pub tier_metrics: Vec<TierMetrics>,
}

impl Routing {
    /// Made from `conf`, taking over from `before` (the routing it replaces) what still holds:
    /// a provider's endpoint (its resolved address and its pooled connections) when its base
    /// URL and trust roots are unchanged, and an upstream's cool-down when its tier, provider
    /// and model are.
    pub fn new(conf: Arc<Conf>, before: Option<&Routing>) -> Routing {
        let endpoints = conf
            .providers
            .iter()
            .map(|p| {
                let kept = before.and_then(|b| {
                    let i = b.conf.providers.iter().position(|o| {
                        o.name == p.name && o.base_url == p.base_url && o.ca_certs == p.ca_certs
                    })?;
                    Some(b.endpoints[i].clone())
                });
                kept.unwrap_or_else(|| Arc::new(Endpoint::new(p)))
            })
            .collect();
        let health = HealthBook::new(&conf);
        if let Some(b) = before {
            health.take_over(&conf, &b.health, &b.conf);
        }
        Routing {
            endpoints,
            picks: conf.tiers.iter().map(|_| AtomicU64::new(0)).collect(),
            health,
            models: super::models::model_objects(&conf),
            shown_models: conf
                .tiers
                .iter()
                .map(|t| match t.response_model {
                    crate::conf::ResponseModel::Tier => Some(super::dialect::escaped(&t.name)),
                    crate::conf::ResponseModel::Upstream => None,
                })
                .collect(),
            tier_metrics: conf.tiers.iter().map(TierMetrics::new).collect(),
            conf,
        }
    }

    /// Resolves every enabled provider's host that has no address yet (a new or changed
    /// provider); says which could not be.
    pub fn resolve_new(&self) -> Vec<String> {
        self.conf
            .providers
            .iter()
            .zip(&self.endpoints)
            .filter(|(p, ep)| p.enabled && ep.addr.read().is_ok_and(|a| a.is_none()))
            .filter(|(_, ep)| !ep.resolve())
            .map(|(p, ep)| format!("providers.{}: cannot resolve {}", p.name, ep.host))
            .collect()
    }
}

/// A reload's answer, for the log, `POST /-/reload` and `duang-admin reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The new conf took effect for new requests, with its warnings (and hosts that could not be
    /// resolved yet: they are retried as at start).
    Applied { warnings: Vec<String> },
    /// The conf did not validate, or changes a setting only a restart applies: nothing changed.
    Refused { reason: String },
}

impl super::Gateway {
    /// Rereads the conf file this process started with. A conf that does not validate is
    /// refused with the messages a start gives; one that changes a restart-only setting is
    /// refused naming it; either way the running conf stays. Otherwise new requests get the new
    /// routing, and requests in flight finish (and are billed) under the one they started with.
    /// Blocking (reads files, resolves new hosts): call it off the request threads.
    pub fn reload(&self) -> Reload {
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.routing();
        let path = std::path::Path::new(&current.conf.source);
        let outcome = match Conf::load(path) {
            Err(errors) => Err(format!("{errors}")),
            Ok(new) => match current.conf.reload_refusal(&new) {
                Some(refusal) => Err(refusal),
                None => Ok(new),
            },
        };
        let m = &super::metrics::METRICS;
        match outcome {
            Err(reason) => {
                m.conf_reloads.with_label_values(&["refused"]).inc();
                tracing::error!(conf = %current.conf.source, "conf reload refused: {reason}");
                Reload::Refused { reason }
            }
            Ok(new) => {
                let next = Routing::new(Arc::new(new), Some(&current));
                let mut warnings = next.conf.warnings.clone();
                warnings.extend(next.resolve_new());
                forget_gone_upstreams(&current.conf, &next.conf);
                self.routing.store(Arc::new(next));
                m.conf_reloads.with_label_values(&["ok"]).inc();
                m.conf_loaded.set(crate::time::now_ms() / 1000);
                for w in &warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(conf = %current.conf.source, "conf reloaded; new requests use it");
                Reload::Applied { warnings }
            }
        }
    }
}

/// An upstream no tier routes to any more is not cooling down: its gauge goes back to 0.
fn forget_gone_upstreams(old: &Conf, new: &Conf) {
    let routed = |c: &Conf, p: &str, m: &str| {
        c.tiers
            .iter()
            .flat_map(|t| &t.upstreams)
            .any(|u| u.provider_name == p && u.model == m)
    };
    for u in old.tiers.iter().flat_map(|t| &t.upstreams) {
        if !routed(new, &u.provider_name, &u.model) {
            let _ = super::metrics::METRICS
                .upstream_cooling
                .remove_label_values(&[u.provider_name.as_str(), u.model.as_str()]);
        }
    }
}
