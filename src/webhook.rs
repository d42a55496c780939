//! Signed webhooks: the one signature scheme of every webhook tollgate sends (async predict
//! results and budget alerts), the rule for where a webhook may go, and delivery with
//! retries. Delivery runs on the caller's task; callers spawn it, so nothing waits on it.
//!
//! The signature is `x-tollgate-signature: v1=<hex HMAC-SHA256 of the body>`, one `v1=`
//! value per configured secret, comma-separated: while a secret is rotated, the variable
//! holds the new and the old one, and a receiver accepts the body if any value verifies.

use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::{Host, Url};

use crate::config::Secret;
use crate::media;

pub const SIGNATURE_FIELD: &str = "x-tollgate-signature";

/// `v1=<hex>` for each secret, comma-separated; `None` without a secret (unsigned).
pub fn signature(secrets: &[Secret], body: &str) -> Option<String> {
    if secrets.is_empty() {
        return None;
    }
    let values: Vec<String> = secrets.iter().map(|s| sign(s.expose(), body)).collect();
    Some(values.join(","))
}

/// `v1=` and the hex HMAC-SHA256 of the body under one secret.
pub fn sign(secret: &str, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Where a webhook may be sent. HTTPS to a public host; loopback always (any scheme);
/// `http://` and private addresses only when `allow_private`. Names are checked again when
/// resolved, at delivery ([`resolves_allowed`]).
pub fn check_url(url: &str, allow_private: bool) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("it is not an absolute URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("its scheme must be https".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("it carries credentials before an @".into());
    }
    let loopback = match parsed.host() {
        Some(Host::Ipv4(a)) => a.is_loopback(),
        Some(Host::Ipv6(a)) => a.is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => return Err("it names no host".into()),
    };
    if loopback || allow_private {
        return Ok(parsed);
    }
    if parsed.scheme() != "https" {
        return Err("it must use https (http is taken only for loopback addresses, or with async.webhook_allow_private)".into());
    }
    let literal = match parsed.host() {
        Some(Host::Ipv4(a)) => Some(IpAddr::V4(a)),
        Some(Host::Ipv6(a)) => Some(IpAddr::V6(a)),
        _ => None,
    };
    if let Some(kind) = literal.and_then(media::non_public) {
        return Err(format!(
            "it names {kind} (allowed with async.webhook_allow_private)"
        ));
    }
    Ok(parsed)
}

/// At delivery: a name must not resolve to a non-public address unless allowed.
pub async fn resolves_allowed(url: &Url, allow_private: bool) -> Result<(), String> {
    let Some(Host::Domain(name)) = url.host() else {
        return Ok(());
    };
    if allow_private || name.eq_ignore_ascii_case("localhost") {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((name, port)),
    )
    .await
    .map_err(|_| "its host did not resolve in time".to_string())?
    .map_err(|_| "its host does not resolve".to_string())?;
    for a in addrs {
        if let Some(kind) = media::non_public(a.ip()) {
            return Err(format!("its host resolves to {kind}"));
        }
    }
    Ok(())
}

/// How one webhook is delivered: attempts, waits between them, and a timeout each.
pub struct Policy {
    pub waits: &'static [Duration],
    pub timeout: Duration,
}

/// Async results: 3 attempts, 1 s then 4 s apart, 10 s each.
pub const RESULT_POLICY: Policy = Policy {
    waits: &[Duration::from_secs(1), Duration::from_secs(4)],
    timeout: Duration::from_secs(10),
};

/// Posts `body` until a 2xx answer, retrying on 5xx, timeouts and connection errors. Other
/// answers (4xx) end it at once: the receiver refused the body itself. Returns whether it
/// was delivered and the attempts made.
pub async fn deliver(
    client: &reqwest::Client,
    url: &Url,
    body: &str,
    fields: &[(&str, String)],
    policy: &Policy,
) -> (bool, u32) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = client
            .post(url.clone())
            .timeout(policy.timeout)
            .header("content-type", "application/json")
            .body(body.to_string());
        for (name, value) in fields {
            req = req.header(*name, value);
        }
        let retry = match req.send().await {
            Ok(r) if r.status().is_success() => return (true, attempt),
            Ok(r) => {
                tracing::warn!(attempt, status = r.status().as_u16(), "webhook refused");
                r.status().is_server_error()
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e.without_url(), "webhook unreachable");
                true
            }
        };
        match policy.waits.get(attempt as usize - 1) {
            Some(wait) if retry => tokio::time::sleep(*wait).await,
            _ => return (false, attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac_once_per_secret() {
        // RFC 4231 test case 2.
        let hex = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(
            sign("Jefe", "what do ya want for nothing?"),
            format!("v1={hex}")
        );
        let both = signature(
            &[Secret::new("Jefe".into()), Secret::new("other".into())],
            "what do ya want for nothing?",
        )
        .unwrap();
        assert!(both.starts_with(&format!("v1={hex},v1=")), "{both}");
        assert_eq!(signature(&[], "x"), None);
    }

    #[test]
    fn https_is_required_except_for_loopback_or_private_when_allowed() {
        assert!(check_url("https://hooks.example.com/x", false).is_ok());
        assert!(check_url("http://127.0.0.1:9/x", false).is_ok());
        assert!(check_url("http://localhost:9/x", false).is_ok());
        assert!(check_url("http://[::1]:9/x", false).is_ok());
        let e = check_url("http://hooks.example.com/x", false).unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = check_url("https://10.0.0.5/x", false).unwrap_err();
        assert!(e.contains("private"), "{e}");
        assert!(check_url("http://10.0.0.5/x", true).is_ok());
        assert!(check_url("ftp://example.com/", true).is_err());
        assert!(check_url("https://u:p@example.com/", false).is_err());
    }
}
