//! The Anthropic Messages surface in front of OpenAI-only replicas: request and response
//! translation, streamed and not, errors in Anthropic's shape, and count_tokens.

use serde_json::{json, Value};

use crate::common::*;

/// (event name, parsed data) for each event of an SSE body.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            (name, serde_json::from_str(data).unwrap_or(Value::Null))
        })
        .collect()
}

#[tokio::test]
async fn a_message_is_translated_both_ways() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(5);
    body["system"] = json!("Be brief.");
    body["temperature"] = json!(0.5);
    body["stop_sequences"] = json!(["zebra"]);
    body["metadata"] = json!({"user_id": "u-1"});
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("request-id"));
    let m: Value = r.json().await.unwrap();
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(
        m["model"], MODEL,
        "the client's model name, not the replica's"
    );
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["content"][0]["text"], "The quick brown fox jumps");
    assert_eq!(m["stop_reason"], "max_tokens");
    assert_eq!(m["usage"]["output_tokens"], 5);
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(up["model"], "served-model");
    assert_eq!(up["max_tokens"], 5);
    assert_eq!(
        up["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(up["messages"][1]["role"], "user");
    assert_eq!(up["stop"], json!(["zebra"]));
    assert_eq!(up["temperature"], 0.5);
    assert_eq!(up["user"], "u-1");
}

#[tokio::test]
async fn stop_reasons_map_to_anthropic_ones() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(50);
    body["sim"] = json!({"tokens": 3});
    let m: Value = gw.messages(body).await.json().await.unwrap();
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["stop_sequence"], Value::Null);

    let mut body = ask(50);
    body["stop_sequences"] = json!(["fox"]);
    let m: Value = gw.messages(body).await.json().await.unwrap();
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], "fox");
}

fn weather_tool() -> Value {
    json!([{"name": "get_weather", "description": "Weather by city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

#[tokio::test]
async fn tool_use_round_trip() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(64);
    body["tools"] = weather_tool();
    body["tool_choice"] = json!({"type": "any", "disable_parallel_tool_use": true});
    let m: Value = gw.messages(body.clone()).await.json().await.unwrap();
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let call = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "sim"}));
    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(
        up["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
    assert_eq!(up["tool_choice"], "required");
    assert_eq!(up["parallel_tool_calls"], false);

    body["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]}
    ]);
    body["tool_choice"] = json!({"type": "auto"});
    let m: Value = gw.messages(body).await.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    let up = sim.stats().last_request().unwrap().body;
    let msgs = up["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["tool_calls"][0]["id"], call["id"]);
    assert_eq!(msgs[2]["role"], "tool");
    assert_eq!(msgs[2]["tool_call_id"], call["id"]);
    assert_eq!(msgs[2]["content"], "sunny");
}

#[tokio::test]
async fn images_a_tool_returns_reach_only_models_that_take_images() {
    let sim = sim().await;
    let config = standard_config(&[sim.addr()], "").replacen(
        "[[models]]\nslug = \"test/other\"\npool = \"main\"\n",
        "[[models]]\nslug = \"test/other\"\npool = \"main\"\ninput_modalities = [\"text\", \"image\"]\n",
        1,
    );
    let gw = Gateway::start(&config);
    let screenshot = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}});
    let turn = |model: &str| {
        json!({"model": model, "max_tokens": 8, "messages": [
            {"role": "user", "content": "Take a screenshot."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "done"}, screenshot.clone()]}]}
        ]})
    };
    // A vision model sees the image, in a user message right after the tool message.
    assert_eq!(gw.messages(turn("test/other")).await.status(), 200);
    let msgs = sim.stats().last_request().unwrap().body["messages"].clone();
    assert_eq!(msgs[2]["role"], "tool");
    assert_eq!(msgs[3]["role"], "user");
    assert_eq!(msgs[3]["content"][1]["type"], "image_url");
    // A text-only model gets a marker in the tool's text, and no image it would refuse.
    assert_eq!(gw.messages(turn(MODEL)).await.status(), 200);
    let msgs = sim.stats().last_request().unwrap().body["messages"].clone();
    assert_eq!(msgs.as_array().unwrap().len(), 3, "{msgs}");
    assert!(
        msgs[2]["content"]
            .as_str()
            .unwrap()
            .contains("image omitted"),
        "{msgs}"
    );
}

#[tokio::test]
async fn a_stream_has_the_exact_anthropic_event_order() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(4);
    body["stream"] = json!(true);
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = events(&r.text().await.unwrap());
    let names: Vec<&str> = evs
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| *n != "ping")
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &evs {
        assert_eq!(
            data["type"],
            name.as_str(),
            "the event name equals the data's type"
        );
    }
    let text: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "The quick brown fox");
    let delta = &evs.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 4);
    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(
        up["stream_options"]["include_usage"], true,
        "usage is always asked upstream"
    );
}

#[tokio::test]
async fn a_streamed_tool_call_sends_input_json_deltas_and_ends_with_tool_use() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(64);
    body["stream"] = json!(true);
    body["tools"] = weather_tool();
    let evs = events(&gw.messages(body).await.text().await.unwrap());
    let start = evs
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(start.1["content_block"]["name"], "get_weather");
    let json: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap(),
        json!({"city": "sim"})
    );
    let pieces = evs
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .count();
    assert!(
        pieces >= 2,
        "arguments arrive in pieces, relayed as they come"
    );
    let delta = &evs.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn thinking_is_switched_on_upstream_and_streamed_as_thinking_blocks() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(12);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    body["sim"] = json!({"reasoning_tokens": 3});
    let m: Value = gw.messages(body.clone()).await.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "thinking", "{m}");
    assert_eq!(m["content"][1]["type"], "text");
    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(up["chat_template_kwargs"]["enable_thinking"], true);

    body["stream"] = json!(true);
    let evs = events(&gw.messages(body).await.text().await.unwrap());
    let blocks: Vec<&str> = evs
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d["content_block"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(blocks, ["thinking", "text"]);
    assert!(evs
        .iter()
        .any(|(_, d)| d["delta"]["type"] == "thinking_delta"));
}

#[tokio::test]
async fn a_model_that_reasons_unasked_answers_with_text_only() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    // The replica's model thinks by default (as Qwen3 does); the client did not ask to see it.
    let mut body = ask(12);
    body["sim"] = json!({"reasoning_tokens": 3});
    let m: Value = gw.messages(body.clone()).await.json().await.unwrap();
    let kinds: Vec<&str> = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["text"], "{m}");
    assert_eq!(m["usage"]["output_tokens"], 12, "reasoning is still output");

    body["stream"] = json!(true);
    let evs = events(&gw.messages(body).await.text().await.unwrap());
    let blocks: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0]["index"], 0);
    assert_eq!(blocks[0]["content_block"]["type"], "text");
    assert!(!evs
        .iter()
        .any(|(_, d)| d["delta"]["type"] == "thinking_delta"));
}

#[tokio::test]
async fn consecutive_turns_are_merged_and_a_prefill_is_continued() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let body = json!({"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": "Name three colours."},
        {"role": "user", "content": "Answer in JSON."},
        {"role": "assistant", "content": "{\"colours\": ["}]});
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(
        up["messages"],
        json!([{"role": "user", "content": "Name three colours.\nAnswer in JSON."},
            {"role": "assistant", "content": "{\"colours\": ["}])
    );
    assert_eq!(up["continue_final_message"], true);
    assert_eq!(up["add_generation_prompt"], false);
}

#[tokio::test]
async fn errors_use_the_anthropic_shape() {
    let sim = sim().await;
    let gw = Gateway::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 4096\n\n{}",
        standard_config(&[sim.addr()], "")
    ));
    let c = client();
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "nope")
        .json(&ask(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "authentication_error");

    // Off the two routes: under /v1/messages, or sent as the Anthropic SDK sends (with
    // anthropic-version), errors keep Anthropic's shape too.
    let off_route = [
        (
            c.get(gw.url("/v1/messages")),
            KEY,
            405,
            "invalid_request_error",
        ),
        (
            c.post(gw.url("/v1/messages/batches")),
            KEY,
            404,
            "not_found_error",
        ),
        (
            c.get(gw.url("/v1/models"))
                .header("anthropic-version", "2023-06-01"),
            "nope",
            401,
            "authentication_error",
        ),
    ];
    for (request, key, status, kind) in off_route {
        let r = request.header("x-api-key", key).send().await.unwrap();
        let got = r.status();
        let e: Value = r.json().await.unwrap();
        assert_eq!(
            (got.as_u16(), &e["type"], &e["error"]["type"]),
            (status, &json!("error"), &json!(kind)),
            "{e}"
        );
    }

    let cases = [
        (
            json!({"model": "no/such", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "not_found_error",
            "no/such",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]}),
            400,
            "invalid_request_error",
            "tool_result",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "a"}]}),
            400,
            "invalid_request_error",
            "messages[0].role",
        ),
        (
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            413,
            "request_too_large",
            "4096",
        ),
    ];
    for (body, status, kind, mention) in cases {
        let r = gw.messages(body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], kind, "{body}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(mention),
            "{e}"
        );
    }
    assert_eq!(sim.stats().requests(), 0);
}

#[tokio::test]
async fn upstream_errors_are_translated_not_leaked_in_openai_shape() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(5);
    body["sim"] = json!({"fail_status": 500});
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 500);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "api_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("simulated failure"));
}

#[tokio::test]
async fn a_replica_failing_mid_stream_ends_it_with_an_error_event() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = ask(10);
    body["stream"] = json!(true);
    body["sim"] = json!({"reset_after": 2});
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 200);
    let evs = events(&r.text().await.expect("the stream ends cleanly"));
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert_eq!(evs.iter().filter(|(n, _)| n == "message_start").count(), 1);
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn a_stream_the_replica_closes_before_its_finish_reason_ends_with_an_error_event() {
    // A clean end of the body, but no finish reason and no [DONE]: the answer is cut.
    let sse = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
               data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let replica = CannedReplica::answering("200 OK", "text/event-stream", sse).await;
    let gw = Gateway::start(&standard_config(&[replica.addr], ""));
    let mut body = ask(10);
    body["stream"] = json!(true);
    let r = gw.messages(body).await;
    assert_eq!(r.status(), 200);
    let evs = events(&r.text().await.expect("the stream ends cleanly"));
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error", "{evs:?}");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
    assert!(evs
        .iter()
        .any(|(n, d)| n == "content_block_delta" && d["delta"]["text"] == "Hel"));
}

#[tokio::test]
async fn count_tokens_answers_the_reservation_without_touching_a_replica() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let count = |content: String| {
        client()
            .post(gw.url("/v1/messages/count_tokens"))
            .header("x-api-key", KEY)
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": content}]}))
            .send()
    };
    let short: Value = count("Hello".into()).await.unwrap().json().await.unwrap();
    let long: Value = count("Hello ".repeat(400))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (short, long) = (
        short["input_tokens"].as_u64().unwrap(),
        long["input_tokens"].as_u64().unwrap(),
    );
    // 64 for the template, 8 for the message, "user", and the text at a token a byte: what
    // a request reserves, never below what the replica will count.
    assert_eq!((short, long), (64 + 8 + 4 + 5, 64 + 8 + 4 + 2400));
    assert_eq!(sim.stats().requests(), 0);
}
