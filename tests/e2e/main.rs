//! End-to-end tests: the real `tollgate` binary on loopback in front of simulated replicas.
//! One test binary, one module per area.

mod common;
mod fakes;
mod raw;
mod redis;
#[path = "../support/tiny_tokenizer.rs"]
mod tiny_tokenizer;

mod accounting;
mod affinity;
mod anthropic;
mod async_predict;
mod auth;
mod body;
mod catalog;
mod cli;
mod cluster;
mod cluster_quota;
mod cut_config;
mod echo;
mod fleet;
mod headers;
mod http1;
mod limits;
mod media;
mod metadata_limit;
mod metrics;
mod predict;
mod predict_fleet;
mod queue;
mod reload;
mod request_shape;
mod reservation;
mod routing;
mod shutdown;
mod sim;
mod slow_clients;
mod status;
mod streaming;
mod usage_report;
