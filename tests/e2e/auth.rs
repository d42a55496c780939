//! Identity: the three header forms, 401 and 403, and what reaches the replica.

use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn all_three_key_headers_are_accepted() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let url = gw.url("/v1/chat/completions");
    for (name, value) in [
        ("authorization", format!("Bearer {KEY}")),
        ("authorization", format!("Api-Key {KEY}")),
        ("x-api-key", KEY.to_string()),
    ] {
        let r = c
            .post(&url)
            .header(name, &value)
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
    }
}

#[tokio::test]
async fn x_api_key_works_behind_an_ingress_that_sets_its_own_authorization() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    // (Authorization, x-api-key, status): the key in either header lets the request in;
    // when neither matches it is refused as an unknown key.
    for (authorization, x_api_key, status) in [
        ("Basic Zm9vOmJhcg==", KEY, 200),
        ("Bearer ingress-session-token", KEY, 200),
        ("Basic Zm9vOmJhcg==", "tg-not-a-key", 401),
    ] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", authorization)
            .header("x-api-key", x_api_key)
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{authorization}");
        if status == 401 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
    }
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_json_before_any_upstream_work() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let r = c.post(&url).json(&hello()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-request-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));

    let r = c
        .post(&url)
        .bearer_auth("tg-not-a-key")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        !body.to_string().contains("tg-not-a-key"),
        "the presented key is not echoed"
    );
    assert_eq!(sim.stats().requests(), 0);
}

#[tokio::test]
async fn a_key_without_the_model_gets_403() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(NARROW_KEY)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("team-b"));
    assert_eq!(sim.stats().requests(), 0);
}

#[tokio::test]
async fn the_client_key_never_reaches_the_replica_and_the_pool_key_does() {
    let sim = SimReplica::start(SimOptions {
        api_key: Some("upstream-secret".into()),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let config = standard_config(
        &[sim.addr()],
        "upstream_api_key_env = \"TG_TEST_UPSTREAM_KEY\"",
    );
    let gw = Gateway::try_start_with_env(&config, &[("TG_TEST_UPSTREAM_KEY", "upstream-secret")])
        .unwrap();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", KEY)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = sim.stats().last_request().unwrap();
    assert_eq!(seen.headers["authorization"], "Bearer upstream-secret");
    assert!(seen.headers.get("x-api-key").is_none());
    for (_, v) in seen.headers.iter() {
        assert!(
            !v.to_str().unwrap_or("").contains(KEY),
            "client key leaked upstream"
        );
    }
    assert!(
        !gw.stderr().contains("upstream-secret") && !gw.stderr().contains(KEY),
        "secret in logs"
    );
}

#[tokio::test]
async fn request_ids_are_generated_or_kept_when_safe() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let r = c
        .post(&url)
        .bearer_auth(KEY)
        .json(&hello())
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let digits = generated.strip_prefix("req_").unwrap_or_default();
    assert!(
        digits.len() == 32
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{generated}"
    );
    assert_eq!(
        sim.stats().last_request().unwrap().headers["x-request-id"],
        generated.as_str()
    );

    let r = c
        .post(&url)
        .bearer_auth(KEY)
        .header("x-request-id", "trace-42")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    let r = c
        .post(&url)
        .header("x-request-id", "bad id!")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_ne!(r.headers()["x-request-id"], "bad id!");
}
