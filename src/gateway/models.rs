//! `GET /v1/models` and `GET /v1/models/{id}`: the tiers a key can name in `model`, in OpenAI's
//! list and model shapes, with a `pricing` field carrying the customer's rates (USD per million
//! tokens, as decimal strings). Both need a valid key, as OpenAI's do (tools validate a key by
//! listing models), and show only the tiers that key may use.

use super::auth::Caller;
use super::error::ApiError;
use crate::conf::Conf;
use bytes::Bytes;
use serde_json::{Value, json};

/// Each tier's model object, built once at start (it only changes with the conf).
pub fn model_objects(conf: &Conf) -> Vec<Value> {
    conf.tiers
        .iter()
        .map(|t| {
            json!({
                "id": t.name,
                "object": "model",
                "created": 0,
                "owned_by": "duang",
                "description": t.description,
                "kind": match t.kind {
                    crate::conf::TierKind::Chat => "chat",
                    crate::conf::TierKind::Embeddings => "embeddings",
                },
                "pricing": {
                    "currency": "USD",
                    "unit": "1M tokens",
                    "input_usd_per_mtok": t.prices.input.usd_per_mtok_string(),
                    "output_usd_per_mtok": t.prices.output.usd_per_mtok_string(),
                },
            })
        })
        .collect()
}

fn allowed(caller: &Caller, tier: &str) -> bool {
    caller
        .allowed_models
        .as_ref()
        .is_none_or(|m| m.iter().any(|t| t == tier))
}

/// The list of what the caller may use.
pub fn list(objects: &[Value], caller: &Caller) -> Bytes {
    let data: Vec<&Value> = objects
        .iter()
        .filter(|m| allowed(caller, m["id"].as_str().unwrap_or_default()))
        .collect();
    Bytes::from(json!({ "object": "list", "data": data }).to_string())
}

/// One model, or `model_not_found` (also for a tier the key may not use: it does not exist for
/// this key).
pub fn retrieve(objects: &[Value], caller: &Caller, id: &str) -> Result<Bytes, ApiError> {
    objects
        .iter()
        .find(|m| m["id"] == id && allowed(caller, id))
        .map(|m| Bytes::from(m.to_string()))
        .ok_or_else(|| ApiError::ModelNotFound {
            model: id.to_owned(),
            known: objects
                .iter()
                .filter_map(|m| m["id"].as_str())
                .filter(|t| allowed(caller, t))
                .collect::<Vec<_>>()
                .join(", "),
        })
}
