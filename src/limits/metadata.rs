//! The metadata endpoints' own limit. `POST /v1/messages/count_tokens` and `GET /v1/models`
//! use no replica, but each costs tollgate some work and answers at once, so a valid key
//! could call them in a tight loop. Each key may make `server.metadata_rpm` of them per
//! sliding minute, counted in a window of its own: listing models or counting tokens never
//! uses up the `rpm` its chat requests need, and chat requests never use up this one.

use super::{rate_headers, LimitError, LimitKind, RateView, Refusal, Registry, Scope};
use crate::config::Key;
use crate::vocab::OwnFields;

/// Counts one metadata request of `key` against `rpm`, or refuses it (429) saying when one
/// fits again. Either way, the rate-limit headers describe this window: on the metadata
/// endpoints the `requests` headers are about their limit.
pub fn admit_metadata(
    registry: &Registry,
    key: &Key,
    rpm: u64,
    now_ms: i64,
) -> Result<OwnFields, Refusal> {
    let Some(counters) = registry.key(&key.id) else {
        return Ok(Vec::new());
    };
    let now = (now_ms / 1000).max(0) as u64;
    let mut state = counters.lock();
    let window = &mut state.metadata;
    // `None` only when one request is more than the limit, which validation rules out.
    let wait = window.wait_for(now, 1, rpm).unwrap_or(60);
    if wait == 0 {
        window.add(now, 1);
    }
    let view = RateView {
        requests: Some((
            rpm,
            rpm.saturating_sub(window.sum(now)),
            window.until_empty(now),
        )),
        tokens: None,
    };
    drop(state);
    let headers = rate_headers(&view, now_ms);
    match wait {
        0 => Ok(headers),
        retry_after => Err(Refusal {
            err: LimitError::Limited {
                kind: LimitKind::Metadata,
                scope: Scope::Key,
                limit: rpm,
                retry_after,
            },
            headers,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn a_key_gets_its_own_metadata_window_apart_from_its_rpm() {
        let s = config::parse(
            "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n[[keys]]\nid = \"k\"\n\
             sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\
             models = [\"*\"]\nrpm = 1\n",
        )
        .unwrap();
        let registry = Registry::build(&s, None);
        let key = s.key_by_id("k").unwrap();
        let now: i64 = 1_795_000_000_000;
        for left in ["2", "1", "0"] {
            let Ok(h) = admit_metadata(&registry, key, 3, now) else {
                panic!("admitted while {left} remain");
            };
            assert!(h
                .iter()
                .any(|(name, value)| name == "x-ratelimit-remaining-requests" && value == left));
        }
        let Err(refused) = admit_metadata(&registry, key, 3, now + 10_000) else {
            panic!("a fourth request in the minute is refused");
        };
        assert_eq!(
            refused.err,
            LimitError::Limited {
                kind: LimitKind::Metadata,
                scope: Scope::Key,
                limit: 3,
                retry_after: 50,
            }
        );
        assert!(refused
            .headers
            .iter()
            .any(|(name, value)| name == "x-ratelimit-limit-requests" && value == "3"));
        // The chat window is untouched: its rpm of 1 still has its one request.
        assert_eq!(registry.key("k").unwrap().window(now as u64 / 1000), (0, 0));
        // A minute later the window has room again.
        assert!(admit_metadata(&registry, key, 3, now + 60_000).is_ok());
    }
}
