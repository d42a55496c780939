//! JSON chat completions, errors, auth, the small endpoints and connection reuse.

use serde_json::{json, Value};

use super::{chat, client, start, url, user};
use crate::sim::SimOptions;

#[tokio::test]
async fn completion_has_openai_shape_and_usage() {
    let sim = start(SimOptions::default()).await;
    let resp = chat(
        &sim,
        json!({"model": "m", "messages": user("Hello there, sim!"), "max_tokens": 5}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m");
    assert!(body["created"].as_u64().unwrap() > 0);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "The quick brown fox jumps");
    assert!(choice["message"].get("reasoning_content").is_none());
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["stop_reason"], Value::Null);
    // 4 per message + ceil(17 / 4).
    let usage = json!({"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}});
    assert_eq!(body["usage"], usage);
    let stats = sim.stats();
    assert_eq!((stats.requests(), stats.completed()), (1, 1));
    assert_eq!((stats.prompt_tokens(), stats.completion_tokens()), (9, 5));
}

#[tokio::test]
async fn default_length_and_natural_end() {
    let sim = start(SimOptions {
        default_max_tokens: 3,
        ..SimOptions::default()
    })
    .await;
    let body: Value = chat(&sim, json!({"messages": user("hi")}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "The quick brown");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let body = json!({"messages": user("hi"), "max_tokens": 10, "sim": {"tokens": 2}});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "The quick");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["stop_reason"], Value::Null);
}

#[tokio::test]
async fn stop_sequence_ends_before_the_match() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("hi"), "max_tokens": 20, "stop": [" lazy", " fox"]});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["content"], "The quick brown");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["stop_reason"], " fox");
    // The stop string's token was generated, so it is billed.
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "required": ["city", "days", "metric"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                "metric": {"type": "boolean"}, "note": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "required": ["zones"],
            "properties": {"zones": {"type": "array"}}}}}
    ])
}

#[tokio::test]
async fn tool_calls_and_answer_after_tool_result() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("weather?"), "tools": weather_tools()});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let id = calls[0]["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = r#"{"city":"sim","days":1,"metric":true}"#;
    assert_eq!(calls[0]["function"]["arguments"], args);
    assert_eq!(body["usage"]["completion_tokens"], args.len().div_ceil(4));

    let body = json!({"messages": user("both"), "tools": weather_tools(),
        "sim": {"parallel_tools": true}});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    let names: Vec<_> = calls
        .iter()
        .map(|c| c["function"]["name"].clone())
        .collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_eq!(calls[1]["function"]["arguments"], r#"{"zones":[]}"#);

    let messages = json!([{"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]);
    let body = json!({"messages": messages, "tools": weather_tools(), "max_tokens": 2});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "The quick");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn reasoning_precedes_the_answer() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("why?"), "max_tokens": 10, "reasoning_effort": "low",
        "sim": {"reasoning_tokens": 3}});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me think");
    assert_eq!(message["content"], "The quick brown fox jumps over the");
    assert_eq!(body["usage"]["completion_tokens"], 10);
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        3
    );
    let body = json!({"messages": user("why?"), "max_tokens": 20,
        "chat_template_args": {"enable_thinking": true}});
    let body: Value = chat(&sim, body).await.json().await.unwrap();
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        8
    );
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let sim = start(SimOptions {
        models: vec!["served".to_owned()],
        ..SimOptions::default()
    })
    .await;
    let resp = client()
        .post(url(&sim, "/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "BadRequestError");
    assert_eq!(body["error"]["code"], 400);
    assert_eq!(body["error"]["param"], Value::Null);
    assert_eq!(chat(&sim, json!({"model": "served"})).await.status(), 400);
    let resp = chat(&sim, json!({"model": "other", "messages": user("hi")})).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "The model `other` does not exist."
    );
    assert_eq!(body["error"]["code"], 404);
    let resp = chat(&sim, json!({"model": "served", "messages": user("hi")})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests(), 4);
}

#[tokio::test]
async fn api_key_is_required_on_the_api_only() {
    let sim = start(SimOptions {
        api_key: Some("sekret".to_owned()),
        ..SimOptions::default()
    })
    .await;
    let post = |auth: Option<&str>| {
        let mut req = client()
            .post(url(&sim, "/v1/chat/completions"))
            .json(&json!({"messages": user("hi")}));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.send()
    };
    let resp = post(None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 401);
    assert_eq!(post(Some("Bearer wrong")).await.unwrap().status(), 401);
    assert_eq!(post(Some("Bearer sekret")).await.unwrap().status(), 200);
    let models = client().get(url(&sim, "/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let health = client().get(url(&sim, "/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn health_models_and_metrics() {
    let sim = start(SimOptions {
        models: vec!["a".to_owned(), "b".to_owned()],
        ..SimOptions::default()
    })
    .await;
    let health = client().get(url(&sim, "/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.bytes().await.unwrap().is_empty());
    let models: Value = client()
        .get(url(&sim, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "tollgate-sim");

    chat(
        &sim,
        json!({"model": "a", "messages": user("Hello there, sim!"), "max_tokens": 5}),
    )
    .await;
    let metrics = client().get(url(&sim, "/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    for line in [
        "# TYPE vllm:num_requests_running gauge",
        "vllm:num_requests_running{model_name=\"a\"} 0.0",
        "vllm:num_requests_waiting{model_name=\"a\"} 0.0",
        "# TYPE vllm:prompt_tokens_total counter",
        "vllm:prompt_tokens_total{model_name=\"a\"} 9.0",
        "vllm:generation_tokens_total{model_name=\"a\"} 5.0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let sim = start(SimOptions::default()).await;
    let client = client();
    for _ in 0..2 {
        let resp = client
            .post(url(&sim, "/v1/chat/completions"))
            .json(&json!({"messages": user("hi"), "stream": true}))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap();
        let resp = client
            .post(url(&sim, "/v1/chat/completions"))
            .json(&json!({"messages": user("hi")}))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap();
    }
    assert_eq!(sim.stats().connections(), 1);
    assert_eq!(sim.stats().completed(), 4);
}

#[tokio::test]
async fn last_request_is_recorded() {
    let sim = start(SimOptions::default()).await;
    assert!(sim.stats().last_request().is_none());
    let body = json!({"model": "m", "messages": user("hi"), "extra": {"kept": true}});
    client()
        .post(url(&sim, "/v1/chat/completions"))
        .header("x-request-id", "r-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    let recorded = sim.stats().last_request().unwrap();
    assert_eq!(recorded.headers["x-request-id"], "r-1");
    assert_eq!(recorded.body, body);
}
