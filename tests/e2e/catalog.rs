//! The catalog (`/v1/models`) and the admin listener (`/metrics`, `/healthz`).

use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn models_are_listed_with_hosted_api_metadata() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let list: Value = c
        .get(gw.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "test/other"]);
    let m = &list["data"][0];
    assert_eq!(m["object"], "model");
    assert_eq!(m["context_length"], 32768);
    assert_eq!(m["max_completion_tokens"], 4096);
    assert_eq!(m["pricing"]["prompt"], "0.0000005");
    assert_eq!(m["pricing"]["completion"], "0.0000015");
    assert_eq!(m["pricing"]["input_cache_read"], "0.0000001");
    assert_eq!(
        m["supported_features"],
        serde_json::json!(["tools", "json_mode"])
    );
    assert_eq!(m["input_modalities"], serde_json::json!(["text"]));

    let one = c
        .get(gw.url("/v1/models/test/model"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap()["id"], MODEL);
    let encoded = c
        .get(gw.url("/v1/models/test%2Fmodel"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(encoded.status(), 200);
    let missing = c
        .get(gw.url("/v1/models/nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    // No slug, or one that is not UTF-8 once decoded: no such model either.
    for path in ["/v1/models/", "/v1/models/%FF"] {
        let r = c.get(gw.url(path)).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "model_not_found",
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_key_sees_only_its_models_and_the_catalog_needs_a_key() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let list: Value = c
        .get(gw.url("/v1/models"))
        .bearer_auth(NARROW_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], "test/other");
    let r = c.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn metrics_count_requests_by_model_and_status_class() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    assert_eq!(gw.chat(hello()).await.status(), 200);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let c = client();
    let health = c.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = c.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["models_served"], 2);
    // A known admin URL with the wrong method says which one it takes.
    let wrong = c.post(gw.admin_url("/admin/usage")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "GET");
    let wrong = c.get(gw.admin_url("/admin/reload")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    assert_eq!(
        c.get(gw.admin_url("/nope")).send().await.unwrap().status(),
        404
    );
    let text = gw
        .metrics_until(|t| t.contains("status_class=\"4xx\""))
        .await;
    assert!(
        text.contains(r#"tollgate_requests_total{endpoint="chat_completions",model="test/model",status_class="2xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"tollgate_requests_total{endpoint="chat_completions",model="-",status_class="4xx"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("tollgate_request_duration_seconds_bucket{endpoint=\"chat_completions\",model=\"test/model\""));
    assert!(text.contains("# HELP tollgate_requests_total"));
}

#[tokio::test]
async fn model_series_exist_before_traffic_and_keep_counting_across_a_reload() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let ttfb = r#"tollgate_upstream_first_byte_seconds_count{model="test/model"}"#;
    let requests = r#"tollgate_requests_total{endpoint="chat_completions",model="test/model",status_class="2xx"}"#;
    let output = r#"tollgate_tokens_total{key="team-a",kind="output",model="test/model"}"#;
    let text = gw.metrics().await;
    assert_eq!(series(&text, ttfb), Some(0.0), "{text}");
    assert_eq!(series(&text, requests), None, "{text}");

    assert_eq!(gw.chat(hello()).await.status(), 200);
    // Token counts are the last series a request records.
    let text = gw.metrics_until(|t| series(t, output).is_some()).await;
    assert_eq!(series(&text, requests), Some(1.0), "{text}");
    assert_eq!(series(&text, ttfb), Some(1.0), "{text}");
    let tokens = series(&text, output).unwrap_or_else(|| panic!("{text}"));
    assert!(tokens > 0.0);

    assert_eq!(gw.reload().await, 200);
    assert_eq!(gw.chat(hello()).await.status(), 200);
    let text = gw
        .metrics_until(|t| series(t, output) == Some(2.0 * tokens))
        .await;
    assert_eq!(series(&text, requests), Some(2.0), "{text}");
    assert_eq!(series(&text, ttfb), Some(2.0), "{text}");
    assert_eq!(series(&text, output), Some(2.0 * tokens), "{text}");
}

#[tokio::test]
async fn an_edited_config_file_is_reloaded_without_a_signal() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let path = gw.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        original.replacen(
            "[[models]]\nslug = \"test/other\"",
            "[[models]]\nslug = \"test/added\"\npool = \"main\"\n\n[[models]]\nslug = \"test/other\"",
            1,
        ),
    )
    .unwrap();
    // The file is looked at every second, and read once it has stayed the same for one more
    // look.
    let deadline = Deadline::after(SETTLE_LIMIT);
    let c = client();
    loop {
        let r = c
            .get(gw.url("/v1/models/test%2Fadded"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        deadline
            .pause(|| format!("the edit was picked up; stderr:\n{}", gw.stderr()))
            .await;
    }
    // Counted just after the new config is swapped in, so possibly after the answer above.
    let text = gw
        .metrics_until(|t| t.contains("tollgate_config_reloads_total{outcome=\"ok\"}"))
        .await;
    assert!(
        text.contains("tollgate_config_reloads_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("tollgate_config_reloads_total{outcome=\"refused\"}"),
        "the file was read once, whole: {text}"
    );
}

#[tokio::test]
async fn an_instance_with_no_replica_to_send_to_is_alive_but_not_ready() {
    let gw = Gateway::start(&standard_config(&[], ""));
    let c = client();
    let health = c.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = c.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no model has a replica"),
        "{body}"
    );
}
