//! End-to-end tests: the real `tollgate` binary on loopback in front of simulated replicas.
//! One test binary, one module per area.

mod common;
mod fakes;
#[path = "../support/tiny_tokenizer.rs"]
mod tiny_tokenizer;

mod accounting;
mod anthropic;
mod auth;
mod body;
mod catalog;
mod cli;
mod cut_config;
mod echo;
mod limits;
mod metadata_limit;
mod metrics;
mod reload;
mod reservation;
mod routing;
mod shutdown;
mod status;
mod streaming;
mod usage_report;
