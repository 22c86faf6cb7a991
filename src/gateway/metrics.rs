//! Prometheus metrics, served on their own listener (`gateway.metrics_listen`). Labels are low
//! cardinality: route, tier, status class or error code, provider and model from the conf.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub ttft: HistogramVec,
    pub upstream_latency: HistogramVec,
    pub tokens: IntCounterVec,
    pub billed_nano: IntCounterVec,
    pub provider_cost_nano: IntCounterVec,
    pub holds_in_flight: IntGauge,
    /// Settled requests waiting for the usage writer.
    pub usage_queue: IntGauge,
    pub overhead: HistogramVec,
    /// 1 while the shared rate-limit store (Redis) answers, 0 while it does not (or none is set).
    pub redis_up: IntGauge,
    /// 1 while the store answers this node's calls, 0 while it does not (set at each scrape).
    pub store_up: IntGauge,
    /// Limit checks decided without Redis because it did not answer.
    pub rate_limit_fallbacks: prometheus::IntCounter,
    /// Requests refused for a rate limit, by which limit.
    pub rate_limited: IntCounterVec,
    /// 1 while an upstream model is cooling down (skipped), 0 once it answers again.
    pub upstream_cooling: prometheus::IntGaugeVec,
    /// Settlements journaled and not yet stored (grows while the store is down).
    pub usage_backlog: IntGauge,
    /// Usage nobody could be billed for (above the hold and the balance), nano-USD.
    pub platform_loss_nano: prometheus::IntCounter,
    /// Leases returned because their instance stopped renewing (swept by this node).
    pub leases_swept: prometheus::IntCounter,
    /// Client connections open on this process.
    pub client_connections: IntGauge,
    /// Client connections refused at `gateway.max_client_connections`.
    pub client_connections_refused: IntCounter,
    /// Conf reloads, by result (`ok` or `refused`).
    pub conf_reloads: IntCounterVec,
    /// When the running conf was loaded (start or last reload), Unix seconds.
    pub conf_loaded: IntGauge,
    /// Prepaid credit left per provider (nano-USD; below zero once spent past it).
    pub prepaid_remaining: prometheus::IntGaugeVec,
    /// A provider's `prepaid_alert_below_usd`, nano-USD (for the alert rule).
    pub prepaid_alert_below: prometheus::IntGaugeVec,
    /// 1 while a provider's upstreams are out of routing because its prepaid credit is spent.
    pub prepaid_left_routing: prometheus::IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05,
];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let holds = gauge(
        &r,
        "duang_holds_in_flight",
        "Credit holds of requests in flight on this node",
    );
    let usage_queue = gauge(
        &r,
        "duang_usage_queue_depth",
        "Settled requests waiting to be written to the store",
    );
    let redis_up = gauge(
        &r,
        "duang_redis_up",
        "1 while the shared rate-limit store answers, else 0",
    );
    let fallbacks = prometheus::IntCounter::new(
        "duang_rate_limit_fallbacks_total",
        "Rate-limit checks decided without Redis because it did not answer",
    )
    .expect("valid metric");
    r.register(Box::new(fallbacks.clone()))
        .expect("unique metric");
    let cooling = prometheus::IntGaugeVec::new(
        Opts::new(
            "duang_upstream_cooling",
            "1 while an upstream model is cooling down after failures, 0 once it answers again",
        ),
        &["provider", "model"],
    )
    .expect("valid metric");
    r.register(Box::new(cooling.clone()))
        .expect("unique metric");
    let loss = prometheus::IntCounter::new(
        "duang_platform_loss_nano_usd_total",
        "Usage above its hold that the balance could not pay either (not billed), nano-USD",
    )
    .expect("valid metric");
    r.register(Box::new(loss.clone())).expect("unique metric");
    let swept = prometheus::IntCounter::new(
        "duang_leases_swept_total",
        "Leases of gateway instances that stopped renewing, returned to balances by this node",
    )
    .expect("valid metric");
    r.register(Box::new(swept.clone())).expect("unique metric");
    let refused = IntCounter::new(
        "duang_client_connections_refused_total",
        "Client connections answered 503 because gateway.max_client_connections were open",
    )
    .expect("valid metric");
    r.register(Box::new(refused.clone()))
        .expect("unique metric");
    Metrics {
        client_connections: gauge(
            &r,
            "duang_client_connections",
            "Client connections open on this gateway process",
        ),
        client_connections_refused: refused,
        usage_backlog: gauge(
            &r,
            "duang_usage_backlog",
            "Settled requests journaled on this node and not yet in the store",
        ),
        platform_loss_nano: loss,
        leases_swept: swept,
        upstream_cooling: cooling,
        redis_up,
        store_up: gauge(
            &r,
            "duang_store_up",
            "1 while the store (SQLite or PostgreSQL) answers this node, else 0",
        ),
        rate_limit_fallbacks: fallbacks,
        rate_limited: counter(
            &r,
            "duang_rate_limited_total",
            "Requests refused for a rate limit, by limit",
            &["limit"],
        ),
        requests: counter(
            &r,
            "duang_requests_total",
            "Requests answered, by route, tier and status",
            &["route", "tier", "status"],
        ),
        latency: histogram(
            &r,
            "duang_request_duration_seconds",
            "Time from request to the end of the response",
            &["route", "tier"],
            LATENCY_BUCKETS,
        ),
        ttft: histogram(
            &r,
            "duang_time_to_first_token_seconds",
            "Time from request to the first byte of the answer",
            &["tier"],
            LATENCY_BUCKETS,
        ),
        upstream_latency: histogram(
            &r,
            "duang_upstream_first_byte_seconds",
            "Time from sending to an upstream to its response header",
            &["provider", "model"],
            LATENCY_BUCKETS,
        ),
        tokens: counter(
            &r,
            "duang_tokens_total",
            "Tokens billed, by tier and direction",
            &["tier", "direction"],
        ),
        billed_nano: counter(
            &r,
            "duang_billed_nano_usd_total",
            "What customers were billed, nano-USD",
            &["tier"],
        ),
        provider_cost_nano: counter(
            &r,
            "duang_provider_cost_nano_usd_total",
            "What upstreams cost us, nano-USD",
            &["tier"],
        ),
        holds_in_flight: holds,
        usage_queue,
        conf_reloads: counter(
            &r,
            "duang_conf_reloads_total",
            "Conf reloads (SIGHUP or POST /-/reload), by result: ok, or refused (the running conf stays)",
            &["result"],
        ),
        conf_loaded: gauge(
            &r,
            "duang_conf_loaded_timestamp_seconds",
            "When the running conf was loaded (start or last reload), Unix seconds",
        ),
        prepaid_remaining: gauges(
            &r,
            "duang_upstream_prepaid_remaining_nano_usd",
            "Prepaid credit left per provider (duang-admin upstream-credit), nano-USD",
            &["provider"],
        ),
        prepaid_alert_below: gauges(
            &r,
            "duang_upstream_prepaid_alert_below_nano_usd",
            "A provider's prepaid_alert_below_usd, nano-USD",
            &["provider"],
        ),
        prepaid_left_routing: gauges(
            &r,
            "duang_upstream_prepaid_left_routing",
            "1 while a provider's upstreams are out of routing because its prepaid credit is spent",
            &["provider"],
        ),
        overhead: histogram(
            &r,
            "duang_gateway_overhead_seconds",
            "Gateway time before the request leaves for the upstream (auth, body, hold)",
            &["tier"],
            OVERHEAD_BUCKETS,
        ),
        registry: r,
    }
});

/// One tier's metrics, looked up once at start: a look-up by label values hashes them under a
/// lock, and a request touched a dozen of them.
pub struct TierMetrics {
    pub input_tokens: IntCounter,
    pub output_tokens: IntCounter,
    pub billed_nano: IntCounter,
    pub provider_cost_nano: IntCounter,
    pub overhead: Histogram,
    pub ttft: Histogram,
    /// By chat route: `/v1/chat/completions`, then `/v1/messages`.
    pub latency: [Histogram; 4],
    /// Answers with status 200, by chat route.
    pub ok: [IntCounter; 4],
    /// Time to an upstream's answer, by the tier's upstream (its index in the tier).
    pub upstream_latency: Vec<Histogram>,
}

/// The chat routes, in the order of [`TierMetrics::latency`] and [`TierMetrics::ok`].
pub const CHAT_ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
];

impl TierMetrics {
    pub fn new(tier: &crate::conf::Tier) -> TierMetrics {
        let m = &*METRICS;
        let upstream_latency = tier
            .upstreams
            .iter()
            .map(|u| {
                m.upstream_latency
                    .with_label_values(&[u.provider_name.as_str(), u.model.as_str()])
            })
            .collect();
        let tier = tier.name.as_str();
        TierMetrics {
            upstream_latency,
            input_tokens: m.tokens.with_label_values(&[tier, "input"]),
            output_tokens: m.tokens.with_label_values(&[tier, "output"]),
            billed_nano: m.billed_nano.with_label_values(&[tier]),
            provider_cost_nano: m.provider_cost_nano.with_label_values(&[tier]),
            overhead: m.overhead.with_label_values(&[tier]),
            ttft: m.ttft.with_label_values(&[tier]),
            latency: CHAT_ROUTES.map(|r| m.latency.with_label_values(&[r, tier])),
            ok: CHAT_ROUTES.map(|r| m.requests.with_label_values(&[r, tier, "200"])),
        }
    }
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
