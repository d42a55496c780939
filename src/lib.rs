//! tollgate: an edge proxy for GPU inference replicas that speak the OpenAI API.
//!
//! ```text
//! accept ─▶ identify ─▶ read body ─▶ understand ─▶ route ─▶ forward ─▶ log
//!           (key)       (cap→413)    (parse)      (model,  (replica,   (metrics,
//!                                                  pool)    relay)      access log)
//! ```
//!
//! `proxy.rs` is the table of contents: one Pingora hook per stage. `ctx.rs` says which stage
//! writes each piece of per-request state. Config is parsed, validated and frozen in `config`,
//! and a request keeps one snapshot of it from start to end.

pub mod access_log;
pub mod account;
pub mod admin;
pub mod alerts;
pub mod auth;
pub mod body;
pub mod catalog;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod error;
pub mod forward;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod route;
pub mod runtime;
pub mod server;
pub mod sim;
pub mod translate;
