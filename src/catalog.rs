//! `GET /v1/models` and `GET /v1/models/{slug}`: the OpenAI list format, extended with what a
//! hosted API publishes (context length, output cap, per-token prices, features, modalities).

use serde_json::{json, Value};

use crate::config::{Key, Model, Price, Snapshot};

/// The answer to `GET /v1/models` or `GET /v1/models/{slug}` (as `path` names), or the slug
/// that names no model this key may see.
pub fn answer(snapshot: &Snapshot, key: &Key, path: &str) -> Result<Value, String> {
    match model_path(path) {
        None => Ok(list(snapshot, key)),
        Some(slug) => get(snapshot, key, &slug).ok_or(slug),
    }
}

/// The slug a `/v1/models/{slug}` path names, percent-decoded (slugs contain `/`, which
/// clients may send as `%2F`). It may be empty or not name any model; the lookup then
/// answers 404 `model_not_found`.
fn model_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/models/")?;
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The models this key may use, in config order.
pub fn list(snapshot: &Snapshot, key: &Key) -> Value {
    let data: Vec<Value> = snapshot
        .models
        .iter()
        .filter(|m| key.allows(&m.slug))
        .map(|m| entry(m))
        .collect();
    json!({ "object": "list", "data": data })
}

/// One model, or `None` when it does not exist or the key may not see it.
pub fn get(snapshot: &Snapshot, key: &Key, slug: &str) -> Option<Value> {
    snapshot
        .model(slug)
        .filter(|m| key.allows(&m.slug))
        .map(|m| entry(m))
}

fn entry(m: &Model) -> Value {
    json!({
        "id": &*m.slug,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
        "name": m.display_name.as_deref().unwrap_or(&m.slug),
        "description": m.description.as_deref().unwrap_or(""),
        "context_length": m.context_tokens,
        "max_completion_tokens": m.max_output_tokens,
        "pricing": pricing(&m.price),
        "supported_features": m.features,
        "input_modalities": m.input_modalities,
        "output_modalities": ["text"],
    })
}

/// Prices per token as decimal strings, converted from the config's USD per million tokens.
fn pricing(p: &Price) -> Value {
    json!({
        "prompt": per_token(p.input_per_mtok),
        "completion": per_token(p.output_per_mtok),
        "input_cache_read": per_token(p.cached_input_per_mtok),
        "request": "0",
        "image": "0",
    })
}

/// `0.5` USD/Mtok → `"0.0000005"`: fixed-point, no exponent, trailing zeros trimmed.
fn per_token(per_mtok: f64) -> String {
    let s = format!("{:.15}", per_mtok / 1_000_000.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{model_path, per_token};

    #[test]
    fn model_paths_are_percent_decoded() {
        assert_eq!(
            model_path("/v1/models/org/name").as_deref(),
            Some("org/name")
        );
        assert_eq!(
            model_path("/v1/models/org%2Fname").as_deref(),
            Some("org/name")
        );
        assert_eq!(model_path("/v1/models/").as_deref(), Some(""));
        assert_eq!(model_path("/v1/models/%zz").as_deref(), Some("%zz"));
        assert_eq!(model_path("/v1/models/%FF").as_deref(), Some("\u{FFFD}"));
        assert_eq!(model_path("/v1/modelsx"), None);
    }

    #[test]
    fn prices_are_per_token_decimal_strings() {
        assert_eq!(per_token(0.5), "0.0000005");
        assert_eq!(per_token(2.1), "0.0000021");
        assert_eq!(per_token(15.0), "0.000015");
        assert_eq!(per_token(0.0), "0");
        assert_eq!(per_token(1_000_000.0), "1");
    }
}
