//! The dashboard's shared layout and its public pages: home, pricing, quick start, policies.
//! Pages are rendered on the server with `maud` (escaping by default); one stylesheet, no
//! third-party assets, so the strict Content-Security-Policy in `web.rs` holds.

use super::policies;
use super::server::AppState;
use super::web::Visitor;
use crate::conf::Conf;
use crate::money::NanoUsd;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

/// Wraps a page body in the layout: navigation for the visitor's state, footer with the
/// operator's policies, legal entity and support address.
pub fn layout(conf: &Conf, title: &str, visitor: Option<&Visitor>, body: Markup) -> Markup {
    let account = visitor.and_then(|v| v.account.as_ref());
    let brand = &conf.brand;
    let support = &conf.admin.support_email;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · " (brand.product_name) }
                link rel="stylesheet" href="/static/app.css";
                // No favicon request (and no 404 in the browser's console).
                link rel="icon" href="data:,";
            }
            body {
                header.top {
                    a.brand href="/" { (brand.product_name) }
                    // On a phone the navigation folds into a menu: the checkbox opens it (no
                    // script; its label is the button).
                    input.menu-toggle #menu-toggle type="checkbox";
                    label.menu-button for="menu-toggle" { "Menu" }
                    nav aria-label="Main" {
                        @if let Some(a) = account {
                            a href="/dashboard" { "Dashboard" }
                            a href="/keys" { "API keys" }
                            a href="/usage" { "Usage" }
                            a href="/credits" { "Credits" }
                            a href="/refunds" { "Refunds" }
                            a href="/pricing" { "Pricing" }
                            a href="/quickstart" { "Quick start" }
                            @if a.role == crate::store::Role::Operator {
                                a href="/operator" { "Operator" }
                            }
                            a.who href="/account/security" title="Account security" { (a.email) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(visitor.map(|v| v.csrf.as_str()).unwrap_or_default());
                                button.link type="submit" { "Log out" }
                            }
                        } @else {
                            a href="/pricing" { "Pricing" }
                            a href="/quickstart" { "Quick start" }
                            a href="/login" { "Log in" }
                            a.button href="/signup" { "Sign up" }
                        }
                    }
                }
                main { (keyboard_scrollable(body)) }
                footer {
                    nav aria-label="Policies" {
                        @for p in &brand.policies {
                            a href={ "/policies/" (p.slug) } { (p.title) }
                        }
                    }
                    p { "Support: " a href={ "mailto:" (support) } { (support) } " · " (brand.legal_entity) }
                }
            }
        }
    }
}

/// Tables and code blocks scroll sideways inside their card on a narrow screen; a region that
/// scrolls must be reachable by keyboard, so each gets `tabindex="0"` (maud writes these tags
/// as plain `<table` and `<pre>`, without attributes, so the replacement is exact).
fn keyboard_scrollable(body: Markup) -> Markup {
    maud::PreEscaped(
        body.into_string()
            .replace("<table", "<table tabindex=\"0\"")
            .replace("<pre>", "<pre tabindex=\"0\">"),
    )
}

pub fn page(state: &AppState, title: &str, visitor: Option<&Visitor>, body: Markup) -> Markup {
    layout(&state.conf, title, visitor, body)
}

/// An error page waiting for the brand: [`super::error::AdminError::into_page`] leaves this on
/// the response and `web::security_headers`, which has the conf, renders it.
#[derive(Clone)]
pub struct PendingErrorPage {
    pub visitor: Option<Visitor>,
    pub message: String,
}

pub fn error_page(
    conf: &Conf,
    visitor: Option<&Visitor>,
    status: StatusCode,
    message: &str,
) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        conf,
        title,
        visitor,
        html! {
            section.card {
                h1 { (title) }
                p.error { (message) }
                p { a href="/" { "Back to the start page" } }
            }
        },
    )
}

/// A form error next to the form, or nothing.
pub fn form_error(message: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = message {
            p.error role="alert" { (m) }
        }
    }
}

/// A balance as customers read it: dollars and cents, the exact figure on hover (`title`) and
/// for scripts (`data-exact`).
pub fn money(n: NanoUsd) -> Markup {
    let exact = n.to_string();
    html! { span.money title={ "Exactly " (exact) } data-exact=(exact) { (n.rounded_to_cents()) } }
}

/// Whole cents as dollars: `$5.00`.
pub fn cents_text(cents: i64) -> String {
    NanoUsd::from_cents(cents)
        .map(|n| n.to_string())
        .unwrap_or_else(|_| format!("{cents}¢"))
}

pub fn csrf_field(v: &Visitor) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

fn tier_rows(state: &AppState) -> Markup {
    html! {
        table.prices {
            thead { tr { th { "Tier (" code { "model" } ")" } th { "Input" } th { "Output" } th { "For" } } }
            tbody {
                @for t in &state.conf.tiers {
                    tr {
                        td { code { (t.name) } }
                        td { "$" (t.prices.input.usd_per_mtok_string()) " / 1M tokens" }
                        td {
                            @if t.kind == crate::conf::TierKind::Embeddings {
                                "— (embeddings)"
                            } @else {
                                "$" (t.prices.output.usd_per_mtok_string()) " / 1M tokens"
                            }
                        }
                        td { (t.description) }
                    }
                }
            }
        }
    }
}

pub async fn home(State(state): State<AppState>, visitor: Visitor) -> Markup {
    page(
        &state,
        "Prepaid AI API credits",
        Some(&visitor),
        html! {
            section.hero {
                h1 { "Prepaid AI API credits for multi-model access" }
                p { (state.conf.brand.product_name) " gives developers one API key for routing requests across supported AI model providers. Customers buy prepaid credits, track usage, and choose budget, standard, or premium model tiers." }
                p {
                    @if visitor.account.is_some() { a.button href="/dashboard" { "Go to the dashboard" } }
                    @else { a.button href="/signup" { "Create an account" } " " a href="/login" { "Log in" } }
                }
            }
            section.grid {
                div.card { h2 { "Unified API" } p { "Use one API interface and one customer key to access supported model providers through a managed gateway." } }
                div.card { h2 { "Prepaid credits" } p { "Buy credits before use, avoid surprise invoices, and monitor balance and token usage in real time." } }
                div.card { h2 { "Model routing" } p { "Choose budget, standard, or premium tiers depending on cost, speed, and quality needs." } }
            }
            section.card {
                h2 { "Usage controls" }
                p { "Accounts have credit balances, API keys, rate limits, and usage logs." }
                p { "Customers must follow our " a href="/policies/terms" { "Terms" } ", " a href="/policies/privacy" { "Privacy Policy" } ", " a href="/policies/refunds" { "Refund Policy" } ", " a href="/policies/acceptable-use" { "Acceptable Use Policy" } ", and upstream provider rules." }
            }
        },
    )
}

pub async fn pricing(State(state): State<AppState>, visitor: Visitor) -> Markup {
    page(
        &state,
        "Pricing",
        Some(&visitor),
        html! {
            section.card {
                h1 { "Pricing" }
                p { "Credits are prepaid in USD cents. Usage is deducted based on selected model, input tokens, and output tokens. Tiers route to supported provider models and are priced as " (state.conf.brand.product_name) " customer rates." }
                (tier_rows(&state))
                p.muted { "A request's cost is its input tokens times the input price plus its output tokens times the output price. A request that fails before any output costs nothing." }
            }
        },
    )
}

pub fn quickstart_body(state: &AppState) -> Markup {
    let base = state
        .conf
        .gateway
        .public_base_url
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let curl = format!(
        "curl {base}/chat/completions \\\n  -H \"Authorization: Bearer sk-relay_YOUR_KEY\" \\\n  -H \"Content-Type: application/json\" \\\n  -d '{{\n  \"model\": \"budget\",\n  \"messages\": [\n    {{\"role\": \"user\", \"content\": \"Say ok in one word.\"}}\n  ],\n  \"max_tokens\": 50\n}}'"
    );
    html! {
        h2 { "Base URL" }
        pre { code #base-url { (base) } }
        p { "Use your " (state.conf.brand.product_name) " key as the API key and set the base URL to our endpoint." }
        pre { code { "OPENAI_API_KEY=sk-relay_YOUR_KEY OPENAI_BASE_URL=" (base) } }
        pre { code { (curl) } }
        p.muted { "Compatibility depends on whether your app supports a custom OpenAI-compatible base URL. Name a tier (" code { "budget" } ", " code { "standard" } " or " code { "premium" } ") as the model." }
        ol {
            li { "Sign up in the dashboard and verify your email before using credits or API keys." }
            li { "Buy a preset credit package or enter a custom amount. Stripe handles payment securely." }
            li { "Generate a key that starts with " code { "sk-relay_" } ". Copy it when it is shown." }
            li { "Set the base URL to " code { (base) } " in compatible tools or apps." }
        }
    }
}

pub async fn quickstart(State(state): State<AppState>, visitor: Visitor) -> Markup {
    page(
        &state,
        "Quick start",
        Some(&visitor),
        html! {
            section.card { h1 { "Quick start" } (quickstart_body(&state)) }
        },
    )
}

pub async fn policy(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(slug): Path<String>,
) -> Response {
    let brand = &state.conf.brand;
    let Some(p) = policies::by_slug(brand, &slug) else {
        return super::error::AdminError::NotFound("No such policy.".into())
            .into_page(Some(&visitor));
    };
    let support = &state.conf.admin.support_email;
    page(
        &state,
        &p.title,
        Some(&visitor),
        html! {
            section.card.policy {
                h1 { (p.title) }
                p.muted #policy-updated { "Last updated: " time datetime=(p.updated) { (p.updated) } }
                (policies::render(p, brand, support))
                p { "Contact: " a href={ "mailto:" (support) } { (support) } }
            }
        },
    )
    .into_response()
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

const STYLESHEET: &str = r#"
:root{--bg:#f5f6fa;--fg:#1d2330;--card:#fff;--border:#e2e5ee;--muted:#4f5668;--link:#3552d4;--accent:#3552d4;--on-accent:#fff;--secondary:#e8ebf5;--danger:#c0392b;--error:#b42318;--notice-bg:#fff7e0;--notice-border:#f0d58a;--success-bg:#e8f7ee;--success-border:#9fd8b5;--pre-bg:#1d2330;--pre-fg:#e8ebf5;--row:#eceef4;--input-border:#8a91a3;--code-bg:#f0f2f8;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#12151c;--fg:#e6e8ee;--card:#1b1f29;--border:#2c3240;--muted:#a9b0c0;--link:#9bb1ff;--accent:#3552d4;--secondary:#2c3240;--danger:#c0392b;--error:#ff8a80;--notice-bg:#33290b;--notice-border:#7a6420;--success-bg:#0f2e1c;--success-border:#2f6b47;--pre-bg:#0b0d12;--pre-fg:#e6e8ee;--row:#262b36;--input-border:#5b6275;--code-bg:#232836}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
a{color:var(--link)}
h1,h2,h3,p,li,label{overflow-wrap:anywhere}
header.top{display:flex;align-items:center;justify-content:space-between;flex-wrap:wrap;gap:.5rem;padding:.75rem 1.5rem;background:var(--card);border-bottom:1px solid var(--border)}
header.top nav{display:flex;gap:1rem;align-items:center;flex-wrap:wrap}
.menu-toggle,.menu-button{display:none}
.brand{font-weight:700;font-size:1.1rem;text-decoration:none;color:var(--fg)}
.who{color:var(--muted);font-size:.9rem}
main{max-width:960px;margin:1.5rem auto;padding:0 1rem}
footer{max-width:960px;margin:2rem auto;padding:1rem;color:var(--muted);font-size:.9rem;border-top:1px solid var(--border)}
footer nav{display:flex;gap:1rem;flex-wrap:wrap}
.card{background:var(--card);border:1px solid var(--border);border-radius:8px;padding:1.25rem 1.5rem;margin-bottom:1rem;min-width:0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:1rem;margin-bottom:1rem}
.grid .card{margin:0}
.split{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:1rem}
.split>div{min-width:0}
.hero{padding:1.5rem 0}
.hero h1{font-size:2rem;margin:.2rem 0 .6rem}
.button,button{display:inline-block;background:var(--accent);color:var(--on-accent);border:0;border-radius:6px;padding:.5rem 1rem;font:inherit;cursor:pointer;text-decoration:none}
button.secondary{background:var(--secondary);color:var(--fg)}
button.danger{background:var(--danger);color:#fff}
button.link{background:none;color:var(--link);padding:0;text-decoration:underline}
form.inline{display:inline}
form.stack{display:flex;flex-direction:column;gap:.75rem;max-width:420px}
form.row{display:flex;gap:.75rem;flex-wrap:wrap;align-items:flex-end}
label{display:flex;flex-direction:column;gap:.25rem;font-weight:600;font-size:.9rem}
input,select{font:inherit;padding:.45rem .6rem;border:1px solid var(--input-border);border-radius:6px;font-weight:400;background:var(--card);color:var(--fg);max-width:100%}
table{border-collapse:collapse;width:100%;position:relative}
th,td{text-align:left;padding:.45rem .5rem;border-bottom:1px solid var(--row);font-size:.92rem}
th{color:var(--muted);font-weight:600}
pre{background:var(--pre-bg);color:var(--pre-fg);padding:.75rem 1rem;border-radius:6px;overflow-x:auto;max-width:100%}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}
.error{color:var(--error);font-weight:600}
.notice{background:var(--notice-bg);border:1px solid var(--notice-border);border-radius:8px;padding:.75rem 1rem;margin-bottom:1rem}
.success{background:var(--success-bg);border:1px solid var(--success-border);border-radius:8px;padding:.75rem 1rem;margin-bottom:1rem}
.muted,.hint{color:var(--muted)}
.balance{font-size:2rem;font-weight:700;margin:.25rem 0}
.key{font-size:1.05rem;word-break:break-all;background:var(--code-bg);padding:.6rem;border-radius:6px}
.status-revoked,.status-suspended,.status-terminated{color:var(--error)}
.scroll{overflow-x:auto;max-width:100%}
.qr svg{background:#fff;padding:4px;max-width:100%;height:auto}
ul.codes{columns:2;font-size:1.05rem}
table.facts th{width:12rem}
nav.periods{display:flex;gap:1rem;flex-wrap:wrap;margin-bottom:.5rem}
svg text{fill:var(--muted)}
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
:focus-visible{outline:2px solid var(--link);outline-offset:2px}
@media (max-width:720px){
header.top{padding:.6rem 1rem}
.menu-toggle{display:block;position:absolute;opacity:0;width:1px;height:1px}
.menu-button{display:inline-block;border:1px solid var(--border);border-radius:6px;padding:.35rem .8rem;font-weight:600;cursor:pointer}
.menu-toggle:focus-visible+.menu-button{outline:2px solid var(--link)}
header.top nav{display:none;width:100%;flex-direction:column;align-items:flex-start;gap:.6rem;padding:.5rem 0}
.menu-toggle:checked~nav{display:flex}
main{margin:1rem auto;padding:0 .6rem}
.card{padding:1rem}
.hero h1{font-size:1.6rem}
table{display:block;overflow-x:auto;white-space:nowrap}
td form.row{flex-wrap:nowrap}
form.stack{max-width:100%}
}
@media print{header.top,footer,nav.sub,.no-print{display:none}.card{border:0}body{background:#fff;color:#000}}
"#;
