//! Identity: which configured key a request presents, and fresh keys for `tollgate key new`.
//!
//! Only SHA-256 digests are stored; a presented secret is hashed and looked up, never logged.

use std::sync::Arc;

use http::HeaderMap;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::{Key, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` or `x-api-key` header with a usable key.
    Missing,
    /// A key was presented but matches no configured key.
    Unknown,
}

/// The keys a request presents, in the order they are tried: `Authorization: Bearer K` or
/// `Authorization: Api-Key K`, then `x-api-key: K` (what the Anthropic SDK sends). Both are
/// tried, so an `Authorization` header meant for something else (an ingress's Basic auth or
/// its own token) does not hide the key in `x-api-key`.
pub fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            let known =
                scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("api-key");
            known.then(|| rest.trim())
        });
    // Looked up only when the first did not match: most requests stop at the first.
    let x_api_key = std::iter::once_with(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
    .flatten();
    authorization
        .into_iter()
        .chain(x_api_key)
        .filter(|k| !k.is_empty())
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Finds the configured key a request presents.
pub fn identify(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<Key>, AuthError> {
    let mut outcome = Err(AuthError::Missing);
    for secret in presented_keys(headers) {
        match snapshot.key_by_digest(&digest(secret)) {
            Some(key) => return Ok(key.clone()),
            None => outcome = Err(AuthError::Unknown),
        }
    }
    outcome
}

/// A fresh random secret: `tg-` and 32 random bytes in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("tg-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn presented_key(h: &HeaderMap) -> Option<&str> {
        presented_keys(h).next()
    }

    #[test]
    fn the_three_header_forms_are_accepted() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer abc ")])),
            Some("abc")
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Api-Key abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "abc")])),
            Some("abc")
        );
    }

    #[test]
    fn malformed_headers_present_no_key() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", " ")])), None);
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }

    #[test]
    fn an_authorization_header_for_something_else_does_not_hide_x_api_key() {
        for authorization in ["Basic Zm9vOmJhcg==", "", "Bearer "] {
            let h = headers(&[("authorization", authorization), ("x-api-key", "abc")]);
            assert_eq!(presented_keys(&h).collect::<Vec<_>>(), vec!["abc"]);
        }
        let h = headers(&[
            ("authorization", "Bearer ingress-token"),
            ("x-api-key", "abc"),
        ]);
        assert_eq!(
            presented_keys(&h).collect::<Vec<_>>(),
            vec!["ingress-token", "abc"]
        );
    }

    #[test]
    fn secrets_are_fresh_and_hash_to_their_digest() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
        assert_eq!(
            hex::encode(digest("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
