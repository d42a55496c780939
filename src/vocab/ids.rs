//! Identifiers tollgate gives out: request ids and Anthropic message ids.

/// The request's id: the client's `x-request-id` when it is short and made of safe
/// characters, else `req_` and 32 random hex digits.
pub fn request_id(client: Option<&str>) -> String {
    match client {
        Some(id) if is_safe(id) => id.to_string(),
        _ => generated(),
    }
}

/// An Anthropic message id: `msg_` and 24 random base-62 characters.
pub fn message_id() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    format!(
        "msg_{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
    )
}

/// `req_` and 32 random hex digits.
fn generated() -> String {
    let mut hex = [0u8; 32];
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex);
    let mut id = String::with_capacity(4 + hex.len());
    id.push_str("req_");
    id.extend(hex.iter().map(|&b| char::from(b)));
    id
}

/// A client-chosen request id is kept when it is short and made of safe characters.
fn is_safe(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_client_ids_are_kept_and_others_replaced() {
        assert!(is_safe("abc-123_x.y:z"));
        assert!(!is_safe(""));
        assert!(!is_safe("a b"));
        assert!(!is_safe(&"a".repeat(129)));
        assert_eq!(request_id(Some("abc-1")), "abc-1");
        let fresh = request_id(Some("a b"));
        assert!(fresh.starts_with("req_") && fresh.len() == 36, "{fresh}");
        assert!(message_id().starts_with("msg_"));
    }
}
