//! A config file emptied or cut short: refused at start and by each reload trigger, with the
//! reason logged and in `POST /admin/reload`'s answer, while the running config keeps
//! serving; a file cut after a key's `models` line reloads, and says what it dropped.

use serde_json::Value;

use crate::common::*;
use crate::reload::{config, save_and_reload, Trigger};

const NO_MODELS: &str = "the file defines no [[models]], so every request would be refused";

/// The file as it reads when cut right after its `[state]` table: valid TOML.
fn cut_after_state(original: &str) -> String {
    let state = original
        .find("[state]")
        .expect("the harness writes [state]");
    let end = original[state..]
        .find("\n\n")
        .map_or(original.len(), |i| state + i + 1);
    original[..end].to_string()
}

#[tokio::test]
async fn a_sighup_reload_of_an_emptied_or_cut_file_is_refused() {
    an_emptied_or_cut_file_is_refused(Trigger::Hangup).await;
}

#[tokio::test]
async fn an_admin_reload_of_an_emptied_or_cut_file_is_refused() {
    an_emptied_or_cut_file_is_refused(Trigger::Post).await;
}

#[tokio::test]
async fn a_saved_emptied_or_cut_file_is_refused() {
    an_emptied_or_cut_file_is_refused(Trigger::FileChange).await;
}

/// A file of only comments and blank lines, then one cut after `[state]`: each is refused,
/// said why, and the key still gets answers from the running config.
async fn an_emptied_or_cut_file_is_refused(trigger: Trigger) {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim, trigger, ""));
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let cases = [
        (
            "comments only",
            "# tollgate\n\n   \n# being rewritten\n".to_string(),
        ),
        ("cut after [state]", cut_after_state(&original)),
    ];
    for (n, (what, text)) in cases.iter().enumerate() {
        assert!(text.len() < original.len() / 2, "{what}: {text}");
        let answer = save_and_reload(&gw, text, trigger, ("refused", n as f64 + 1.0)).await;
        if let Some((status, body)) = answer {
            assert_eq!(status, 400, "{what}: {body}");
            let message = body["error"].as_str().unwrap_or_default();
            assert!(message.contains(NO_MODELS), "{what}: {body}");
            assert!(
                message.contains("rename it over this one"),
                "{what}: {body}"
            );
        }
        // Logged with its reason, once per refusal.
        let deadline = Deadline::after(SETTLE_LIMIT);
        loop {
            let log = gw.stderr();
            let refusals = log
                .lines()
                .filter(|l| l.contains("config reload refused") && l.contains(NO_MODELS))
                .count();
            if refusals > n {
                break;
            }
            deadline
                .pause(|| format!("{trigger:?} {what}: the refusal is logged:\n{log}"))
                .await;
        }
        let r = gw.chat(ask(3)).await;
        assert_eq!(
            r.status(),
            200,
            "{trigger:?} {what}: the running config serves"
        );
        let list: Value = client()
            .get(gw.url("/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["data"].as_array().map(Vec::len), Some(2), "{list}");
    }
}

#[test]
fn a_start_with_an_emptied_or_cut_file_is_refused_saying_why() {
    let no_keys = standard_config(&["127.0.0.1:9".parse().unwrap()], "");
    let no_keys = &no_keys[..no_keys.find("[[keys]]").unwrap()];
    for (body, want) in [
        ("# only comments\n\n", format!("models: {NO_MODELS}")),
        (
            "[state]\ndir = \"/nonexistent/tg\"\n",
            format!("models: {NO_MODELS}"),
        ),
        (no_keys, "keys: the file defines no [[keys]]".to_string()),
    ] {
        let e = Gateway::try_start(body).err().expect("must not start");
        assert!(e.contains(&want), "{e}");
        assert!(e.contains("tollgate.toml:"), "the file is named: {e}");
    }
}

#[tokio::test]
async fn a_file_cut_after_a_keys_models_line_reloads_and_names_what_it_dropped() {
    let sim = sim().await;
    let budget = "rpm = 50\nbudget = { usd = 5.0, period = \"monthly\" }";
    let gw = Gateway::start(&config(&sim, Trigger::Post, budget));
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let line = "models = [\"*\"]\n";
    let cut = &original[..original.find(line).unwrap() + line.len()];
    let answer = save_and_reload(&gw, cut, Trigger::Post, ("ok", 1.0)).await;
    let (status, body) = answer.expect("POST answers");
    assert_eq!(status, 200, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    let dropped = "no longer limited or priced (if the file was cut short, restore it): key \"team-a\": rpm, budget";
    assert!(message.ends_with(dropped), "{body}");
    let logged = dropped.replace('"', "\\\"");
    let deadline = Deadline::after(SETTLE_LIMIT);
    while !gw
        .stderr()
        .lines()
        .any(|l| l.contains("\"WARN\"") && l.contains(&logged))
    {
        deadline
            .pause(|| format!("a warning naming the dropped limits:\n{}", gw.stderr()))
            .await;
    }
}
