//! End-to-end tests: the real `tollgate` binary on loopback in front of simulated replicas.
//! One test binary, one module per area.

mod common;
mod fakes;

mod accounting;
mod affinity;
mod anthropic;
mod auth;
mod body;
mod catalog;
mod cli;
mod cut_config;
mod echo;
mod fleet;
mod limits;
mod metadata_limit;
mod metrics;
mod queue;
mod reload;
mod routing;
mod shutdown;
mod sim;
mod status;
mod streaming;
mod usage_report;
