//! Everything derived from one config snapshot, swapped as a unit.

use crate::config::Snapshot;
use crate::limits::Registry;
use crate::metrics::{Meters, Metrics};
use crate::route::Router;

pub struct Runtime {
    pub config: Snapshot,
    pub router: Router,
    /// Limit and budget counters by key and model id; carried over from `previous`.
    pub limits: Registry,
    /// Metric handles by model, key and key × model.
    pub meters: Meters,
}

impl Runtime {
    pub fn new(config: Snapshot, previous: Option<&Runtime>, metrics: &Metrics) -> Self {
        let router = Router::build(&config, previous.map(|p| &p.router));
        let limits = Registry::build(&config, previous.map(|p| &p.limits));
        let meters = Meters::build(metrics, &config);
        Runtime {
            meters,
            config,
            router,
            limits,
        }
    }
}
