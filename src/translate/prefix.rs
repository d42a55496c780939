//! The prompt prefix that places a request under the `affinity` policy: the leading system
//! (or developer) messages and the first user message, as the replica will see them (after
//! Anthropic translation, so both surfaces of one conversation hash alike), at most
//! `PREFIX_BYTES` of them. Every later turn of a conversation starts with the same
//! messages, so it hashes to the same replica, where they are already in the KV cache.

use serde::Deserialize;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

/// How much of the prompt's start is hashed: enough to tell conversations apart, little
/// enough to cost a fraction of a microsecond.
pub const PREFIX_BYTES: usize = 4096;

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Role<'a> {
    #[serde(borrow)]
    role: Option<std::borrow::Cow<'a, str>>,
}

/// The hash of the request's leading messages, or `None` for a body without messages.
pub fn prefix_hash(upstream_body: &[u8]) -> Option<u64> {
    let body: Body = serde_json::from_slice(upstream_body).ok()?;
    let mut hasher = Xxh3::new();
    let mut left = PREFIX_BYTES;
    for message in &body.messages {
        let bytes = message.get().as_bytes();
        let take = bytes.len().min(left);
        hasher.update(&bytes[..take]);
        left -= take;
        let role = serde_json::from_str::<Role>(message.get())
            .ok()
            .and_then(|r| r.role);
        if left == 0 || role.as_deref() == Some("user") {
            break;
        }
    }
    (left < PREFIX_BYTES).then(|| hasher.digest())
}

/// The hash of a session id from `x-session-affinity`.
pub fn session_hash(id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hash(v: serde_json::Value) -> Option<u64> {
        prefix_hash(v.to_string().as_bytes())
    }

    #[test]
    fn later_turns_of_a_conversation_hash_like_the_first() {
        let sys = json!({"role": "system", "content": "You are terse."});
        let u1 = json!({"role": "user", "content": "Name a colour."});
        let a1 = json!({"role": "assistant", "content": "Red."});
        let u2 = json!({"role": "user", "content": "Another."});
        let first = hash(json!({"model": "m", "messages": [sys, u1]}));
        let second = hash(json!({"messages": [sys, u1, a1, u2], "model": "m", "stream": true}));
        assert!(first.is_some());
        assert_eq!(first, second);
        let other = hash(json!({"messages": [sys, {"role": "user", "content": "Name a fruit."}]}));
        assert_ne!(first, other, "another conversation");
        // Without a system prompt, the first user message alone.
        assert_eq!(
            hash(json!({"messages": [u1]})),
            hash(json!({"messages": [u1, a1, u2]}))
        );
    }

    #[test]
    fn only_the_first_bytes_count_and_odd_bodies_have_none() {
        let long = "x".repeat(PREFIX_BYTES * 2);
        let a = hash(json!({"messages": [{"role": "system", "content": format!("{long}a")}]}));
        let b = hash(json!({"messages": [{"role": "system", "content": format!("{long}b")}]}));
        assert_eq!(a, b);
        assert_eq!(hash(json!({"messages": []})), None);
        assert_eq!(prefix_hash(b"not json"), None);
    }
}
