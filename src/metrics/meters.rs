//! Metric handles resolved per config snapshot, so that recording skips the label lookup.

use std::collections::HashMap;
use std::sync::OnceLock;

use prometheus::{Counter, Gauge, Histogram, IntCounter};

use super::{Metrics, ENDPOINTS};
use crate::config::Snapshot;

/// Metric handles of one config snapshot, resolved when it is built (or at first use) so that
/// a request records without a label lookup: each lookup hashes the labels and read-locks the
/// metric family's map, which every worker shares.
pub struct Meters {
    pub(super) models: HashMap<String, ModelMeters>,
    pub(super) keys: HashMap<String, KeyMeters>,
    /// By replica address as rendered (`Replica::authority`).
    pub(super) replicas: HashMap<String, ReplicaMeters>,
}

impl Meters {
    pub fn build(metrics: &Metrics, snapshot: &Snapshot) -> Meters {
        let models = snapshot
            .models
            .iter()
            .enumerate()
            .map(|(index, m)| {
                (
                    m.slug.to_string(),
                    ModelMeters::new(metrics, index, &m.slug),
                )
            })
            .collect::<HashMap<_, _>>();
        // Deployed models are labelled by their name; their index is past every Model API
        // model's, so they have no token counters.
        let mut models = models;
        for (j, d) in snapshot.deployed_models.iter().enumerate() {
            models
                .entry(d.name.to_string())
                .or_insert_with(|| ModelMeters::new(metrics, snapshot.models.len() + j, &d.name));
        }
        let keys = snapshot
            .keys()
            .map(|k| {
                let meters = KeyMeters {
                    id: k.id.to_string(),
                    tokens: (0..snapshot.models.len())
                        .map(|_| Default::default())
                        .collect(),
                    spend: OnceLock::new(),
                    budget_spent: OnceLock::new(),
                    budget_remaining: OnceLock::new(),
                };
                (k.id.to_string(), meters)
            })
            .collect();
        let replicas = snapshot
            .pools
            .iter()
            .flat_map(|p| &p.replicas)
            .map(|addr| {
                let label = addr.to_string();
                (label.clone(), ReplicaMeters::new(label))
            })
            .collect();
        Meters {
            models,
            keys,
            replicas,
        }
    }

    pub fn model(&self, slug: &str) -> Option<&ModelMeters> {
        self.models.get(slug)
    }

    pub fn key(&self, id: &str) -> Option<&KeyMeters> {
        self.keys.get(id)
    }

    pub fn replica(&self, authority: &str) -> Option<&ReplicaMeters> {
        self.replicas.get(authority)
    }
}

/// One model's handles. The per-model latency histograms exist from the start (a dashboard
/// sees the model before its first request); the rest appear with their first observation.
pub struct ModelMeters {
    /// The model's position in the snapshot, indexing `KeyMeters::tokens`.
    pub(super) index: usize,
    pub(super) slug: String,
    pub ttfb: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub(super) requests: [[OnceLock<IntCounter>; 5]; ENDPOINTS],
    pub(super) duration: [OnceLock<Histogram>; ENDPOINTS],
}

impl ModelMeters {
    fn new(metrics: &Metrics, index: usize, name: &str) -> ModelMeters {
        let model = [name];
        ModelMeters {
            index,
            slug: name.to_string(),
            ttfb: metrics.ttfb.with_label_values(&model),
            ttft: metrics.ttft.with_label_values(&model),
            itl: metrics.itl.with_label_values(&model),
            requests: Default::default(),
            duration: Default::default(),
        }
    }
}

/// One key's handles; tokens by model index, then kind.
pub struct KeyMeters {
    pub(super) id: String,
    pub(super) tokens: Box<[[OnceLock<IntCounter>; 4]]>,
    pub(super) spend: OnceLock<Counter>,
    pub(super) budget_spent: OnceLock<Gauge>,
    pub(super) budget_remaining: OnceLock<Gauge>,
}

/// One replica's attempt counters.
pub struct ReplicaMeters {
    pub(super) label: String,
    pub(super) ok: OnceLock<IntCounter>,
    pub(super) failed: OnceLock<IntCounter>,
}

impl ReplicaMeters {
    pub(super) fn new(label: String) -> Self {
        ReplicaMeters {
            label,
            ok: OnceLock::new(),
            failed: OnceLock::new(),
        }
    }
}
