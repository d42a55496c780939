//! API keys: their ids, their digests, the models and deployed models they may call, and
//! their limits and budget.

use std::sync::Arc;
use toml::Spanned;

use super::limits::{budget, limits};
use super::raw::RawKey;
use super::snapshot::*;
use super::validate::Source;
use super::ConfigError;

/// A key id as the config accepts it: it names the key in metrics, logs and the ledger.
pub fn key_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{id:?} is not a valid key id: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )),
    }
}

pub(super) fn key(
    src: &Source,
    k: &RawKey,
    path: &str,
    models: &[Arc<Model>],
    deployed_models: &[Arc<super::DeployedModel>],
) -> Result<([u8; 32], Key), ConfigError> {
    let id = k.id.get_ref().clone();
    if let Err(e) = key_id(&id) {
        return src.err(k.id.span(), format!("{path}.id"), e);
    }
    let mut digest = [0u8; 32];
    if hex::decode_to_slice(k.sha256.get_ref().trim(), &mut digest).is_err() {
        return src.err(
            k.sha256.span(),
            format!("{path}.sha256"),
            "must be the 64 hex digits of the key's SHA-256, as printed by `tollgate key new`"
                .into(),
        );
    }
    let deployed = deployed_access(src, k, path, deployed_models)?;
    let empty = Spanned::new(0..0, Vec::new());
    let models_list = k.models.as_ref().unwrap_or(&empty);
    let list = models_list.get_ref();
    if list.is_empty() && deployed.is_empty() {
        let span = k.models.as_ref().map_or(k.id.span(), |m| m.span());
        return src.err(
            span,
            format!("{path}.models"),
            "lists no model; use [\"*\"] for every model, or deployed_models = [\"<id>\"]".into(),
        );
    }
    let mut patterns = Vec::with_capacity(list.len());
    let mut all = false;
    for (i, p) in list.iter().enumerate() {
        let s = p.get_ref();
        let pattern = if s == "*" {
            all = true;
            continue;
        } else if let Some(prefix) = s.strip_suffix('*') {
            ModelPattern::Prefix(prefix.to_string())
        } else {
            ModelPattern::Exact(s.clone())
        };
        if !models.iter().any(|m| pattern.matches(&m.slug)) {
            return src.err(
                p.span(),
                format!("{path}.models[{i}]"),
                format!("{s:?} matches no model in [[models]]; check the slug"),
            );
        }
        patterns.push(pattern);
    }
    let models = if all {
        ModelAccess::All
    } else {
        ModelAccess::Only(patterns)
    };
    let limits = limits(src, &k.rpm, &k.tpm, &k.max_concurrent, path)?;
    let budget = match &k.budget {
        None => None,
        Some(b) => Some(budget(src, b, &format!("{path}.budget"))?),
    };
    Ok((
        digest,
        Key {
            id: id.into(),
            models,
            deployed,
            limits,
            budget,
        },
    ))
}

/// A key's `deployed_models`: `"{id}"` or `"{id}/{environment}"`, each naming a deployed
/// model (and one of its environments).
fn deployed_access(
    src: &Source,
    k: &RawKey,
    path: &str,
    deployed: &[Arc<super::DeployedModel>],
) -> Result<Vec<(String, Option<String>)>, ConfigError> {
    let Some(list) = &k.deployed_models else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.get_ref().len());
    for (i, item) in list.get_ref().iter().enumerate() {
        let s = item.get_ref();
        let (id, env) = match s.split_once('/') {
            Some((id, env)) => (id, Some(env)),
            None => (s.as_str(), None),
        };
        let at = format!("{path}.deployed_models[{i}]");
        let Some(model) = deployed.iter().find(|m| &*m.id == id) else {
            return src.err(
                item.span(),
                at,
                format!("{id:?} is no id in [[deployed_models]]; check the id"),
            );
        };
        if let Some(env) = env.filter(|e| !model.environments.contains_key(*e)) {
            return src.err(
                item.span(),
                at,
                format!(
                    "deployed model {id:?} has no environment {env:?} (it has: {})",
                    model
                        .environments
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        out.push((id.to_string(), env.map(str::to_string)));
    }
    Ok(out)
}
