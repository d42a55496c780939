//! The vocabulary every layer shares: plain data types and the few pure functions that
//! belong to them. It imports nothing else of tollgate's, so any module may import it.
//!
//! See ARCHITECTURE.md for the layers: vocabulary (this module and `config`), stages,
//! orchestration.

mod endpoint;
mod header;
mod ids;
mod price;
mod problem;
mod usage;

pub use endpoint::{Dialect, Endpoint};
pub use header::{add_own_fields, client_header, OwnFields, ID_FIELDS};
pub use ids::{message_id, request_id};
pub use price::{micros, TokenPrices};
pub use problem::{echo, Problem, ECHO_MAX_BYTES};
pub use usage::Usage;
