//! Guards against a config file that was emptied or cut short: a config that would let no
//! request through is refused, and what a reload drops of the running config's protections
//! (limits, budgets, prices) is named.
//!
//! TOML cannot tell a file cut at a line boundary from a shorter file: a file cut after its
//! `[state]` table, or after a key's `models` line, is valid. A config with no model or no
//! key is never what an operator means, so it is refused outright. A key that lost its
//! budget may be meant, so that is reported, not refused.

use super::{ConfigError, Key, Limits, Model, Snapshot};

/// Refuses a config with no `[[models]]` nor `[[deployed_models]]`, or no `[[keys]]`: every request would be refused
/// (404 or 401). It is far more likely a file emptied, cut short or still being written.
pub(super) fn serves_something(s: &Snapshot) -> Result<(), ConfigError> {
    let missing = |table: &str, path: &str, fix: &str| ConfigError {
        file: None,
        line: None,
        path: path.into(),
        message: format!(
            "the file defines no [[{table}]], so every request would be refused; if the file \
             was cut short or is still being written, restore it (write a temporary file and \
             rename it over this one), otherwise {fix}"
        ),
    };
    if s.models.is_empty() && s.deployed_models.is_empty() {
        return Err(missing(
            "models",
            "models",
            "add a [[models]] entry naming a pool",
        ));
    }
    if s.key_count() == 0 {
        return Err(missing(
            "keys",
            "keys",
            "add a [[keys]] entry (`tollgate key new` prints one)",
        ));
    }
    Ok(())
}

/// What `fresh` drops of the protections `old` gives the keys and models both define: a
/// key's limits or budget, a model's limits or price. Each entry names the key or model and
/// what it lost, e.g. `key "team-a": rpm, budget`. Empty when nothing was dropped.
pub fn dropped_protections(old: &Snapshot, fresh: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for key in fresh.keys() {
        if let Some(before) = old.key_by_id(&key.id) {
            let lost = key_losses(before, key);
            if !lost.is_empty() {
                out.push(format!("key {:?}: {}", &*key.id, lost.join(", ")));
            }
        }
    }
    for model in &fresh.models {
        if let Some(before) = old.model(&model.slug) {
            let lost = model_losses(before, model);
            if !lost.is_empty() {
                out.push(format!("model {:?}: {}", &*model.slug, lost.join(", ")));
            }
        }
    }
    // Keys come from a map: a stable order for logs and answers.
    out.sort();
    out
}

fn key_losses(before: &Key, after: &Key) -> Vec<&'static str> {
    let mut lost = limit_losses(
        &before.limits,
        &after.limits,
        ["rpm", "tpm", "max_concurrent"],
    );
    if before.budget.is_some() && after.budget.is_none() {
        lost.push("budget");
    }
    lost
}

fn model_losses(before: &Model, after: &Model) -> Vec<&'static str> {
    let names = ["limits.rpm", "limits.tpm", "limits.max_concurrent"];
    let mut lost = limit_losses(&before.limits, &after.limits, names);
    let p = (&before.token_prices, &after.token_prices);
    let was_priced = p.0.input > 0 || p.0.cached_input > 0 || p.0.output > 0;
    let is_free = p.1.input == 0 && p.1.cached_input == 0 && p.1.output == 0;
    if was_priced && is_free {
        lost.push("price");
    }
    lost
}

/// The limits `before` sets and `after` does not, as `names` calls rpm, tpm, max_concurrent.
fn limit_losses(before: &Limits, after: &Limits, names: [&'static str; 3]) -> Vec<&'static str> {
    let set = |l: &Limits| [l.rpm.is_some(), l.tpm.is_some(), l.max_concurrent.is_some()];
    let (had, has) = (set(before), set(after));
    (0..3)
        .filter(|&i| had[i] && !has[i])
        .map(|i| names[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    const POOL: &str = "[[pools]]\nname = \"p\"\n";
    const MODEL: &str = "[[models]]\nslug = \"m\"\npool = \"p\"\nprice = { input_per_mtok = 1.0, output_per_mtok = 2.0 }\nlimits = { rpm = 5 }\n";
    const KEY: &str = "[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmodels = [\"*\"]\n";

    #[test]
    fn a_config_without_models_or_keys_is_refused_with_the_fix() {
        for (text, path) in [
            ("# only a comment\n\n   \n".to_string(), "models"),
            ("[state]\ndir = \"/srv/tg\"\n".to_string(), "models"),
            (format!("{POOL}{MODEL}"), "keys"),
        ] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            let e = e.to_string();
            assert!(e.contains("every request would be refused"), "{e}");
            assert!(e.contains("rename it over this one"), "{e}");
        }
        parse(&format!("{POOL}{MODEL}{KEY}")).unwrap();
    }

    #[test]
    fn a_file_cut_after_a_keys_models_line_names_what_it_dropped() {
        let old = parse(&format!(
            "{POOL}{MODEL}{KEY}rpm = 2\nmax_concurrent = 3\nbudget = {{ usd = 1.0, period = \"daily\" }}\n"
        ))
        .unwrap();
        let cut = parse(&format!(
            "{POOL}[[models]]\nslug = \"m\"\npool = \"p\"\n{KEY}"
        ))
        .unwrap();
        assert_eq!(
            dropped_protections(&old, &cut),
            vec![
                "key \"k\": rpm, max_concurrent, budget".to_string(),
                "model \"m\": limits.rpm, price".to_string(),
            ]
        );
        // Adding protections, or changing nothing, drops nothing.
        assert!(dropped_protections(&cut, &old).is_empty());
        assert!(dropped_protections(&old, &old).is_empty());
    }
}
