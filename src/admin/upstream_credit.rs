//! The operator's view of what they prepaid to each provider (`duang-admin upstream-credit`):
//! part of the upstream page and of its JSON.

use super::error::AdminError;
use super::server::AppState;
use maud::{Markup, html};
use serde_json::{Value, json};

/// Each provider with prepaid credit recorded: what is left, the spend rate, the days left, and
/// what the conf does about it.
pub async fn prepaid_json(state: &AppState) -> Result<Value, AdminError> {
    let credits = state.store.provider_credits().await?;
    Ok(json!(
        credits
            .iter()
            .map(|c| {
                let p = state.conf.providers.iter().find(|p| p.name == c.provider);
                let alert = p.and_then(|p| p.prepaid_alert_below);
                let leaves = p.is_some_and(|p| p.leave_routing_when_prepaid_spent);
                json!({
                    "provider": c.provider,
                    "prepaid_usd": c.credited.decimal(),
                    "spent_usd": c.spent.decimal(),
                    "remaining_usd": c.remaining.decimal(),
                    "remaining_nano_usd": c.remaining.nanos(),
                    "spend_per_day_usd": c.per_day().map(|d| d.decimal()),
                    "days_left": c.days_left(),
                    "rate_window_ms": c.window_ms,
                    "first_prepaid_at_ms": c.first_at,
                    "alert_below_usd": alert.map(|a| a.decimal()),
                    "low": alert.is_some_and(|a| c.remaining < a),
                    "leave_routing_when_spent": leaves,
                    "out_of_routing": leaves && !c.remaining.is_positive(),
                })
            })
            .collect::<Vec<_>>()
    ))
}

/// The page's card for [`prepaid_json`].
pub fn prepaid_card(prepaid: &Value) -> Markup {
    let rows = prepaid.as_array().map(Vec::as_slice).unwrap_or_default();
    let usd = |v: &Value| {
        v.as_str()
            .map(|s| format!("${s}"))
            .unwrap_or_else(|| "—".into())
    };
    html! {
        section.card {
            h2 { "Prepaid upstream credit" }
            @if rows.is_empty() {
                p.muted { "None recorded. Record what you prepaid to a provider with " code { "duang-admin upstream-credit add PROVIDER --usd AMOUNT --ref INVOICE" } "; its provider cost then counts against it." }
            } @else {
                p.muted { "What you prepaid to each provider, less the provider cost of the usage written since the first prepayment was recorded (exact to the nano-dollar). The rate is the last 7 days' spend." }
                table #prepaid {
                    thead { tr { th { "Provider" } th { "Prepaid" } th { "Spent" } th { "Left" } th { "Per day" } th { "Days left" } th { "Alert below" } th { "State" } } }
                    tbody { @for c in rows { tr {
                        td { (c["provider"].as_str().unwrap_or_default()) }
                        td { (usd(&c["prepaid_usd"])) }
                        td { (usd(&c["spent_usd"])) }
                        td { (usd(&c["remaining_usd"])) }
                        td { (usd(&c["spend_per_day_usd"])) }
                        td { @if let Some(d) = c["days_left"].as_f64() { (format!("{d:.1}")) } @else { "—" } }
                        td { (usd(&c["alert_below_usd"])) }
                        td {
                            @if c["out_of_routing"] == true { strong.status-suspended { "spent: out of routing" } }
                            @else if c["low"] == true { strong.status-suspended { "low" } }
                            @else { "ok" }
                        }
                    } } }
                }
            }
        }
    }
}
