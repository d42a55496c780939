//! The admin listener (loopback by default): `/metrics` in Prometheus text format, `/healthz`,
//! and `GET /admin/usage`.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use arc_swap::ArcSwap;

use crate::account::page::PAGE_ROWS;
use crate::account::query::{self, Bucket, UsageQuery, UsageRow};
use crate::account::Ledger;
use crate::metrics::Metrics;
use crate::reclaim::release_freed_memory;
use crate::reload::Reloader;
use crate::runtime::Runtime;
use crate::vocab::echo;
use crate::{alerts, limits};

pub struct Admin {
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
    runtime: Arc<ArcSwap<Runtime>>,
    reloader: Option<Arc<Reloader>>,
}

impl Admin {
    pub fn new(
        metrics: Arc<Metrics>,
        ledger: Option<Arc<Ledger>>,
        runtime: Arc<ArcSwap<Runtime>>,
        reloader: Option<Arc<Reloader>>,
    ) -> Self {
        Admin {
            metrics,
            ledger,
            runtime,
            reloader,
        }
    }

    /// A key's live use against each of its limits and its budget.
    fn key(&self, id: &str) -> (u16, Vec<u8>) {
        let runtime = self.runtime.load();
        let (Some(key), Some(counters)) = (runtime.config.key_by_id(id), runtime.limits.key(id))
        else {
            return error(404, &format!("no key with id {id:?}"));
        };
        let now = limits::now_ms();
        let (requests, tokens) = counters.window((now / 1000) as u64);
        let budget = key.budget.as_ref().map(|b| {
            let spend = counters.spend(Some(b), now, runtime.limits.generation);
            let usd = |n: u64| n as f64 / 1e9;
            json!({
                "usd": usd(b.nanos),
                "period": alerts::period_name(b.period),
                "period_start": query::rfc3339(spend.period_start),
                "period_end": limits::period::end(b.period, now).map(query::rfc3339),
                "spent_usd": usd(spend.spent),
                "reserved_usd": usd(spend.reserved),
                "remaining_usd": usd(b.nanos.saturating_sub(spend.spent + spend.reserved)),
                "enforce": b.enforce,
                "clamp_max_tokens": b.clamp_max_tokens,
                "alert_at": b.alert_at,
                "alerted": b.alert_at.iter().enumerate()
                    .filter(|(i, _)| spend.alerted & (1 << i) != 0)
                    .map(|(_, t)| *t)
                    .collect::<Vec<_>>(),
            })
        });
        let body = json!({
            "id": &*key.id,
            "limits": {
                "rpm": key.limits.rpm,
                "tpm": key.limits.tpm,
                "max_concurrent": key.limits.max_concurrent,
            },
            "usage": {
                "requests_last_minute": requests,
                "tokens_last_minute": tokens,
                "in_flight": counters.inflight(),
            },
            "budget": budget,
        });
        (200, body.to_string().into_bytes())
    }

    /// Ready to take traffic: the first round of health checks is over, and some model has
    /// a replica that takes requests (healthy, not ejected). The answer says so per model.
    /// An instance whose config serves nothing is alive but not ready. While shutting down,
    /// the listener stops answering altogether.
    fn ready(&self) -> (u16, Vec<u8>) {
        let runtime = self.runtime.load();
        let snapshot = &runtime.config;
        let checked = runtime.router.pools().iter().all(|p| p.checked());
        let eligible: Vec<usize> = runtime
            .router
            .pools()
            .iter()
            .map(|p| p.eligible())
            .collect();
        let mut models = serde_json::Map::new();
        let mut served = 0;
        for m in &snapshot.models {
            let pool = &snapshot.pools[m.pool];
            let healthy = eligible[m.pool];
            served += usize::from(healthy > 0);
            models.insert(
                m.slug.to_string(),
                json!({
                    "ready": healthy > 0,
                    "pool": pool.name,
                    "replicas": pool.replicas.len(),
                    "healthy_replicas": healthy,
                }),
            );
        }
        let (status, state, message) = if !checked {
            (
                503,
                "starting",
                "the first health checks of the replicas are still running",
            )
        } else if served == 0
            && snapshot
                .models
                .iter()
                .all(|m| snapshot.pools[m.pool].replicas.is_empty())
        {
            (503, "not_ready", "no model has a replica to serve it: add replicas to a pool in the config and reload")
        } else if served == 0 {
            (503, "not_ready", "no model has a healthy replica: check the replicas (their health path, or tollgate_replica_up)")
        } else {
            (200, "ready", "")
        };
        let mut body = json!({ "status": state, "models_served": served, "models": models });
        if status != 200 {
            body["error"] = json!(message);
        }
        (status, body.to_string().into_bytes())
    }

    async fn usage(&self, query: &str) -> (u16, Vec<u8>) {
        let Some(ledger) = self.ledger.clone() else {
            return error(404, "the usage ledger is off (state.ledger = false)");
        };
        let q = match usage_query(query, now_ms()) {
            Ok(q) => q,
            Err(e) => return error(400, &e),
        };
        // Make records of requests that just ended visible, then read; both block. The page
        // is read and written out on one thread, which frees its rows and then hands the
        // memory back (`release_freed_memory`).
        let answered = tokio::task::spawn_blocking(move || {
            ledger.flush();
            let page = match query::run(ledger.path(), &q) {
                Ok(page) => page,
                Err(e) => return error(400, &e),
            };
            let answer = UsageAnswer {
                from: query::rfc3339(q.from_ms),
                to: query::rfc3339(q.to_ms),
                bucket: q.bucket.name(),
                data: &page.rows,
                next_cursor: page.next_cursor.as_deref(),
            };
            // Written straight from the rows: no JSON tree of the page is built first.
            let answered = match serde_json::to_vec(&answer) {
                Ok(body) => (200, body),
                Err(_) => error(500, "the usage answer could not be written"),
            };
            drop(page);
            release_freed_memory();
            answered
        })
        .await;
        answered.unwrap_or_else(|_| error(500, "the usage query failed"))
    }
}

/// `GET /admin/usage`'s answer: one page of the report, and the cursor of the next.
#[derive(serde::Serialize)]
pub struct UsageAnswer<'a> {
    pub from: String,
    pub to: String,
    pub bucket: &'static str,
    pub data: &'a [UsageRow],
    /// Pass it back as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<&'a str>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.as_str().to_string(), req.uri.path().to_string());
        let query = req.uri.query().unwrap_or("").to_string();
        // The one method the URL answers, if it is an admin URL: for a 405's `Allow`.
        let allowed = method_of(&path);
        let (status, content_type, body) = match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                self.metrics.observe_fleet(&self.runtime.load().router);
                (200, "text/plain; version=0.0.4", self.metrics.render())
            }
            ("GET", "/healthz") => (200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            ("GET", "/readyz") => {
                let (status, body) = self.ready();
                (status, "application/json", body)
            }
            ("GET", "/admin/usage") => {
                let (status, body) = self.usage(&query).await;
                (status, "application/json", body)
            }
            ("POST", "/admin/reload") => {
                let (status, body) = match &self.reloader {
                    None => error(404, "this server was not started from a config file"),
                    Some(r) => match r.reload() {
                        Ok(note) => (
                            200,
                            json!({ "status": "ok", "message": note })
                                .to_string()
                                .into_bytes(),
                        ),
                        Err(e) => error(400, &e),
                    },
                };
                (status, "application/json", body)
            }
            ("GET", p) if p.starts_with("/admin/keys/") => {
                let (status, body) = self.key(&p["/admin/keys/".len()..]);
                (status, "application/json", body)
            }
            (_, p) => match allowed {
                Some(allowed) => {
                    let (status, body) = error(405, &format!("{p} only accepts {allowed}"));
                    (status, "application/json", body)
                }
                None => {
                    let (status, body) = error(
                        404,
                        "unknown admin URL; try GET /metrics, /healthz, /readyz, /admin/usage or /admin/keys/{id}, or POST /admin/reload",
                    );
                    (status, "application/json", body)
                }
            },
        };
        let mut response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len());
        if let Some(allowed) = allowed.filter(|_| status == 405) {
            response = response.header(http::header::ALLOW, allowed);
        }
        response
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// The one method an admin URL answers, if it is one.
fn method_of(path: &str) -> Option<&'static str> {
    match path {
        "/metrics" | "/healthz" | "/readyz" | "/admin/usage" => Some("GET"),
        "/admin/reload" => Some("POST"),
        p if p.starts_with("/admin/keys/") => Some("GET"),
        _ => None,
    }
}

fn error(status: u16, message: &str) -> (u16, Vec<u8>) {
    (status, json!({ "error": message }).to_string().into_bytes())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `from`, `to` (RFC 3339, date or Unix seconds; default the last 24 hours), `bucket`
/// (minute, hour, day; default hour), `by` (comma list of key, model), `limit` (rows per
/// page, at most and by default `PAGE_ROWS`), `cursor` (the page to answer).
pub fn usage_query(query: &str, now_ms: i64) -> Result<UsageQuery, String> {
    let mut q = UsageQuery {
        from_ms: now_ms - 86_400_000,
        to_ms: now_ms,
        bucket: Bucket::Hour,
        by_key: false,
        by_model: false,
        limit: PAGE_ROWS,
        cursor: None,
    };
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "from" => q.from_ms = query::parse_time(&value)?,
            "to" => q.to_ms = query::parse_time(&value)?,
            "bucket" => {
                q.bucket = Bucket::parse(&value)
                    .ok_or_else(|| format!("bucket {value:?} is not one of: minute, hour, day"))?
            }
            "by" => {
                for part in value.split(',').filter(|p| !p.is_empty()) {
                    match part {
                        "key" => q.by_key = true,
                        "model" => q.by_model = true,
                        other => return Err(format!("by {other:?} is not one of: key, model")),
                    }
                }
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=PAGE_ROWS).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "limit {:?} is not a number of rows from 1 to {PAGE_ROWS}",
                            echo(&value)
                        )
                    })?
            }
            "cursor" => q.cursor = Some(value.into_owned()),
            other => {
                return Err(format!(
                    "unknown parameter {:?}; use from, to, bucket, by, limit, cursor",
                    echo(other)
                ))
            }
        }
    }
    Ok(q)
}
