//! The `affinity` policy: a session id, or a prompt prefix, keeps landing on one replica
//! while it is under `load_factor` × the mean load; a refusal still goes elsewhere.

use serde_json::{json, Value};

use crate::common::*;

async fn chat_in(gw: &Gateway, session: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-session-affinity", session)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_session_stays_on_its_replica_and_spills_over_when_it_is_overloaded() {
    let (a, b) = (sim().await, sim().await);
    let gw = Gateway::start(&standard_config(
        &[a.addr(), b.addr()],
        "policy = \"affinity\"",
    ));
    for _ in 0..10 {
        let r = chat_in(&gw, "session-1", hello()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-session-affinity"], "session-1", "sent back");
    }
    let counts = (a.stats().requests(), b.stats().requests());
    assert!(counts == (10, 0) || counts == (0, 10), "{counts:?}");
    let (home, other) = if counts.0 == 10 { (&a, &b) } else { (&b, &a) };

    // Streams hold their replica. With two replicas and load_factor 1.25, the home takes
    // the first two (under 1.25 × the mean counting the new one), the third spills over.
    let mut body = hello();
    body["stream"] = json!(true);
    body["sim"] = json!({"ttft_ms": 60_000});
    let mut held = Vec::new();
    for _ in 0..3 {
        let r = chat_in(&gw, "session-1", body.clone()).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    assert_eq!(
        (home.stats().requests(), other.stats().requests()),
        (12, 1),
        "two more at home, one spilled"
    );
    drop(held);
}

#[tokio::test]
async fn requests_sharing_a_prompt_prefix_land_together_without_a_session() {
    let (a, b, c) = (sim().await, sim().await, sim().await);
    let gw = Gateway::start(&standard_config(
        &[a.addr(), b.addr(), c.addr()],
        "policy = \"affinity\"",
    ));
    let system = json!({"role": "system", "content": "You are a patient tutor. ".repeat(40)});
    let first = json!({"role": "user", "content": "Explain photosynthesis."});
    // The same conversation turn after turn: its later requests start with the same messages.
    let mut messages = vec![system.clone(), first.clone()];
    for turn in 0..8 {
        let r = gw
            .chat(json!({"model": MODEL, "messages": messages.clone()}))
            .await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-session-affinity").is_none());
        messages.push(json!({"role": "assistant", "content": format!("answer {turn}")}));
        messages.push(json!({"role": "user", "content": format!("and then {turn}?")}));
    }
    let counts = [
        a.stats().requests(),
        b.stats().requests(),
        c.stats().requests(),
    ];
    assert!(
        counts.contains(&8),
        "one replica served the whole conversation: {counts:?}"
    );
}

#[tokio::test]
async fn a_sticky_replica_answering_503_is_retried_on_another() {
    let busy = CannedReplica::answering(
        "503 Service Unavailable",
        "application/json",
        r#"{"error": {"message": "overloaded"}}"#,
    )
    .await;
    let live = sim().await;
    // Ejection off, so every session whose home is the busy replica goes there first.
    let gw = Gateway::start(&standard_config(
        &[busy.addr, live.addr()],
        "policy = \"affinity\"\nejection = { enabled = false }",
    ));
    for i in 0..24 {
        let r = chat_in(&gw, &format!("session-{i}"), hello()).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    assert_eq!(live.stats().requests(), 24);
    assert!(
        busy.answered() > 0,
        "some sessions live on the busy replica"
    );
}

#[tokio::test]
async fn an_overlong_session_id_is_400_in_the_clients_dialect() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], "policy = \"affinity\""));
    let r = chat_in(&gw, &"s".repeat(300), hello()).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_session_affinity");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 256"));
    assert_eq!(sim.stats().requests(), 0);
}
