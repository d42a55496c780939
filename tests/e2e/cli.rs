//! The command line: `check`, `key new`, `--help`, and refusing a bad config at startup.

use std::process::Command;

use crate::common::*;

fn tollgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_valid_file_and_names_the_problem_in_an_invalid_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        standard_config(&["127.0.0.1:9".parse().unwrap()], ""),
    )
    .unwrap();
    let (ok, out, _) = tollgate(&["check", "-c", good.to_str().unwrap()]);
    assert!(ok);
    assert!(
        out.contains("is valid: 1 pool(s), 2 model(s), 2 key(s)"),
        "{out}"
    );

    let bad = dir.path().join("bad.toml");
    let text = standard_config(&["127.0.0.1:9".parse().unwrap()], "")
        .replace("pool = \"main\"", "pool = \"mian\"");
    std::fs::write(&bad, text).unwrap();
    let (ok, _, err) = tollgate(&["check", "-c", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.toml:"), "{err}");
    assert!(
        err.contains("models[0].pool: \"mian\" is not a defined pool (defined: \"main\")"),
        "{err}"
    );

    let (ok, _, err) = tollgate(&[
        "check",
        "-c",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read the config file"), "{err}");
}

#[test]
fn the_reference_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml");
    let (ok, out, err) = tollgate(&["check", "-c", path]);
    assert!(ok, "{err}");
    assert!(out.contains("is valid"), "{out}");
}

#[test]
fn run_refuses_an_invalid_config_with_the_same_message() {
    let e = Gateway::try_start("[server]\nlisten = \"nowhere\"\n")
        .err()
        .expect("must not start");
    assert!(
        e.contains("server.listen: \"nowhere\" is not an IP:port address"),
        "{e}"
    );
}

#[tokio::test]
async fn key_new_prints_a_secret_whose_lines_work_when_pasted() {
    let (ok, out, _) = tollgate(&["key", "new", "--id", "ci-bot"]);
    assert!(ok);
    let secret = out
        .split_whitespace()
        .find(|w| w.starts_with("tg-"))
        .expect("a secret")
        .to_string();
    let block = &out[out.find("[[keys]]").expect("toml lines")..];
    assert!(block.contains("id = \"ci-bot\""));
    assert!(block.contains(&format!("sha256 = \"{}\"", sha256_hex(&secret))));

    let sim = sim().await;
    let config = standard_config(&[sim.addr()], "") + "\n" + block;
    let gw = Gateway::start(&config);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn key_new_refuses_an_id_the_config_would_refuse() {
    let (ok, out, err) = tollgate(&["key", "new", "--id", "team a"]);
    assert!(!ok);
    assert!(!out.contains("tg-"), "no secret is printed: {out}");
    assert!(
        err.contains("--id: \"team a\" is not a valid key id"),
        "{err}"
    );
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["key", "new", "--help"],
        vec!["demo", "--help"],
        vec!["sim", "--help"],
    ] {
        let (ok, out, _) = tollgate(&args);
        assert!(ok && out.contains("Usage:"), "{args:?}: {out}");
    }
}
