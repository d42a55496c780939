//! SSE framing under arbitrary bytes in arbitrary pieces: no panic, the same events however
//! the input is split, bounded memory, and every event survives a write/parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::translate::sse::{write_event, SseError, SseEvent, SseFramer};

const LIMIT: usize = 256;

/// Events from `pieces`, or the error that stopped the framer.
fn frame<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<SseEvent>, Option<SseError>) {
    let mut framer = SseFramer::with_limit(LIMIT);
    let mut events = Vec::new();
    for piece in pieces {
        framer.push(piece);
        loop {
            match framer.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        // Drained: what is held is one unfinished event, within the limit (its fields)
        // plus one unfinished line (also within it).
        assert!(
            framer.buffered() <= 2 * LIMIT,
            "holds {}",
            framer.buffered()
        );
    }
    loop {
        match framer.finish() {
            Ok(Some(e)) => events.push(e),
            Ok(None) => return (events, None),
            Err(e) => return (events, Some(e)),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    // The first bytes choose where to cut the rest.
    let (sizes, body) = input.split_at(input.len().min(8));
    let whole = frame([body]);
    let mut pieces = Vec::new();
    let mut rest = body;
    for &size in sizes
        .iter()
        .cycle()
        .take(if sizes.is_empty() { 0 } else { 4096 })
    {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((size as usize % 17).min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    let split = frame(pieces.iter().copied());
    assert_eq!(whole.1, split.1);
    if whole.1.is_none() {
        assert_eq!(whole.0, split.0);
    }
    for event in &whole.0 {
        assert!(!event.data.contains('\r'));
        if let Some(name) = &event.event {
            assert!(!name.is_empty() && !name.contains(['\n', '\r']));
        }
        let mut bytes = Vec::new();
        write_event(&mut bytes, event.event.as_deref(), &event.data);
        let mut framer = SseFramer::new();
        framer.push(&bytes);
        assert_eq!(framer.next_event(), Ok(Some(event.clone())));
        assert_eq!(framer.finish(), Ok(None));
    }
});
