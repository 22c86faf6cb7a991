//! `duang-mock-stripe`: a local stand-in for Stripe's API, its hosted Checkout page and its
//! webhooks, for the relay's tests. It speaks Stripe's wire format (form-encoded requests in
//! bracket notation, `Authorization: Bearer`, Stripe's error object, `Idempotency-Key` replays,
//! `Request-Id`, events signed with `Stripe-Signature`) so the relay's Stripe client cannot tell it
//! from api.stripe.com.
//!
//! It prints `listening on http://ADDR` as its first line (start it on port 0 and read the port).
//! Flags: `--listen`, `--api-key` (the only key accepted), `--webhook-secret` (signs events),
//! `--webhook-url` (where events are POSTed; without it they are only recorded) and `--public-url`
//! (the base of sessions' `url`, default `http://<listen address>`).
//!
//! Stripe's API (`/v1`, Bearer key): `POST /v1/checkout/sessions` (mode `payment`, `price_data`
//! line items only), `GET /v1/checkout/sessions/{id}`, `POST /v1/checkout/sessions/{id}/expire`,
//! `POST /v1/refunds`, `GET /v1/payment_intents/{id}`, `GET /v1/charges/{id}`. Only successful
//! answers are kept for idempotent replay (Stripe does not keep requests that failed validation).
//!
//! What a browser sees: `GET /pay/{id}` (a page with a `Pay` button, `id="pay"`, and a `Cancel`
//! link, `id="cancel"`) and `POST /pay/{id}`, which pays, delivers `checkout.session.completed`,
//! waits for that first delivery, and answers 303 to `success_url`. A failed delivery is retried in
//! the background 5 more times, after 200, 400, 800, 1600 and 3200 ms.
//!
//! Test controls, JSON in and out (`{"event": ..., "delivery": {"status", "body", "error"}}`):
//! `POST /_fake/pay/{id}` (`{"payment_status": "unpaid", "async": true}` both optional; `async`
//! answers at once with `delivery: null`), `/_fake/async_succeed/{id}`, `/_fake/async_fail/{id}`,
//! `/_fake/expire/{id}`, `/_fake/dispute/{payment_intent or charge}` (`{"amount", "reason"}`),
//! `/_fake/send` (`{"type", "object", "event_id", "created", "signature": "valid"|"bad"|"none",
//! "timestamp"}`, one attempt, no retries), `/_fake/redeliver/{event_id}`; `GET /_fake/requests`
//! and `GET /_fake/events` list what the fake received and sent.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use clap::Parser;
use hmac::{Hmac, Mac};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser, Clone)]
#[command(
    name = "duang-mock-stripe",
    about = "A local fake of Stripe's API, Checkout page and webhooks, for tests"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The secret key clients must send as `Authorization: Bearer <key>`.
    #[arg(long, default_value = "sk_test_duang_fake")]
    api_key: String,
    /// The endpoint secret that signs events (`Stripe-Signature`).
    #[arg(long, default_value = "whsec_duang_fake")]
    webhook_secret: String,
    /// Where to POST events (http:// only); without it events are only recorded.
    #[arg(long)]
    webhook_url: Option<String>,
    /// The base URL put in sessions' `url` (default `http://<listen address>`).
    #[arg(long)]
    public_url: Option<String>,
}

/// Form parameters as sent, in order.
type Flat = Vec<(String, String)>;
/// A failed call: the HTTP status and Stripe's error object.
struct Failure(u16, Value);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        json_body(self.0, pretty(&self.1))
    }
}

/// A successful call: the object answered and the event it produced, if any.
type Done = (Value, Option<String>);

struct Session {
    obj: Value,
    /// `payment_intent_data[metadata]`: becomes the payment intent's and the charge's metadata.
    pi_metadata: Value,
    names: Vec<String>,
}

struct Payment {
    pi: String,
    ch: String,
    amount: i64,
    refunded: i64,
    currency: String,
    metadata: Value,
    created: i64,
}

struct EventRecord {
    id: String,
    event: Value,
    /// The exact bytes sent (and signed).
    body: String,
    attempts: Vec<Value>,
}

#[derive(Default)]
struct Store {
    sessions: HashMap<String, Session>,
    /// By payment intent id.
    payments: HashMap<String, Payment>,
    /// Charge id → payment intent id.
    charges: HashMap<String, String>,
    /// Idempotency key → (request fingerprint, answer body).
    idempotency: HashMap<String, (String, String)>,
    requests: Vec<Value>,
    events: Vec<EventRecord>,
}

struct App {
    args: Args,
    base_url: String,
    store: Mutex<Store>,
}

impl Store {
    fn event(&self, id: &str) -> Option<&EventRecord> {
        self.events.iter().find(|e| e.id == id)
    }

    fn session(&self, id: &str) -> Result<Value, Failure> {
        let s = self.sessions.get(id);
        s.map(|s| s.obj.clone())
            .ok_or_else(|| no_such(404, "checkout.session", id, "id"))
    }

    fn payment(&self, pi: &str, status: u16, param: &str) -> Result<&Payment, Failure> {
        let p = self.payments.get(pi);
        p.ok_or_else(|| no_such(status, "payment_intent", pi, param))
    }

    fn charge(&self, ch: &str, status: u16, param: &str) -> Result<&Payment, Failure> {
        let pi = self.charges.get(ch);
        let pi = pi.ok_or_else(|| no_such(status, "charge", ch, param))?;
        self.payment(pi, status, param)
    }
}

impl App {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Shared = Arc<App>;

/// What happens to a Checkout Session.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Pay,
    PayUnpaid,
    AsyncSucceed,
    AsyncFail,
    Expire,
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        io::stdout().flush()?;
        let base_url = match &args.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{addr}"),
        };
        let app = Arc::new(App {
            args,
            base_url,
            store: Mutex::new(Store::default()),
        });
        let router = Router::new()
            .route("/v1/{*path}", any(api))
            .route("/pay/{id}", get(pay_page).post(pay_submit))
            .route(
                "/_fake/pay/{id}",
                post(|s, p, b| fake_step(s, p, b, Step::Pay)),
            )
            .route(
                "/_fake/async_succeed/{id}",
                post(|s, p, b| fake_step(s, p, b, Step::AsyncSucceed)),
            )
            .route(
                "/_fake/async_fail/{id}",
                post(|s, p, b| fake_step(s, p, b, Step::AsyncFail)),
            )
            .route(
                "/_fake/expire/{id}",
                post(|s, p, b| fake_step(s, p, b, Step::Expire)),
            )
            .route("/_fake/dispute/{id}", post(fake_dispute))
            .route("/_fake/send", post(fake_send))
            .route("/_fake/redeliver/{id}", post(fake_redeliver))
            .route("/_fake/requests", get(fake_requests))
            .route("/_fake/events", get(fake_events))
            .layer(from_fn(request_id))
            .with_state(app);
        axum::serve(listener, router).await
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn random(n: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random(24))
}

/// `$5.00` from 500 cents.
fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Responses and Stripe's errors

async fn request_id(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&format!("req_{}", random(14))) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

fn json_body(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Stripe's error object; an empty `code` or `param` is `null`.
fn error(status: u16, kind: &str, code: &str, param: &str, msg: impl Into<String>) -> Failure {
    let null_if_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let (code, param, message) = (null_if_empty(code), null_if_empty(param), msg.into());
    Failure(
        status,
        json!({"error": {"type": kind, "code": code, "param": param, "message": message}}),
    )
}

/// A 400 `invalid_request_error`.
fn invalid(code: &str, param: &str, msg: impl Into<String>) -> Failure {
    error(400, "invalid_request_error", code, param, msg)
}

fn no_such(status: u16, what: &str, id: &str, param: &str) -> Failure {
    let msg = format!("No such {what}: '{id}'");
    error(
        status,
        "invalid_request_error",
        "resource_missing",
        param,
        msg,
    )
}

fn missing(name: &str) -> Failure {
    invalid(
        "parameter_missing",
        name,
        format!("Missing required param: {name}."),
    )
}

// ---------------------------------------------------------------------------------------------
// Form parameters in Stripe's bracket notation

/// `line_items[0][price_data]` → `["line_items", "0", "price_data"]`.
fn key_path(k: &str) -> Vec<&str> {
    match k.split_once('[') {
        None => vec![k],
        Some((head, rest)) => std::iter::once(head)
            .chain(rest.split('[').map(|s| s.trim_end_matches(']')))
            .collect(),
    }
}

/// Nests flat pairs: objects, and arrays where all of a parent's keys are digits (`[]` appends).
fn nest(flat: &Flat) -> Value {
    let mut root = Value::Object(Map::new());
    for (k, v) in flat {
        insert(&mut root, &key_path(k), v);
    }
    arrays(root, false)
}

fn insert(node: &mut Value, segs: &[&str], v: &str) {
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    let (Value::Object(m), Some((first, rest))) = (node, segs.split_first()) else {
        return;
    };
    let key = if first.is_empty() {
        m.len().to_string()
    } else {
        (*first).to_owned()
    };
    if rest.is_empty() {
        m.insert(key, Value::String(v.to_owned()));
    } else {
        insert(m.entry(key).or_insert(Value::Null), rest, v);
    }
}

/// Turns all-digit objects into arrays, except directly under `metadata` (free-form keys).
fn arrays(v: Value, keep: bool) -> Value {
    let Value::Object(m) = v else { return v };
    let digits = |k: &String| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit());
    if !keep && !m.is_empty() && m.keys().all(digits) {
        let mut items: Vec<(u64, Value)> = m
            .into_iter()
            .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), arrays(v, false)))
            .collect();
        items.sort_by_key(|(i, _)| *i);
        return Value::Array(items.into_iter().map(|(_, v)| v).collect());
    }
    let m = m.into_iter().map(|(k, v)| {
        let keep = k == "metadata";
        (k, arrays(v, keep))
    });
    Value::Object(m.collect())
}

/// A parameter by its flat name, e.g. `line_items[0][quantity]`.
fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    key_path(name).iter().try_fold(p, |v, seg| match v {
        Value::Array(a) => a.get(seg.parse::<usize>().ok()?),
        _ => v.get(*seg),
    })
}

fn opt_str(p: &Value, name: &str) -> Option<String> {
    param(p, name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn req_str(p: &Value, name: &str) -> Result<String, Failure> {
    opt_str(p, name).ok_or_else(|| missing(name))
}

fn req_url(p: &Value, name: &str) -> Result<String, Failure> {
    let u = req_str(p, name)?;
    match url::Url::parse(&u) {
        Ok(_) => Ok(u),
        Err(_) => Err(invalid("url_invalid", name, "Not a valid URL")),
    }
}

fn int(p: &Value, name: &str, required: bool) -> Result<Option<i64>, Failure> {
    let Some(raw) = opt_str(p, name) else {
        return required.then(|| missing(name)).map_or(Ok(None), Err);
    };
    let msg = format!("Invalid integer: {raw}");
    raw.parse::<i64>()
        .map(Some)
        .map_err(|_| invalid("parameter_invalid_integer", name, msg))
}

fn positive(p: &Value, name: &str, required: bool) -> Result<Option<i64>, Failure> {
    match int(p, name, required)? {
        Some(n) if n < 1 => Err(invalid("parameter_invalid_integer", name, MUST_BE_POSITIVE)),
        n => Ok(n),
    }
}

fn metadata(p: &Value, name: &str) -> Value {
    param(p, name)
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}))
}

/// Rejects top-level parameters that Stripe does not know for this call (`known`: space-separated).
fn check_known(p: &Value, known: &str) -> Result<(), Failure> {
    let Some(m) = p.as_object() else {
        return Ok(());
    };
    match m
        .keys()
        .find(|k| !known.split_whitespace().any(|n| n == k.as_str()))
    {
        Some(k) => Err(invalid(
            "parameter_unknown",
            k,
            format!("Received unknown parameter: {k}"),
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Stripe's API

const SESSION_PARAMS: &str = "mode success_url cancel_url line_items client_reference_id customer \
    customer_email customer_creation metadata payment_intent_data expires_at payment_method_types \
    locale expand submit_type allow_promotion_codes billing_address_collection currency custom_text \
    payment_method_options phone_number_collection invoice_creation automatic_tax ui_mode";
const REFUND_PARAMS: &str = "payment_intent charge amount reason metadata expand instructions_email \
    refund_application_fee reverse_transfer origin";
const INVALID_ARRAY: &str = "Invalid array";
const MUST_BE_POSITIVE: &str = "This value must be greater than or equal to 1.";
const NO_KEY: &str = "You did not provide an API key. You need to provide your API key in the \
    Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').";
const NEED_PAYMENT: &str =
    "One of the following params should be provided for this request: payment_intent or charge.";
const REASONS: [&str; 3] = ["duplicate", "fraudulent", "requested_by_customer"];
const BAD_REASON: &str =
    "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer";

/// An API answer: status, body, whether it is an idempotent replay, and the event it caused.
struct Outcome(u16, String, bool, Option<String>);

fn failed(f: Failure) -> Outcome {
    Outcome(f.0, pretty(&f.1), false, None)
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn api(
    State(app): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = if method == Method::GET {
        uri.query().unwrap_or_default().as_bytes().to_vec()
    } else {
        body.to_vec()
    };
    let flat: Flat = url::form_urlencoded::parse(&raw).into_owned().collect();
    let idem = header_str(&headers, "idempotency-key");
    let Outcome(status, body, replayed, event) = {
        let mut st = app.store();
        let out = handle(&app, &mut st, &method, uri.path(), &flat, &headers);
        let params: Map<String, Value> = flat.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        st.requests.push(json!({
            "method": method.as_str(), "path": uri.path(), "idempotency_key": idem,
            "params": params, "status": out.0, "replayed": out.2,
        }));
        out
    };
    if let Some(ev) = event {
        let app = app.clone();
        tokio::spawn(async move {
            // Let the answer leave first, as Stripe's events follow the call that caused them.
            tokio::time::sleep(Duration::from_millis(50)).await;
            deliver_retrying(app, ev).await
        });
    }
    let mut r = json_body(status, body);
    if let Some(k) = idem.and_then(|k| HeaderValue::from_str(&k).ok()) {
        r.headers_mut().insert("idempotency-key", k);
    }
    if replayed {
        let yes = HeaderValue::from_static("true");
        r.headers_mut().insert("idempotent-replayed", yes);
    }
    r
}

fn handle(
    app: &App,
    st: &mut Store,
    method: &Method,
    path: &str,
    flat: &Flat,
    headers: &HeaderMap,
) -> Outcome {
    if let Err(f) = check_auth(&app.args.api_key, header_str(headers, "authorization")) {
        return failed(f);
    }
    let mut pairs: Vec<String> = flat.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    let fingerprint = format!("{method} {path}?{}", pairs.join("&"));
    let key = header_str(headers, "idempotency-key").filter(|_| method == Method::POST);
    if let Some(k) = &key
        && let Some((fp, body)) = st.idempotency.get(k)
    {
        if *fp == fingerprint {
            return Outcome(200, body.clone(), true, None);
        }
        return failed(error(
            400,
            "idempotency_error",
            "",
            "",
            idempotency_message(k),
        ));
    }
    let segs: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match route(app, st, method, &segs, &nest(flat)) {
        Ok((v, event)) => {
            let body = pretty(&v);
            if let Some(k) = key {
                st.idempotency.insert(k, (fingerprint, body.clone()));
            }
            Outcome(200, body, false, event)
        }
        Err(f) => failed(f),
    }
}

fn route(
    app: &App,
    st: &mut Store,
    method: &Method,
    segs: &[&str],
    p: &Value,
) -> Result<Done, Failure> {
    match (method.as_str(), segs) {
        ("POST", ["checkout", "sessions"]) => Ok((create_session(app, st, p)?, None)),
        ("GET", ["checkout", "sessions", id]) => Ok((st.session(id)?, None)),
        ("POST", ["checkout", "sessions", id, "expire"]) => {
            let ev = step(st, id, Step::Expire)?;
            Ok((st.session(id)?, Some(ev)))
        }
        ("POST", ["refunds"]) => create_refund(st, p),
        ("GET", ["payment_intents", id]) => Ok((intent_obj(st.payment(id, 404, "id")?), None)),
        ("GET", ["charges", id]) => Ok((charge_obj(st.charge(id, 404, "id")?), None)),
        _ => {
            let path = segs.join("/");
            let msg = format!(
                "Unrecognized request URL ({method}: /v1/{path}). Please see https://stripe.com/docs \
                 or we can help at https://support.stripe.com/."
            );
            Err(error(404, "invalid_request_error", "", "", msg))
        }
    }
}

fn idempotency_message(key: &str) -> String {
    format!(
        "Keys for idempotent requests can only be used with the same parameters they were first \
         used with. Try using a key other than '{key}' if you meant to execute a different request."
    )
}

fn check_auth(key: &str, auth: Option<String>) -> Result<(), Failure> {
    let given = auth
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Err(error(401, "invalid_request_error", "", "", NO_KEY)),
        Some(given) if given == key => Ok(()),
        Some(given) => {
            let msg = format!("Invalid API Key provided: {}", mask(given));
            Err(error(401, "invalid_request_error", "", "", msg))
        }
    }
}

/// `sk_test_wrongxyz` → `sk_test_*****xyz`: the prefix and the last 3 characters stay.
fn mask(k: &str) -> String {
    let c: Vec<char> = k.chars().collect();
    let tail = c.len().saturating_sub(3);
    let head = c[..tail]
        .iter()
        .rposition(|&ch| ch == '_')
        .map_or(0, |i| i + 1);
    let starred = |(i, &ch): (usize, &char)| if i >= head && i < tail { '*' } else { ch };
    c.iter().enumerate().map(starred).collect()
}

fn create_session(app: &App, st: &mut Store, p: &Value) -> Result<Value, Failure> {
    check_known(p, SESSION_PARAMS)?;
    let mode = req_str(p, "mode")?;
    if mode != "payment" {
        let msg = format!("This fake supports only mode=payment, not `{mode}`.");
        return Err(invalid("parameter_invalid_string", "mode", msg));
    }
    let success_url = req_url(p, "success_url")?;
    let cancel_url = req_url(p, "cancel_url")?;
    let count = match param(p, "line_items") {
        None => return Err(missing("line_items")),
        Some(Value::Array(a)) => a.len(),
        Some(_) => {
            return Err(invalid(
                "parameter_invalid_array",
                "line_items",
                INVALID_ARRAY,
            ));
        }
    };
    let (mut total, mut currency, mut names) = (0i64, String::new(), Vec::new());
    for i in 0..count {
        let at = |f: &str| format!("line_items[{i}]{f}");
        let cur = req_str(p, &at("[price_data][currency]"))?.to_ascii_lowercase();
        let unit = positive(p, &at("[price_data][unit_amount]"), true)?.unwrap_or(0);
        names.push(req_str(p, &at("[price_data][product_data][name]"))?);
        let qty = positive(p, &at("[quantity]"), true)?.unwrap_or(0);
        if !currency.is_empty() && currency != cur {
            let msg = "All line items must use the same currency.";
            return Err(invalid("", &at("[price_data][currency]"), msg));
        }
        currency = cur;
        total = unit
            .checked_mul(qty)
            .and_then(|a| total.checked_add(a))
            .ok_or_else(|| invalid("", "line_items", "The total amount is too large."))?;
    }
    let created = now();
    let expires_at = match int(p, "expires_at", false)? {
        None => created + 86_400,
        Some(t) if t >= created + 1_740 && t <= created + 86_400 => t,
        Some(_) => {
            let msg = "The `expires_at` timestamp must be between 30 minutes and 24 hours after \
                       Checkout Session creation.";
            return Err(invalid("", "expires_at", msg));
        }
    };
    let id = new_id("cs_test");
    let obj = json!({
        "id": id, "object": "checkout.session", "amount_subtotal": total, "amount_total": total,
        "cancel_url": cancel_url, "client_reference_id": opt_str(p, "client_reference_id"),
        "created": created, "currency": currency, "customer": null, "customer_details": null,
        "customer_email": opt_str(p, "customer_email"), "expires_at": expires_at,
        "livemode": false, "metadata": metadata(p, "metadata"), "mode": "payment",
        "payment_intent": null, "payment_method_types": ["card"], "payment_status": "unpaid",
        "status": "open", "success_url": success_url, "url": format!("{}/pay/{id}", app.base_url),
    });
    let pi_metadata = metadata(p, "payment_intent_data[metadata]");
    let session = Session {
        obj: obj.clone(),
        pi_metadata,
        names,
    };
    st.sessions.insert(id, session);
    Ok(obj)
}

fn create_refund(st: &mut Store, p: &Value) -> Result<Done, Failure> {
    check_known(p, REFUND_PARAMS)?;
    let pi = match (opt_str(p, "payment_intent"), opt_str(p, "charge")) {
        (Some(pi), _) => st.payment(&pi, 400, "payment_intent")?.pi.clone(),
        (None, Some(ch)) => st.charge(&ch, 400, "charge")?.pi.clone(),
        (None, None) => return Err(invalid("parameter_missing", "payment_intent", NEED_PAYMENT)),
    };
    let reason = opt_str(p, "reason");
    if let Some(r) = reason.as_deref()
        && !REASONS.contains(&r)
    {
        return Err(invalid("", "reason", BAD_REASON));
    }
    let amount = positive(p, "amount", false)?;
    let Some(pay) = st.payments.get_mut(&pi) else {
        return Err(no_such(400, "payment_intent", &pi, "payment_intent"));
    };
    let left = pay.amount - pay.refunded;
    if left <= 0 {
        let msg = format!("Charge {} has already been refunded.", pay.ch);
        return Err(invalid("charge_already_refunded", "", msg));
    }
    let amount = amount.unwrap_or(left);
    if amount > left {
        let (a, l) = (dollars(amount), dollars(left));
        let msg = format!("Refund amount ({a}) is greater than unrefunded amount on charge ({l})");
        return Err(invalid("amount_too_large", "amount", msg));
    }
    pay.refunded += amount;
    let refund = json!({
        "id": new_id("re"), "object": "refund", "amount": amount, "charge": pay.ch,
        "payment_intent": pay.pi, "currency": pay.currency, "status": "succeeded",
        "reason": reason, "metadata": metadata(p, "metadata"), "created": now(),
    });
    let charge = charge_obj(pay);
    let ev = new_event(st, "charge.refunded", charge);
    Ok((refund, Some(ev)))
}

fn charge_obj(p: &Payment) -> Value {
    json!({
        "id": p.ch, "object": "charge", "amount": p.amount, "amount_captured": p.amount,
        "amount_refunded": p.refunded, "captured": true, "created": p.created,
        "currency": p.currency, "livemode": false, "metadata": p.metadata, "paid": true,
        "payment_intent": p.pi, "refunded": p.refunded >= p.amount, "status": "succeeded",
    })
}

fn intent_obj(p: &Payment) -> Value {
    json!({
        "id": p.pi, "object": "payment_intent", "amount": p.amount, "amount_received": p.amount,
        "created": p.created, "currency": p.currency, "latest_charge": p.ch, "livemode": false,
        "metadata": p.metadata, "status": "succeeded",
    })
}

/// Moves a session on and records the event that says so; returns the event's id.
fn step(st: &mut Store, id: &str, what: Step) -> Result<String, Failure> {
    let s = st
        .sessions
        .get_mut(id)
        .ok_or_else(|| no_such(404, "checkout.session", id, "id"))?;
    let status = s.obj["status"].as_str().unwrap_or_default().to_owned();
    let (want, kind) = match what {
        Step::Pay | Step::PayUnpaid => ("open", "checkout.session.completed"),
        Step::AsyncSucceed => ("complete", "checkout.session.async_payment_succeeded"),
        Step::AsyncFail => ("complete", "checkout.session.async_payment_failed"),
        Step::Expire => ("open", "checkout.session.expired"),
    };
    if status != want || s.obj["payment_status"] != "unpaid" {
        let msg = format!(
            "Checkout Session {id} has status `{status}` and payment_status `{}`: {kind} does not apply.",
            s.obj["payment_status"].as_str().unwrap_or_default()
        );
        return Err(invalid("", "", msg));
    }
    match what {
        Step::Pay | Step::PayUnpaid => {
            let email = s.obj["customer_email"]
                .as_str()
                .unwrap_or("buyer@example.com");
            s.obj["customer_details"] = json!({ "email": email });
            s.obj["status"] = json!("complete");
        }
        Step::Expire => {
            s.obj["status"] = json!("expired");
            s.obj["url"] = Value::Null;
        }
        Step::AsyncSucceed | Step::AsyncFail => {}
    }
    if matches!(what, Step::Pay | Step::AsyncSucceed) {
        settle(st, id);
    }
    let obj = st.sessions.get(id).map(|s| s.obj.clone());
    Ok(new_event(st, kind, obj.unwrap_or_default()))
}

/// Marks a session paid and creates its payment intent and charge.
fn settle(st: &mut Store, id: &str) {
    let Some(s) = st.sessions.get_mut(id) else {
        return;
    };
    let pay = Payment {
        pi: new_id("pi"),
        ch: new_id("ch"),
        amount: s.obj["amount_total"].as_i64().unwrap_or(0),
        refunded: 0,
        currency: s.obj["currency"].as_str().unwrap_or("usd").to_owned(),
        metadata: s.pi_metadata.clone(),
        created: now(),
    };
    s.obj["payment_intent"] = json!(pay.pi);
    s.obj["payment_status"] = json!("paid");
    st.charges.insert(pay.ch.clone(), pay.pi.clone());
    st.payments.insert(pay.pi.clone(), pay);
}

// ---------------------------------------------------------------------------------------------
// Events and their delivery

fn new_event(st: &mut Store, kind: &str, object: Value) -> String {
    put_event(st, new_id("evt"), kind, object, now())
}

/// Records an event (replacing the one with the same id, keeping its attempts); returns its id.
fn put_event(st: &mut Store, id: String, kind: &str, object: Value, created: i64) -> String {
    let event = json!({
        "id": id, "object": "event", "api_version": "2024-06-20",
        "created": created, "data": { "object": object },
        "livemode": false, "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null }, "type": kind,
    });
    let body = pretty(&event);
    match st.events.iter_mut().find(|e| e.id == id) {
        Some(r) => (r.event, r.body) = (event, body),
        None => {
            let id = id.clone();
            st.events.push(EventRecord {
                id,
                event,
                body,
                attempts: Vec::new(),
            });
        }
    }
    id
}

/// Stripe's `v1` signature: hex HMAC-SHA256 of `<t>.<body>` keyed with the secret's bytes.
fn sign(secret: &str, t: i64, body: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// One delivery attempt of a recorded event; answers `{"status", "body", "error"}`. `sig` is
/// `valid`, `bad` (signed with another secret) or `none` (no `Stripe-Signature` header).
async fn deliver(app: &App, id: &str, sig: &str, t: Option<i64>) -> Value {
    let Some(url) = &app.args.webhook_url else {
        return json!({"status": null, "body": "", "error": "no --webhook-url configured"});
    };
    let found = app.store().event(id).map(|e| e.body.clone());
    let Some(body) = found else {
        return json!({"status": null, "body": "", "error": "no such event"});
    };
    let t = t.unwrap_or_else(now);
    let secret = match sig {
        "bad" => format!("{}_wrong", app.args.webhook_secret),
        _ => app.args.webhook_secret.clone(),
    };
    let header = (sig != "none").then(|| format!("t={t},v1={}", sign(&secret, t, &body)));
    let (status, text, error) = match http_post(url, &body, header.as_deref()).await {
        Ok((s, b)) => (Some(s), b, None),
        Err(e) => (None, String::new(), Some(e)),
    };
    let attempt = json!({"status": status, "error": error, "signature": sig, "at": now()});
    if let Some(r) = app.store().events.iter_mut().find(|e| e.id == id) {
        r.attempts.push(attempt);
    }
    json!({"status": status, "body": text, "error": error})
}

fn delivered(d: &Value) -> bool {
    matches!(d["status"].as_u64(), Some(200..=299))
}

/// Delivers once and answers that attempt; if it failed, retries 5 times in the background.
async fn deliver_retrying(app: Shared, id: String) -> Value {
    let first = deliver(&app, &id, "valid", None).await;
    if !delivered(&first) && app.args.webhook_url.is_some() {
        tokio::spawn(async move {
            for n in 0..5 {
                tokio::time::sleep(Duration::from_millis(200 << n)).await;
                if delivered(&deliver(&app, &id, "valid", None).await) {
                    break;
                }
            }
        });
    }
    first
}

/// A minimal HTTP/1.1 POST over plain TCP; answers the status and the body.
async fn http_post(url: &str, body: &str, sig: Option<&str>) -> Result<(u16, String), String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad webhook url: {e}"))?;
    let host = match (u.scheme(), u.host_str()) {
        ("http", Some(h)) => h.to_owned(),
        _ => return Err(format!("only http:// webhook urls are supported: {url}")),
    };
    let addr = format!("{host}:{}", u.port().unwrap_or(80));
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    };
    let sig_line = sig.map_or(String::new(), |s| format!("Stripe-Signature: {s}\r\n"));
    let mut req = format!(
        "POST {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\nAccept: */*; q=0.5, application/xml\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n{sig_line}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    let exchange = async {
        let mut conn = TcpStream::connect(&addr).await?;
        conn.write_all(&req).await?;
        read_response(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Err(_) => Err("timed out after 10 s".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) => Ok(r),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the body is complete (by Content-Length, the last chunk, or EOF).
async fn read_response(conn: &mut TcpStream) -> io::Result<(u16, String)> {
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 8192]);
    loop {
        let n = conn.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = find(&buf, b"\r\n\r\n") else {
            if n == 0 {
                return Err(io::Error::other("closed before a response"));
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let chunked = head.contains("transfer-encoding: chunked");
        let complete = len.is_some_and(|l| buf.len() >= end + 4 + l)
            || (chunked && buf.ends_with(b"0\r\n\r\n"));
        if n > 0 && !complete {
            continue;
        }
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        let status = status.ok_or_else(|| io::Error::other("bad status line"))?;
        let mut body = buf[end + 4..].to_vec();
        match len {
            Some(l) => body.truncate(l),
            None if chunked => body = dechunk(&body),
            None => {}
        }
        return Ok((status, String::from_utf8_lossy(&body).into_owned()));
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let line = String::from_utf8_lossy(&b[..i]);
        let size =
            usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let end = (i + 2 + size).min(b.len());
        out.extend_from_slice(&b[i + 2..end]);
        b = b.get(end + 2..).unwrap_or_default();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The hosted Checkout page

const MISSING_PAGE: &str = "<p id=\"missing\">No such checkout session.</p>";
const EXPIRED_PAGE: &str = "<p id=\"status\">This checkout session has expired.</p>";

fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Duang Duang test payment</title><link rel=\"icon\" href=\"data:,\"></head>\n<body><h1>Duang Duang test payment</h1>\n{body}\n</body></html>\n"
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

async fn pay_page(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    let st = app.store();
    let Some(s) = st.sessions.get(&id) else {
        return page(StatusCode::NOT_FOUND, MISSING_PAGE);
    };
    let o = &s.obj;
    let text = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
    let success = esc(&text("success_url").replace("{CHECKOUT_SESSION_ID}", &id));
    let body = match (o["status"].as_str(), o["payment_status"].as_str()) {
        (Some("complete"), Some("paid")) => format!(
            "<p id=\"status\">This session is already paid.</p>\n<p><a id=\"success\" href=\"{success}\">Continue</a></p>"
        ),
        (Some("complete"), _) => format!(
            "<p id=\"status\">This payment is processing.</p>\n<p><a id=\"success\" href=\"{success}\">Continue</a></p>"
        ),
        (Some("open"), _) => {
            let items: String = s
                .names
                .iter()
                .map(|n| format!("<li>{}</li>", esc(n)))
                .collect();
            format!(
                "<ul id=\"items\">{items}</ul>\n<p>Amount: <strong id=\"amount\">{}</strong> <span id=\"currency\">{}</span></p>\n<form method=\"post\" action=\"/pay/{}\"><button id=\"pay\" type=\"submit\">Pay</button></form>\n<p><a id=\"cancel\" href=\"{}\">Cancel</a></p>",
                dollars(o["amount_total"].as_i64().unwrap_or(0)),
                esc(&text("currency").to_uppercase()),
                esc(&id),
                esc(&text("cancel_url")),
            )
        }
        _ => format!(
            "<p id=\"status\">This checkout session has expired.</p>\n<p><a id=\"cancel\" href=\"{}\">Back</a></p>",
            esc(&text("cancel_url"))
        ),
    };
    page(StatusCode::OK, &body)
}

async fn pay_submit(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    let (event, success) = {
        let mut st = app.store();
        let Some(s) = st.sessions.get(&id) else {
            return page(StatusCode::NOT_FOUND, MISSING_PAGE);
        };
        let status = s.obj["status"].as_str().unwrap_or_default().to_owned();
        let success = s.obj["success_url"]
            .as_str()
            .unwrap_or("/")
            .replace("{CHECKOUT_SESSION_ID}", &id);
        match status.as_str() {
            "open" => (step(&mut st, &id, Step::Pay).ok(), success),
            "complete" => (None, success),
            _ => return page(StatusCode::GONE, EXPIRED_PAGE),
        }
    };
    if let Some(ev) = event {
        deliver_retrying(app.clone(), ev).await;
    }
    (StatusCode::SEE_OTHER, [(header::LOCATION, success)]).into_response()
}

// ---------------------------------------------------------------------------------------------
// Test controls

fn options(body: &[u8]) -> Result<Value, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| invalid("", "", format!("body is not JSON: {e}")))
}

fn with_event(app: &App, id: &str, delivery: Value) -> Response {
    let event = app.store().event(id).map(|e| e.event.clone());
    json_body(200, pretty(&json!({"event": event, "delivery": delivery})))
}

/// Delivers a recorded event (with retries), or in the background when `background`.
async fn answer(app: Shared, id: String, background: bool) -> Response {
    let delivery = if background {
        tokio::spawn(deliver_retrying(app.clone(), id.clone()));
        Value::Null
    } else {
        deliver_retrying(app.clone(), id.clone()).await
    };
    with_event(&app, &id, delivery)
}

type Answer = Result<Response, Failure>;

async fn fake_step(
    State(app): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
    what: Step,
) -> Answer {
    let o = options(&body)?;
    let what = match what {
        Step::Pay if o["payment_status"] == "unpaid" => Step::PayUnpaid,
        what => what,
    };
    let ev = step(&mut app.store(), &id, what)?;
    Ok(answer(app, ev, o["async"] == true).await)
}

async fn fake_dispute(State(app): State<Shared>, Path(id): Path<String>, body: Bytes) -> Answer {
    let o = options(&body)?;
    let ev = {
        let mut st = app.store();
        let pay = if id.starts_with("ch_") {
            st.charge(&id, 404, "id")?
        } else {
            st.payment(&id, 404, "id")?
        };
        let dispute = json!({
            "id": new_id("dp"), "object": "dispute",
            "amount": o["amount"].as_i64().unwrap_or(pay.amount), "charge": pay.ch,
            "created": now(), "currency": pay.currency, "is_charge_refundable": pay.refunded < pay.amount,
            "livemode": false, "metadata": {}, "payment_intent": pay.pi,
            "reason": o["reason"].as_str().unwrap_or("fraudulent"), "status": "needs_response",
        });
        new_event(&mut st, "charge.dispute.created", dispute)
    };
    Ok(answer(app, ev, o["async"] == true).await)
}

async fn fake_send(State(app): State<Shared>, body: Bytes) -> Answer {
    let o = options(&body)?;
    let kind = o["type"].as_str().ok_or_else(|| missing("type"))?;
    let sig = o["signature"].as_str().unwrap_or("valid");
    if !["valid", "bad", "none"].contains(&sig) {
        let msg = format!("signature must be valid, bad or none, not `{sig}`");
        return Err(invalid("", "signature", msg));
    }
    let object = Some(&o["object"]).filter(|v| v.is_object()).cloned();
    let id = o["event_id"]
        .as_str()
        .map_or_else(|| new_id("evt"), str::to_owned);
    let created = o["created"].as_i64().unwrap_or_else(now);
    let id = put_event(
        &mut app.store(),
        id,
        kind,
        object.unwrap_or_else(|| json!({})),
        created,
    );
    let delivery = deliver(&app, &id, sig, o["timestamp"].as_i64()).await;
    Ok(with_event(&app, &id, delivery))
}

async fn fake_redeliver(State(app): State<Shared>, Path(id): Path<String>) -> Answer {
    if app.store().event(&id).is_none() {
        return Err(no_such(404, "event", &id, "id"));
    }
    let delivery = deliver(&app, &id, "valid", None).await;
    Ok(with_event(&app, &id, delivery))
}

async fn fake_requests(State(app): State<Shared>) -> Response {
    json_body(200, pretty(&Value::Array(app.store().requests.clone())))
}

async fn fake_events(State(app): State<Shared>) -> Response {
    let list: Vec<Value> = app
        .store()
        .events
        .iter()
        .map(|e| json!({"event": e.event, "attempts": e.attempts}))
        .collect();
    json_body(200, pretty(&Value::Array(list)))
}
