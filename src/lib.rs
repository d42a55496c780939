//! tollgate: an edge proxy for GPU inference replicas that speak the OpenAI API.
//!
//! ```text
//! accept ─▶ identify ─▶ read body ─▶ understand ─▶ route ─▶ admit ─▶ forward ─▶ account ─▶ observe, log
//!           (key)       (cap→413)    (parse,       (model)  (limits, (replica,  (usage,     (metrics,
//!                                     translate)             budget)  relay)    ledger)     alerts)
//! ```
//!
//! Three layers, each importing only the ones below it (`tests/layers.rs` checks this):
//!
//! - vocabulary: [`vocab`] (endpoint, dialect, usage, prices, ids, the error as a client
//!   reads it) and [`config`] (the frozen snapshot);
//! - stages, in pipeline order: [`auth`], [`body`], [`translate`], [`catalog`], [`limits`],
//!   [`route`], [`media`], [`forward`], [`account`], [`metrics`], [`alerts`]. A stage takes values and
//!   returns values; none knows the request context or writes a response of its own;
//! - orchestration: [`proxy`] (the table of contents: one line per stage), [`ctx`],
//!   [`error`], [`respond`], [`access_log`], [`conn`] (client connections), [`reclaim`] (freed
//!   memory back to the OS after a burst), [`runtime`],
//!   [`reload`], [`admin`], [`server`], [`demo`], [`logs`].
//!
//! [`sim`] is the simulated GPU replica, on its own. ARCHITECTURE.md at the repository root
//! describes the design and the measurements behind it.

pub mod access_log;
pub mod account;
pub mod admin;
pub mod alerts;
pub mod async_queue;
pub mod auth;
pub mod body;
pub mod catalog;
pub mod config;
pub mod conn;
pub mod ctx;
pub mod demo;
pub mod dispatch;
pub mod error;
pub mod forward;
pub mod limits;
pub mod logs;
pub mod media;
pub mod metrics;
pub mod predict;
pub mod proxy;
pub mod reclaim;
pub mod reload;
pub mod respond;
pub mod route;
pub mod runtime;
pub mod server;
pub mod sim;
pub mod translate;
pub mod vocab;
pub mod wake;
pub mod webhook;
