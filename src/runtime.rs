//! Everything derived from one config snapshot, swapped as a unit.

use crate::config::Snapshot;
use crate::route::Router;

pub struct Runtime {
    pub config: Snapshot,
    pub router: Router,
}

impl Runtime {
    pub fn new(config: Snapshot) -> Self {
        let router = Router::build(&config);
        Runtime { config, router }
    }
}
