//! Server-sent event framing: bytes from the network to whole events, and events to bytes.
//!
//! Only framing lives here; what an event means is the business of the stream translators.
//! Parsing follows the WHATWG event-stream rules: `\n`, `\r\n` and `\r` all end a line, a
//! blank line ends an event, `:` lines are comments, one space after the colon is dropped,
//! several `data:` lines join with `\n`, `id:` and `retry:` are ignored, and an event that
//! never had a `data:` line is not dispatched. Bytes may arrive split anywhere, including
//! inside a UTF-8 character or between `\r` and `\n`; lines are decoded only when whole, and
//! invalid UTF-8 becomes U+FFFD.

use std::fmt;

use serde::Serialize;

/// The largest event the framer holds: its field lines plus any unfinished line.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `None` when absent or empty (the default "message" type).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// One dispatched event, borrowed from the framer until it is called again. An event of
/// one `data:` line, as every engine sends, is read where it lies in the framer's buffer:
/// no copy and no allocation per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The `event:` field; `None` when absent or empty (the default "message" type).
    pub event: Option<&'a str>,
    /// The `data:` lines joined with `\n`.
    pub data: &'a str,
    /// The data came in one line, so it holds no line break.
    pub one_line: bool,
}

impl From<EventRef<'_>> for SseEvent {
    fn from(e: EventRef<'_>) -> Self {
        SseEvent {
            event: e.event.map(str::to_string),
            data: e.data.to_string(),
        }
    }
}

/// Why the framer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// One event grew past the limit before its blank line came. The framer then refuses
    /// everything (and holds nothing), so the caller ends the stream.
    TooLarge { limit: usize },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::TooLarge { limit } => {
                write!(f, "a server-sent event exceeded {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {}

/// Incremental parser: `push` what arrives, then take events with `next_event` (or
/// `next_event_ref`) until it returns `Ok(None)`; at the end of the stream, `finish` (or
/// `finish_ref`) yields a last event that had no blank line after it.
///
/// Memory: the framer holds the bytes pushed but not yet parsed plus the current event. An
/// event (its consumed lines and its unfinished last line) over the limit makes `next_event`
/// and `finish` return `Err(SseError::TooLarge)` from then on; the buffer is released.
#[derive(Debug)]
pub struct SseFramer {
    buf: Vec<u8>,
    /// Parsed up to here.
    pos: usize,
    /// `buf[pos..scanned]` holds no line end: the search for the next one starts here.
    scanned: usize,
    /// The last line ended with `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    /// The current event's `event:` field, when `has_event`. Reused from event to event.
    event: String,
    has_event: bool,
    /// The current event's data while it is one line: where that line's value lies in
    /// `buf`, which `push` keeps until the event is dispatched.
    span: Option<(usize, usize)>,
    /// The current event's data once a second line joins the first (or a line needed
    /// U+FFFD). Reused from event to event.
    data: String,
    has_data: bool,
    /// Bytes of the current event's fields kept so far (comments and ignored fields are not
    /// kept, so they do not count).
    event_bytes: usize,
    limit: usize,
    /// No line has been read yet: a byte order mark may lead.
    at_start: bool,
    finished: bool,
    failed: bool,
}

/// Where a dispatched event's fields are, for `SseFramer::dispatched`.
#[derive(Clone, Copy)]
struct Dispatched {
    event: bool,
    /// One line of data, in `buf`; `None`: in `data`.
    span: Option<(usize, usize)>,
}

impl Default for SseFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl SseFramer {
    pub fn new() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }

    /// A framer refusing events larger than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        SseFramer {
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            after_cr: false,
            event: String::new(),
            has_event: false,
            span: None,
            data: String::new(),
            has_data: false,
            event_bytes: 0,
            limit,
            at_start: true,
            finished: false,
            failed: false,
        }
    }

    /// Adds bytes as they came off the wire. Ignored after `finish` or a failure.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.finished || self.failed {
            return;
        }
        // What is parsed goes, except the data line of an event not dispatched yet.
        let keep = self.span.map_or(self.pos, |(start, _)| start.min(self.pos));
        if keep > 0 {
            self.buf.drain(..keep);
            self.pos -= keep;
            self.scanned = self.scanned.saturating_sub(keep);
            self.span = self.span.map(|(start, end)| (start - keep, end - keep));
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held: unparsed input plus the current event's fields.
    pub fn buffered(&self) -> usize {
        let data = match self.span {
            Some((start, end)) => end - start,
            None if self.has_data => self.data.len(),
            None => 0,
        };
        let event = if self.has_event { self.event.len() } else { 0 };
        self.buf.len() - self.pos + data + event
    }

    /// The next complete event, if one has fully arrived.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        Ok(self.next_event_ref()?.map(SseEvent::from))
    }

    /// Marks the end of input: a last event without its blank line is dispatched. Call it
    /// once `next_event` has returned `Ok(None)`; later calls return `Ok(None)`.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        Ok(self.finish_ref()?.map(SseEvent::from))
    }

    /// `next_event`, the event borrowed.
    pub fn next_event_ref(&mut self) -> Result<Option<EventRef<'_>>, SseError> {
        if self.failed {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        let dispatched = loop {
            if self.after_cr && self.pos < self.buf.len() {
                self.after_cr = false;
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
            }
            let start = self.pos;
            // Resume the search where the last one stopped: a long line arriving in small
            // pieces is scanned once, not once per piece.
            let from = self.scanned.max(start);
            // The blank line that ends an event comes right after its data line: found
            // without setting up a search.
            let found = match self.buf.get(from) {
                Some(b'\n' | b'\r') => Some(0),
                _ => memchr::memchr2(b'\n', b'\r', &self.buf[from..]),
            };
            let Some(offset) = found else {
                self.scanned = self.buf.len();
                if self.event_bytes + (self.buf.len() - start) > self.limit {
                    return Err(self.fail());
                }
                return Ok(None);
            };
            let end = from + offset;
            self.after_cr = self.buf[end] == b'\r';
            self.pos = end + 1;
            self.scanned = self.pos;
            if self.event_bytes + (end - start) > self.limit {
                return Err(self.fail());
            }
            if let Some(dispatched) = self.line(start, end) {
                break dispatched;
            }
        };
        Ok(Some(self.dispatched(dispatched)))
    }

    /// `finish`, the event borrowed.
    pub fn finish_ref(&mut self) -> Result<Option<EventRef<'_>>, SseError> {
        if !self.finished && !self.failed {
            // Two line ends close any unfinished line and then the event. After a `\r`
            // the first `\n` would only complete that line end, so use `\r` itself.
            self.buf.extend_from_slice(b"\r\r");
            self.finished = true;
        }
        self.next_event_ref()
    }

    /// Handles one line `buf[start..end]`; returns the event when the line is blank.
    fn line(&mut self, mut start: usize, end: usize) -> Option<Dispatched> {
        if self.at_start {
            self.at_start = false;
            if self.buf[start..end].starts_with("\u{feff}".as_bytes()) {
                start += "\u{feff}".len();
            }
        }
        if start == end {
            return self.dispatch();
        }
        let line = &self.buf[start..end];
        let (name_end, value_start) = match line.iter().position(|&b| b == b':') {
            Some(0) => return None,
            Some(colon) => {
                let value = start + colon + 1;
                let space = usize::from(self.buf.get(value) == Some(&b' ') && value < end);
                (start + colon, value + space)
            }
            None => (end, end),
        };
        match &self.buf[start..name_end] {
            b"data" => {
                self.event_bytes += end - value_start + 1;
                if !self.has_data {
                    self.has_data = true;
                    self.span = Some((value_start, end));
                    return None;
                }
                if let Some((first, first_end)) = self.span.take() {
                    self.data.clear();
                    push_lossy(&mut self.data, &self.buf[first..first_end]);
                }
                self.data.push('\n');
                push_lossy(&mut self.data, &self.buf[value_start..end]);
            }
            b"event" => {
                self.event_bytes += end - value_start;
                self.event.clear();
                push_lossy(&mut self.event, &self.buf[value_start..end]);
                self.has_event = true;
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<Dispatched> {
        self.event_bytes = 0;
        let event = std::mem::take(&mut self.has_event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(Dispatched {
            event,
            span: self.span.take(),
        })
    }

    /// The event `dispatch` left: its data read in place when it was one line of valid
    /// UTF-8, as it nearly always is.
    fn dispatched(&mut self, d: Dispatched) -> EventRef<'_> {
        let data = match d.span {
            Some((start, end)) => match std::str::from_utf8(&self.buf[start..end]) {
                Ok(text) => text,
                Err(_) => {
                    self.data.clear();
                    self.data
                        .push_str(&String::from_utf8_lossy(&self.buf[start..end]));
                    &self.data
                }
            },
            None => &self.data,
        };
        EventRef {
            event: (d.event && !self.event.is_empty()).then_some(self.event.as_str()),
            data,
            one_line: d.span.is_some(),
        }
    }

    fn fail(&mut self) -> SseError {
        self.failed = true;
        self.buf = Vec::new();
        self.pos = 0;
        self.scanned = 0;
        self.span = None;
        self.data = String::new();
        self.event = String::new();
        self.has_event = false;
        SseError::TooLarge { limit: self.limit }
    }
}

/// Appends `bytes` decoded as UTF-8, each invalid sequence replaced by U+FFFD. Valid text, as
/// every engine sends, takes the fast validation; `from_utf8_lossy` walks it chunk by chunk,
/// several times slower, and is left for the rare line that needs a replacement.
fn push_lossy(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => out.push_str(text),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

/// Appends one event: `event: NAME` (when given), `data: …` and the blank line. Data is
/// expected on one line (compact JSON); a line break in it still yields a correct event, as
/// one `data:` line per line.
pub fn write_event(out: &mut Vec<u8>, event: Option<&str>, data: &str) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    // Both are ASCII, so a byte search is exact in UTF-8 (and far cheaper than a char one).
    if memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_some() {
        for line in data.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    } else {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(data.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Appends `event` as an unnamed event: `write_event` without its search for line breaks
/// when the data came in one line.
pub fn write_data_event(out: &mut Vec<u8>, event: &EventRef<'_>) {
    if !event.one_line {
        return write_event(out, None, event.data);
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(event.data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Appends one named event whose data is `value` as compact JSON, serialised in place.
/// Compact JSON never holds a raw line break, so the event is always one `data:` line.
pub fn write_json_event<T: Serialize + ?Sized>(out: &mut Vec<u8>, event: &str, value: &T) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let before = out.len();
    if serde_json::to_writer(&mut *out, value).is_err() {
        // Only a failing `Serialize` impl gets here; ours are plain structs. Keep the
        // framing intact rather than emit half an object.
        out.truncate(before);
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    /// Every event from `input` pushed in pieces of `step` bytes, then `finish`.
    fn frame(input: &[u8], step: usize) -> Vec<SseEvent> {
        let mut framer = SseFramer::new();
        let mut events = Vec::new();
        for piece in input.chunks(step.max(1)) {
            framer.push(piece);
            while let Some(e) = framer.next_event().unwrap() {
                events.push(e);
            }
        }
        while let Some(e) = framer.finish().unwrap() {
            events.push(e);
        }
        events
    }

    #[test]
    fn fields_comments_and_multiline_data() {
        let input = b": keep-alive\nevent: message_start\ndata: {\"a\":1}\n\nid: 7\nretry: 10\ndata:x\ndata:  y\ndata\n\nevent: lonely\n\n";
        let want = vec![ev(Some("message_start"), "{\"a\":1}"), ev(None, "x\n y\n")];
        for step in 1..input.len() + 1 {
            assert_eq!(frame(input, step), want, "step {step}");
        }
    }

    #[test]
    fn every_line_ending_and_splits_between_cr_and_lf() {
        for input in [
            &b"data: a\r\n\r\ndata: b\r\n\r\n"[..],
            b"data: a\r\rdata: b\r\r",
            b"data: a\n\ndata: b\n\n",
            b"data: a\r\n\ndata: b\n\r\n",
        ] {
            for step in 1..input.len() + 1 {
                assert_eq!(
                    frame(input, step),
                    vec![ev(None, "a"), ev(None, "b")],
                    "{input:?} step {step}"
                );
            }
        }
    }

    #[test]
    fn utf8_split_inside_a_character_and_invalid_bytes() {
        let input = "data: héllo 🦀\n\n".as_bytes();
        for step in 1..5 {
            assert_eq!(frame(input, step), vec![ev(None, "héllo 🦀")]);
        }
        assert_eq!(frame(b"data: a\xffb\n\n", 1), vec![ev(None, "a\u{fffd}b")]);
        assert_eq!(
            frame("\u{feff}data: x\n\n".as_bytes(), 1),
            vec![ev(None, "x")]
        );
    }

    #[test]
    fn finish_dispatches_an_unterminated_last_event_once() {
        for tail in ["data: end", "data: end\n", "data: end\r", "data: end\r\n"] {
            let mut framer = SseFramer::new();
            framer.push(tail.as_bytes());
            while framer.next_event().unwrap().is_some() {}
            assert_eq!(framer.finish().unwrap(), Some(ev(None, "end")), "{tail:?}");
            assert_eq!(framer.finish().unwrap(), None);
            framer.push(b"data: late\n\n");
            assert_eq!(framer.next_event().unwrap(), None);
        }
    }

    #[test]
    fn several_events_in_one_push_come_out_one_by_one() {
        let mut framer = SseFramer::new();
        framer.push(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4");
        assert_eq!(framer.next_event().unwrap(), Some(ev(None, "1")));
        assert_eq!(framer.next_event().unwrap(), Some(ev(None, "2")));
        assert_eq!(framer.next_event().unwrap(), Some(ev(None, "3")));
        assert_eq!(framer.next_event().unwrap(), None);
        assert_eq!(framer.buffered(), 7);
        assert_eq!(framer.finish().unwrap(), Some(ev(None, "4")));
        assert_eq!(framer.buffered(), 0);
    }

    #[test]
    fn borrowed_events_keep_their_line_across_pushes() {
        let mut framer = SseFramer::new();
        framer.push(b"event: a\ndata: {\"x\":1}\n");
        assert_eq!(framer.next_event_ref(), Ok(None));
        assert_eq!(framer.buffered(), 8);
        // The data line is parsed; the push that brings the blank line must not drop it.
        framer.push(b": comment\n\ndata: 2\ndata: 3\n\ndata: 4\n\n");
        let want = [
            (Some("a"), "{\"x\":1}", true),
            (None, "2\n3", false),
            (None, "4", true),
        ];
        for (event, data, one_line) in want {
            let got = framer.next_event_ref();
            assert_eq!(
                got,
                Ok(Some(EventRef {
                    event,
                    data,
                    one_line
                }))
            );
            // Written back, with or without the search for line breaks, as it came.
            let (mut fast, mut full) = (Vec::new(), Vec::new());
            write_data_event(&mut fast, &got.unwrap().unwrap());
            write_event(&mut full, None, data);
            assert_eq!(fast, full);
        }
        assert_eq!(framer.next_event_ref(), Ok(None));
        assert_eq!(framer.buffered(), 0);
        framer.push(b"data: \xff\n");
        assert_eq!(
            framer.finish_ref(),
            Ok(Some(EventRef {
                event: None,
                data: "\u{fffd}",
                one_line: true
            }))
        );
    }

    #[test]
    fn an_event_over_the_limit_is_refused_and_released() {
        // One long unfinished line.
        let mut framer = SseFramer::with_limit(64);
        framer.push(&[b'x'; 40]);
        assert_eq!(framer.next_event(), Ok(None));
        framer.push(&[b'x'; 40]);
        assert_eq!(framer.next_event(), Err(SseError::TooLarge { limit: 64 }));
        assert_eq!(framer.buffered(), 0);
        framer.push(b"data: ok\n\n");
        assert!(framer.next_event().is_err());
        assert!(framer.finish().is_err());

        // Many short data lines without a blank line.
        let mut framer = SseFramer::with_limit(64);
        for _ in 0..20 {
            framer.push(b"data: 0123456789\n");
        }
        assert!(framer.next_event().is_err());

        // Comments hold nothing, and events at the limit pass.
        let mut framer = SseFramer::with_limit(64);
        for _ in 0..20 {
            framer.push(b": 0123456789\n");
        }
        framer.push(b"data: 0123456789\n\n");
        assert_eq!(framer.next_event(), Ok(Some(ev(None, "0123456789"))));
        assert_eq!(MAX_EVENT_BYTES, 16 << 20);
    }

    #[test]
    fn a_long_line_in_small_pieces() {
        let line = "x".repeat(1 << 20);
        let input = format!("data: {line}\n\n");
        assert_eq!(frame(input.as_bytes(), 1024), vec![ev(None, &line)]);
    }

    #[test]
    fn written_events_frame_back() {
        let mut out = Vec::new();
        write_event(&mut out, Some("ping"), "{\"type\":\"ping\"}");
        write_event(&mut out, None, "a\nb\r\nc");
        write_json_event(&mut out, "x", &serde_json::json!({"t": "line\nbreak"}));
        assert!(out.starts_with(b"event: ping\ndata: {\"type\":\"ping\"}\n\n"));
        assert_eq!(
            frame(&out, 3),
            vec![
                ev(Some("ping"), "{\"type\":\"ping\"}"),
                ev(None, "a\nb\nc"),
                ev(Some("x"), "{\"t\":\"line\\nbreak\"}"),
            ]
        );
    }
}
