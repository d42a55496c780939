//! Budget alerts: when a key's spend crosses a threshold, a structured log event, a metric,
//! a note in the ledger (so a restart never fires it again) and, when configured, a webhook
//! signed as every tollgate webhook is (`webhook.rs`) delivered in the background with retries. Nothing here blocks a request.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::account::query::rfc3339;
use crate::account::Ledger;
use crate::config::{AlertSettings, Budget, Period};
use crate::limits::Crossed;
use crate::metrics::Metrics;
use crate::webhook;

/// Delivery attempts per alert; waits double from one second between them.
const ATTEMPTS: u32 = 5;

pub struct Alerter {
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
    client: reqwest::Client,
}

impl Alerter {
    pub fn new(metrics: Arc<Metrics>, ledger: Option<Arc<Ledger>>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Alerter {
            metrics,
            ledger,
            client,
        }
    }

    pub fn fire(
        &self,
        settings: &AlertSettings,
        key_id: &str,
        budget: &Budget,
        crossed: Vec<Crossed>,
    ) {
        for c in crossed {
            let spent = c.spent_nanos as f64 / 1e9;
            let limit = c.budget_nanos as f64 / 1e9;
            tracing::warn!(
                target: "tollgate::alert",
                key_id,
                threshold = c.threshold,
                spent_usd = spent,
                budget_usd = limit,
                period = period_name(budget.period),
                period_start = %rfc3339(c.period_start),
                enforced = budget.enforce,
                "budget threshold crossed"
            );
            self.metrics.observe_budget_alert(key_id, c.threshold);
            if let Some(ledger) = &self.ledger {
                ledger.record_alert(key_id, c.period_start, c.threshold);
            }
            let Some(url) = settings.webhook_url.clone() else {
                continue;
            };
            let body = json!({
                "type": "budget_alert",
                "key_id": key_id,
                "threshold": c.threshold,
                "spent_usd": spent,
                "budget_usd": limit,
                "period": period_name(budget.period),
                "period_start": rfc3339(c.period_start),
                "enforced": budget.enforce,
                "sent_at": rfc3339(crate::limits::now_ms()),
            })
            .to_string();
            let signature = webhook::signature(&settings.webhook_secrets, &body);
            let client = self.client.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move { deliver(client, url, body, signature, &metrics).await });
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    url: String,
    body: String,
    signature: Option<String>,
    metrics: &Metrics,
) {
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        let mut req = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(sig) = &signature {
            req = req.header(webhook::SIGNATURE_FIELD, sig);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(
                attempt,
                status = r.status().as_u16(),
                "budget webhook refused"
            ),
            Err(e) => {
                tracing::warn!(attempt, error = %e.without_url(), "budget webhook unreachable")
            }
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    metrics.observe_webhook_failure();
    tracing::error!("budget webhook not delivered after {ATTEMPTS} attempts");
}

pub fn period_name(p: Period) -> &'static str {
    match p {
        Period::Daily => "daily",
        Period::Weekly => "weekly",
        Period::Monthly => "monthly",
        Period::Total => "total",
    }
}
