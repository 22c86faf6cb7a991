//! `GET /v1/models`: the tiers a customer can name in `model`, in OpenAI's list shape with a
//! `pricing` field carrying the customer's rates (USD per million tokens, as decimal strings).

use crate::conf::Conf;
use bytes::Bytes;
use serde_json::json;

/// Built once at start: the answer only changes with the conf.
pub fn models_body(conf: &Conf) -> Bytes {
    let data: Vec<_> = conf
        .tiers
        .iter()
        .map(|t| {
            json!({
                "id": t.name,
                "object": "model",
                "created": 0,
                "owned_by": "duang",
                "description": t.description,
                "pricing": {
                    "currency": "USD",
                    "unit": "1M tokens",
                    "input_usd_per_mtok": t.prices.input.usd_per_mtok_string(),
                    "output_usd_per_mtok": t.prices.output.usd_per_mtok_string(),
                },
            })
        })
        .collect();
    Bytes::from(json!({ "object": "list", "data": data }).to_string())
}
