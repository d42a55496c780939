//! Validation of limits, budgets and alert settings: the admission rules of keys and models.

use toml::Spanned;

use super::snapshot::*;
use super::validate::Source;
use super::ConfigError;

pub(super) fn limits(
    src: &Source,
    rpm: &Option<Spanned<u64>>,
    tpm: &Option<Spanned<u64>>,
    max_concurrent: &Option<Spanned<u64>>,
    path: &str,
) -> Result<Limits, ConfigError> {
    let one = |v: &Option<Spanned<u64>>, name: &str| match v {
        Some(s) if *s.get_ref() == 0 => src.err(
            s.span(),
            format!("{path}.{name}"),
            "must be at least 1; remove the line for no limit".into(),
        ),
        other => Ok(other.as_ref().map(|s| *s.get_ref())),
    };
    Ok(Limits {
        rpm: one(rpm, "rpm")?,
        tpm: one(tpm, "tpm")?,
        max_concurrent: one(max_concurrent, "max_concurrent")?,
    })
}

pub(super) fn budget(
    src: &Source,
    b: &Spanned<super::raw::RawBudget>,
    path: &str,
) -> Result<Budget, ConfigError> {
    let r = b.get_ref();
    let usd = *r.usd.get_ref();
    if !usd.is_finite() || usd <= 0.0 {
        return src.err(
            r.usd.span(),
            format!("{path}.usd"),
            "must be a positive number of USD".into(),
        );
    }
    let period = match r.period.get_ref().as_str() {
        "daily" => Period::Daily,
        "weekly" => Period::Weekly,
        "monthly" => Period::Monthly,
        "total" => Period::Total,
        other => {
            return src.err(
                r.period.span(),
                format!("{path}.period"),
                format!("{other:?} is not one of: daily, weekly, monthly, total"),
            )
        }
    };
    let mut alert_at = match &r.alert_at {
        None => vec![0.75, 0.9, 1.0],
        Some(list) => {
            if list
                .get_ref()
                .iter()
                .any(|f| !f.is_finite() || *f <= 0.0 || *f > 10.0)
            {
                return src.err(
                    list.span(),
                    format!("{path}.alert_at"),
                    "fractions of the budget must be > 0 and at most 10 (e.g. [0.75, 0.9, 1.0])"
                        .into(),
                );
            }
            list.get_ref().clone()
        }
    };
    alert_at.sort_by(|a, b| a.total_cmp(b));
    alert_at.dedup();
    if alert_at.len() > 16 {
        return src.err(
            b.span(),
            format!("{path}.alert_at"),
            "at most 16 thresholds".into(),
        );
    }
    let nanos = (usd * 1e9).round() as u64;
    if nanos == 0 {
        return src.err(
            r.usd.span(),
            format!("{path}.usd"),
            format!("{usd} USD is less than a nano-dollar, the unit spend is counted in"),
        );
    }
    Ok(Budget {
        nanos,
        period,
        enforce: r.enforce,
        alert_at,
        clamp_max_tokens: r.clamp_max_tokens,
    })
}

pub(super) fn alert_settings(
    src: &Source,
    a: &super::raw::RawAlerts,
) -> Result<AlertSettings, ConfigError> {
    let webhook_url = match &a.webhook_url {
        None => None,
        Some(u) => {
            let url = u.get_ref();
            let usable = url.parse::<http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty())
            });
            if !usable {
                return src.err(
                    u.span(),
                    "alerts.webhook_url".into(),
                    format!("{url:?} is not an http:// or https:// URL with a host"),
                );
            }
            Some(url.clone())
        }
    };
    let webhook_secrets = match &a.webhook_secret_env {
        None => Vec::new(),
        Some(var) => match std::env::var(var.get_ref()).map(|v| super::secrets_of(&v)) {
            Ok(v) if !v.is_empty() => v,
            _ => {
                return src.err(
                    var.span(),
                    "alerts.webhook_secret_env".into(),
                    format!("environment variable {} is not set or empty", var.get_ref()),
                )
            }
        },
    };
    Ok(AlertSettings {
        webhook_url,
        webhook_secrets,
    })
}
