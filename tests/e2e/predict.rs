//! Deployed models: predict on every target by host and by path prefix, bodies passed
//! verbatim both ways and streamed, `sync/…` pass-through, the predict dialect's errors,
//! keys scoped to an environment, the predict timeout and the body cap. The fleet, limits,
//! accounting, wake and third-party replicas are in `predict_fleet.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::common::*;

pub const STAGING_KEY: &str = "tg-test-key-staging-only";

/// Two deployments of model `abcd1234`, each on a pool of its own replica: production on
/// `prod`, staging and development on `dev`. `KEY` may call the whole model,
/// `STAGING_KEY` only its staging environment. No Model API model: a config of deployed
/// models alone is served.
pub fn deployed_config(prod: SocketAddr, dev: SocketAddr, model_extra: &str) -> String {
    format!(
        r#"[[pools]]
name = "prod"
replicas = ["{prod}"]

[[pools]]
name = "dev"
replicas = ["{dev}"]

[[deployed_models]]
id = "abcd1234"
name = "echo-model"
environments = {{ production = "dep-a", staging = "dep-b" }}
development = "dep-b"
{model_extra}

[[deployed_models.deployments]]
id = "dep-a"
pool = "prod"

[[deployed_models.deployments]]
id = "dep-b"
pool = "dev"

[[keys]]
id = "team-a"
sha256 = "{}"
deployed_models = ["abcd1234"]

[[keys]]
id = "team-s"
sha256 = "{}"
deployed_models = ["abcd1234/staging"]
"#,
        sha256_hex(KEY),
        sha256_hex(STAGING_KEY)
    )
}

pub async fn two_replicas() -> (SimReplica, SimReplica) {
    (sim().await, sim().await)
}

pub fn predict(gw: &Gateway, path: &str) -> reqwest::RequestBuilder {
    client()
        .post(gw.url(&format!("/model/abcd1234{path}")))
        .header("authorization", format!("Api-Key {KEY}"))
}

pub async fn error_of(r: reqwest::Response) -> String {
    let body: Value = r.json().await.expect("a JSON error");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{{\"error\": \"…\"}} expected, got {body}"))
        .to_string()
}

#[tokio::test]
async fn every_target_by_host_and_by_path_reaches_its_deployment() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    let cases = [
        ("/production/predict", prod.addr()),
        ("/environments/production/predict", prod.addr()),
        ("/environments/staging/predict", dev.addr()),
        ("/development/predict", dev.addr()),
        ("/deployment/dep-a/predict", prod.addr()),
        ("/deployment/dep-b/predict", dev.addr()),
    ];
    for (path, replica) in cases {
        let by_path = predict(&gw, path);
        // By host: the request goes to tollgate's address, named model-{id}.<domain>.
        let by_host = client()
            .post(gw.url(path))
            .header("host", "model-abcd1234.api.example.com")
            .bearer_auth(KEY);
        for (how, req) in [("path", by_path), ("host", by_host)] {
            let r = req
                .body(format!("{{\"to\": \"{path}\"}}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{how} {path}");
            let host = r.headers()["x-echo-host"].to_str().unwrap().to_string();
            assert_eq!(host, replica.to_string(), "{how} {path}");
            assert_eq!(r.text().await.unwrap(), format!("{{\"to\": \"{path}\"}}"));
        }
    }
}

#[tokio::test]
async fn bodies_pass_verbatim_with_fields_and_without_credentials() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let r = predict(&gw, "/production/predict")
        .header("content-type", "application/octet-stream")
        .header("x-custom", "kept")
        .header("x-api-key", KEY)
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["x-echo-custom"], "kept");
    assert_eq!(
        h["x-echo-authorization"], "-",
        "the client's key stays here"
    );
    assert_eq!(h["x-echo-api-key"], "-");
    assert_eq!(h["x-echo-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-echo-forwarded-proto"], "http");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), &binary[..]);

    // A replica's own error passes unchanged: status, body, type.
    let r = predict(&gw, "/production/predict")
        .header("x-sim-status", "422")
        .header("content-type", "text/plain")
        .body("not a waveform")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "not a waveform");
}

#[tokio::test]
async fn a_streamed_answer_arrives_chunk_by_chunk() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    let interval = Duration::from_millis(150);
    let start = Instant::now();
    let r = predict(&gw, "/production/predict")
        .header("x-sim-stream", "5")
        .header("x-sim-interval-ms", interval.as_millis().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        first.get_or_insert_with(|| start.elapsed());
    }
    let all = start.elapsed();
    assert_eq!(text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    // The replica spends 4 intervals between its first chunk and its last: relayed as it
    // arrives, the first is read that much before the end.
    let first = first.unwrap();
    assert!(
        all - first >= interval * 3,
        "first chunk at {first:?}, end at {all:?}: the answer was buffered"
    );
}

#[tokio::test]
async fn sync_routes_keep_method_query_and_status() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    for (method, target) in [
        ("GET", "/production/sync/echo/v1/models?limit=2&x=%20y"),
        ("DELETE", "/deployment/dep-b/sync/echo/items/7?status=404"),
        ("PUT", "/environments/staging/sync/echo/a?status=201"),
    ] {
        let r = client()
            .request(
                method.parse().unwrap(),
                gw.url(&format!("/model/abcd1234{target}")),
            )
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        let (path, query) = target
            .split_once("/sync")
            .unwrap()
            .1
            .split_once('?')
            .unwrap();
        let want = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("status="))
            .map_or(200, |s| s.parse().unwrap());
        assert_eq!(r.status().as_u16(), want, "{method} {target}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["method"], method);
        assert_eq!(body["path"], path);
        assert_eq!(body["query"], query);
    }
}

#[tokio::test]
async fn what_is_not_found_or_not_allowed_is_named_in_the_predict_dialect() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    let cases = [
        ("/model/zzzz9999/production/predict", 404, "zzzz9999"),
        (
            "/model/abcd1234/environments/qa/predict",
            404,
            "no environment 'qa'",
        ),
        (
            "/model/abcd1234/deployment/dep-z/predict",
            404,
            "no deployment 'dep-z'",
        ),
        (
            "/model/abcd1234/production/nothing",
            404,
            "Unknown request URL",
        ),
    ];
    for (path, status, says) in cases {
        let r = client()
            .post(gw.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let e = error_of(r).await;
        assert!(e.contains(says), "{path}: {e}");
    }
    let r = client()
        .get(gw.url("/model/abcd1234/production/predict"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    error_of(r).await;

    for auth in [None, Some("Api-Key tg-nobody")] {
        let mut req = client().post(gw.url("/model/abcd1234/production/predict"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        error_of(r).await;
    }
}

#[tokio::test]
async fn a_key_scoped_to_one_environment_reaches_only_it() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    let call = |path: &str| {
        client()
            .post(gw.url(&format!("/model/abcd1234{path}")))
            .header("authorization", format!("Api-Key {STAGING_KEY}"))
            .body("{}")
            .send()
    };
    assert_eq!(
        call("/environments/staging/predict")
            .await
            .unwrap()
            .status(),
        200
    );
    for path in [
        "/production/predict",
        "/development/predict",
        "/deployment/dep-b/predict",
    ] {
        let r = call(path).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert!(error_of(r).await.contains("team-s"));
    }
}

#[tokio::test]
async fn a_predict_past_its_timeout_is_504_pointing_at_async_predict() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(
        prod.addr(),
        dev.addr(),
        "timeouts = { predict_ms = 1000 }",
    ));
    let r = predict(&gw, "/production/predict")
        .header("x-sim-delay-ms", "5000")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let e = error_of(r).await;
    assert!(
        e.contains("use async_predict for work longer than 1 s"),
        "{e}"
    );
}

#[tokio::test]
async fn an_upload_past_the_cap_is_413_without_touching_a_replica_and_memory_stays_flat() {
    let (prod, dev) = two_replicas().await;
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), ""));
    // Declared too large: refused from the header.
    let r = predict(&gw, "/production/predict")
        .header("content-length", (101u64 << 20).to_string())
        .body(vec![0u8; 16])
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
        error_of(r).await;
    }
    // 200 MB of chunked body: streamed, cut at the 100 MiB cap.
    let before = gw.rss_bytes();
    let piece = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let chunks =
        futures_util::stream::iter((0..200).map(move |_| Ok::<_, std::io::Error>(piece.clone())));
    let r = predict(&gw, "/production/predict")
        .header("x-sim-count", "1")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    // tollgate answers 413 and closes; the client may see the answer or the close.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
        assert!(error_of(r).await.contains("larger than the limit"));
    }
    let grown = gw.rss_bytes().saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "tollgate grew by {} MiB streaming 100 MiB",
        grown >> 20
    );
    // Under the cap, a large upload passes whole.
    let piece = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let chunks =
        futures_util::stream::iter((0..20).map(move |_| Ok::<_, std::io::Error>(piece.clone())));
    let r = predict(&gw, "/production/predict")
        .header("x-sim-count", "1")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["bytes"], 20 << 20);
}

#[tokio::test]
async fn the_model_api_still_answers_beside_deployed_models() {
    let (prod, dev) = two_replicas().await;
    let config = standard_config(&[prod.addr()], "")
        .replace("[[keys]]", "[[keys]]\ndeployed_models = [\"abcd1234\"]");
    let models = deployed_config(prod.addr(), dev.addr(), "");
    let deployed = &models
        [models.find("[[pools]]\nname = \"dev\"").unwrap()..models.find("[[keys]]").unwrap()];
    let deployed = deployed.replace("pool = \"prod\"", "pool = \"main\"");
    let gw = Gateway::start(&format!("{deployed}\n{config}"));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 200);
    let r = predict(&gw, "/production/predict")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
