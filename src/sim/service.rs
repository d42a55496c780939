//! The replica's HTTP surface: routing, API key check, the chat completion handler and the
//! small endpoints (`/health`, `/v1/models`, `/metrics`).

use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::blocks::block_hashes;
use super::control::{self, Doom, Switches};
use super::generate::Generation;
use super::gpu::Gpu;
use super::request::{ChatRequest, RequestError};
use super::scenario::Scenario;
use super::stats::{RecordedRequest, SimStats};
use super::wire::{self, Envelope};
use super::{stream, SimOptions, DEFAULT_MODEL};

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type SimBody = BoxBody<Bytes, BodyError>;

/// Returned instead of a response (or yielded by a body) to make hyper drop the connection
/// without finishing the message: the client sees a reset, as when a replica crashes.
#[derive(Debug)]
pub(crate) struct Reset;

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("simulated connection reset")
    }
}

impl std::error::Error for Reset {}

/// State every connection of one replica shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub opts: SimOptions,
    pub stats: Arc<SimStats>,
    pub switches: Switches,
    pub gpu: Gpu,
    started: u64,
}

impl Shared {
    pub(crate) fn new(opts: SimOptions, stats: Arc<SimStats>) -> Shared {
        Shared {
            gpu: Gpu::new(&opts),
            opts,
            stats,
            switches: Switches::default(),
            started: wire::unix_now(),
        }
    }

    fn model_names(&self) -> Vec<&str> {
        if self.opts.models.is_empty() {
            vec![DEFAULT_MODEL]
        } else {
            self.opts.models.iter().map(String::as_str).collect()
        }
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    doom: Arc<Doom>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, Reset> {
    let path = req.uri().path();
    if path.starts_with("/v1/") && shared.switches.resetting() {
        shared.stats.connection_reset();
        doom.set();
        return Err(Reset);
    }
    if path.starts_with("/sim/") {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
        let (status, answer) =
            control::answer(&shared.switches, &parts.method, parts.uri.path(), &body);
        return Ok(json_response(status, &answer));
    }
    let predict = path == "/v1/models/model:predict";
    if path.starts_with("/v1/") && !predict && !authorized(&shared.opts, &req) {
        return Ok(error_response(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided. Send `Authorization: Bearer <key>`.",
            "AuthenticationError",
            None,
        ));
    }
    match (req.method(), path) {
        (&Method::GET, "/health") if shared.switches.healthy() => {
            Ok(Response::new(full(Bytes::new())))
        }
        (&Method::GET, "/health") => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok(resp)
        }
        (&Method::GET, "/v1/models") => Ok(json_response(StatusCode::OK, &models(&shared))),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(full(Bytes::from(metrics(&shared))));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(resp)
        }
        (&Method::POST, "/v1/chat/completions") => chat(shared, req).await,
        (&Method::POST, "/v1/models/model:predict") => {
            shared.stats.prediction_received();
            let (status, delay_ms) = shared.switches.predict_fault();
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            match status.and_then(|s| StatusCode::from_u16(s).ok()) {
                Some(status) => Ok(error_response(
                    status,
                    "simulated predict failure",
                    "SimError",
                    None,
                )),
                None => super::predict::predict(req).await,
            }
        }
        (_, p) if p.starts_with("/echo/") => super::predict::echo(req).await,
        _ => Ok(error_response(
            StatusCode::NOT_FOUND,
            "Not Found",
            "NotFoundError",
            None,
        )),
    }
}

fn authorized(opts: &SimOptions, req: &Request<Incoming>) -> bool {
    let Some(key) = &opts.api_key else {
        return true;
    };
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(key.as_str())
}

async fn chat(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<SimBody>, Reset> {
    let stats = &shared.stats;
    stats.request_received();
    let (parts, body) = req.into_parts();
    // A client that breaks off while sending its body gets nothing back.
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body @ Value::Object(_)) => body,
        Ok(_) => return Ok(bad_request("the request body must be a JSON object")),
        Err(err) => return Ok(bad_request(&format!("invalid JSON: {err}"))),
    };
    stats.record(RecordedRequest {
        headers: parts.headers,
        body: body.clone(),
    });
    let scenario = match Scenario::from_body(&body, &shared.opts) {
        Ok(s) => s,
        Err(message) => return Ok(bad_request(&message)),
    };
    if let Some(stall) = scenario.stall {
        tokio::time::sleep(stall).await;
    }
    if let Some(status) = scenario.fail_status {
        let body = wire::error("simulated failure", "sim_error", None, status.as_u16());
        return Ok(json_response(status, &body));
    }
    let request = match ChatRequest::parse(&body, &scenario, &shared.opts) {
        Ok(r) => r,
        Err(RequestError::Invalid(message)) => return Ok(bad_request(&message)),
        Err(RequestError::UnknownModel(model)) => {
            let message = format!("The model `{model}` does not exist.");
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                &message,
                "NotFoundError",
                Some("model"),
            ));
        }
    };
    if scenario.reset_after.is_some() && !request.stream {
        return Err(Reset);
    }
    let blocks = match shared.gpu.block_tokens() {
        Some(block) => {
            let messages = body.get("messages").and_then(Value::as_array);
            block_hashes(
                messages.map_or(&[], Vec::as_slice),
                body.get("tools"),
                block,
            )
        }
        None => Vec::new(),
    };
    let admission = shared
        .gpu
        .admit(stats, &blocks, request.prompt_tokens)
        .await;
    let mut scenario = scenario;
    scenario.ttft = scenario.ttft.saturating_add(admission.prefill);
    let usage = wire::PromptUsage {
        prompt: request.prompt_tokens,
        cached: admission.cached_tokens,
    };
    let slot = admission.slot;
    let generation = Generation::new(&request, scenario.tokens);
    let env = Envelope::new(&request.model);
    if request.stream {
        return Ok(stream::respond(stream::StreamJob {
            env,
            generation,
            prompt: usage,
            include_usage: request.include_usage && !scenario.no_usage,
            scenario,
            stats: stats.clone(),
            slot,
        }));
    }
    // One sleep for the whole generation: the first token after `ttft`, then one per delay.
    let tokens = generation.completion_tokens();
    let later = u32::try_from(tokens.saturating_sub(1)).unwrap_or(u32::MAX);
    let generation_time = scenario.ttft + scenario.token_delay.saturating_mul(later);
    // A zero sleep still waits for a timer tick (about a millisecond): skip it.
    if !generation_time.is_zero() {
        tokio::time::sleep(generation_time).await;
    }
    let mut body = wire::completion(&env, &generation, usage);
    if scenario.no_usage {
        if let Some(answer) = body.as_object_mut() {
            answer.remove("usage");
        }
    }
    stats.add_usage(request.prompt_tokens, tokens);
    stats.response_completed();
    drop(slot);
    Ok(json_response(StatusCode::OK, &body))
}

fn models(shared: &Shared) -> Value {
    let data: Vec<Value> = shared
        .model_names()
        .into_iter()
        .map(|id| {
            json!({"id": id, "object": "model", "created": shared.started,
                "owned_by": "tollgate-sim"})
        })
        .collect();
    json!({"object": "list", "data": data})
}

/// The vLLM gauges and counters a router reads, labelled like vLLM's, and the load integral
/// a routing bench reads.
fn metrics(shared: &Shared) -> String {
    let stats = &shared.stats;
    let model = shared.model_names()[0]
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let (_, capacity_blocks) = shared.gpu.cache_blocks();
    let capacity = capacity_blocks as f64 * shared.gpu.block_tokens().unwrap_or(0) as f64;
    let kv_usage = if capacity > 0.0 {
        (stats.kv_tokens() as f64 / capacity).min(1.0)
    } else {
        0.0
    };
    let families = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            stats.running() as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            stats.waiting() as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_usage,
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            stats.prompt_tokens() as f64,
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            stats.completion_tokens() as f64,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_queries() as f64,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.cached_tokens() as f64,
        ),
        (
            "sim:request_queue_seconds_total",
            "counter",
            "Time requests waited for a batch slot, summed.",
            stats.queue_seconds(),
        ),
        (
            "sim:request_load_seconds_total",
            "counter",
            "Requests in the replica, waiting or running, integrated over time: its rate is the mean load.",
            stats.load_seconds(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in families {
        // Writing to a String cannot fail. `{:?}` keeps a decimal point on whole numbers.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"}} {value:?}\n"
        );
    }
    out
}

pub(crate) fn full(bytes: Bytes) -> SimBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, body: &Value) -> Response<SimBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
) -> Response<SimBody> {
    json_response(status, &wire::error(message, kind, param, status.as_u16()))
}

fn bad_request(message: &str) -> Response<SimBody> {
    error_response(StatusCode::BAD_REQUEST, message, "BadRequestError", None)
}
