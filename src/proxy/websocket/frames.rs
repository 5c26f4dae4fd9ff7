//! Frame boundaries of a relayed WebSocket byte stream (RFC 6455 §5.2), tracked as the bytes
//! pass, each frame header checked, and the Close frames the proxy writes itself (§5.5.1).
//!
//! The tracker reads each frame header (2 to 14 bytes) and counts the payload down; it never
//! buffers, changes or reads the payload (no unmasking, no UTF-8 check, no decompression).
//! A header that is not whole at the end of a read is held back (its few bytes copied aside)
//! and relayed only once it is whole and valid, in front of what follows it: a malformed
//! header never reaches the other side, even in part, and the stream relayed always ends at
//! a frame boundary when one is refused.
//!
//! Each header is checked for everything a header alone (with the headers before it in its
//! direction) can tell:
//! - masking (§5.1): a browser's frames are masked, the API's are not;
//! - opcodes 0x3–0x7 and 0xB–0xF are reserved (§5.2);
//! - control frames (opcode ≥ 0x8) have FIN set and at most 125 bytes of payload (§5.5;
//!   a control frame's 7-bit length can therefore be neither 126 nor 127);
//! - fragmentation (§5.4): a continuation (opcode 0) only inside a fragmented message, a
//!   new text or binary frame only outside one; control frames may come between fragments;
//! - RSV1/2/3 (§5.2) are 0 unless an extension the API's `101` negotiated
//!   (`Sec-WebSocket-Extensions`) defines them: with permessage-deflate (RFC 7692 §6) RSV1
//!   may be set on a message's first frame (text or binary) only, never on a continuation
//!   or a control frame, and RSV2/RSV3 stay 0; with any extension the proxy does not know,
//!   every RSV bit is let through (that extension may define them);
//! - a 64-bit length has its top bit clear (§5.2);
//! - a length is in its minimal encoding (§5.2: "the minimal number of bytes MUST be used"):
//!   a 16-bit length is at least 126, a 64-bit one at least 65536 (refused as soon as the
//!   length bytes that tell arrive: the second byte of a 16-bit one, the sixth of a 64-bit).
//!
//! Nothing after a side's Close: once a whole Close frame is scanned, the scan ends there
//! ([`State::Closed`]) and nothing that side sends after it is relayed or checked, ever
//! (§5.5.1: after sending a Close an endpoint sends no more data; after receiving one it
//! discards what follows, §1.4). The other direction is unaffected: the reply Close still
//! goes back. A header begun after the Close in the same read is not held back either.
//!
//! Not checked: anything in payloads (UTF-8 of text, Close codes, compressed data): the
//! endpoints check those, as they do without a proxy.
//!
//! `frames_model.rs` pins all of this with a differential property test against a model
//! written from the RFCs.

/// Longest frame header: 2 bytes, a 64-bit length (8), a masking key (4).
const MAX_HEADER: usize = 14;

/// Most header bytes ever held back (a header one byte short of whole): the room a caller
/// leaves in front of the bytes it scans, where [`Frames::scan`] puts them when they go on.
pub(crate) const HELD_ROOM: usize = MAX_HEADER - 1;

/// Where a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// At a frame boundary: every byte scanned is relayed and ends a frame (`used` may be
    /// short of the input when the scan was asked to stop at the first boundary).
    Boundary,
    /// More bytes are due: inside a frame's payload (all relayed), or inside a header that is
    /// held back (what is relayed ends at a frame boundary).
    InFrame,
    /// A malformed header starts at `used` (or is the one held back from earlier scans, then
    /// `used` is 0): nothing of it is relayed, so what is relayed ends at a frame boundary.
    Malformed,
    /// A whole Close frame ends at `used` (or ended in an earlier scan, then `used` is 0):
    /// what is relayed ends with it, and nothing after it in this direction is relayed.
    Closed,
}

/// The result of [`Frames::scan`]: relay the last `held` bytes of the room, then the first
/// `used` bytes of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Header bytes held back from earlier scans, now whole and valid: the scan put them at
    /// the end of the room, to be relayed before the input's.
    pub(crate) held: usize,
    /// Bytes of the input to relay: whole frames and frames' payload, and the headers that
    /// are whole and valid (not a header left incomplete at its end, nor a malformed one or
    /// anything after it, nor anything after a whole Close frame; up to the first boundary
    /// when asked to stop there).
    pub(crate) used: usize,
    pub(crate) state: State,
}

/// The extensions negotiated in a WebSocket's handshake, as far as the RSV bits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Extensions {
    /// None: every RSV bit must be 0.
    #[default]
    None,
    /// permessage-deflate alone (RFC 7692): RSV1 on a message's first frame only.
    Deflate,
    /// One the proxy does not know: RSV bits are not checked.
    Unknown,
}

impl Extensions {
    /// From the values of the API's `101`'s `Sec-WebSocket-Extensions` fields (RFC 6455
    /// §9.1: `name; param=value; param="quoted, value", name2`). A parameter's value may be
    /// a quoted-string (RFC 7230 §3.2.6, with `\` escapes): a comma or semicolon inside
    /// quotes is part of it. A value the proxy cannot read (a quote not closed, a name that
    /// is not text) counts as an extension it does not know: the `101` is passed on as the
    /// API sent it (the browser judges it), and the RSV bits are then not checked, rather
    /// than refused on a guess.
    pub(crate) fn negotiated<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Extensions {
        let mut found = Extensions::None;
        for value in values {
            let mut rest = Some(value);
            while let Some(list) = rest {
                let Some((extension, next)) = first_element(list) else {
                    return Extensions::Unknown;
                };
                rest = next;
                // The name: up to the first parameter (a name has no quotes; one that does
                // is no name the proxy knows).
                let name = extension
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if name.is_empty() {
                    continue;
                }
                if name.eq_ignore_ascii_case(b"permessage-deflate") {
                    found = Extensions::Deflate;
                } else {
                    return Extensions::Unknown;
                }
            }
        }
        found
    }
}

/// The first element of the comma-separated `list` and what follows its comma (None after
/// the last), a comma inside a quoted-string (RFC 7230 §3.2.6: `"…"`, `\` escaping the next
/// byte) being part of the element; None when a quoted-string is not closed.
fn first_element(list: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in list.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => return Some((&list[..i], list.get(i + 1..))),
            _ => {}
        }
    }
    (!quoted).then_some((list, None))
}

/// Frame header bits (RFC 6455 §5.2).
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV: u8 = 0x70;
const OPCODE: u8 = 0x0f;
const MASK: u8 = 0x80;
const LENGTH: u8 = 0x7f;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
/// Control frames have the opcode's top bit set.
const CONTROL: u8 = 0x8;

/// The framing state of one direction of a WebSocket.
#[derive(Debug)]
pub(crate) struct Frames {
    /// The current header's bytes so far (only the first `head_len` are meaningful).
    head: [u8; MAX_HEADER],
    /// Bytes of the current header seen (0: not inside a header).
    head_len: u8,
    /// This direction's frames are masked (a browser's): they must be (§5.1).
    masked: bool,
    /// What the handshake lets the RSV bits mean.
    extensions: Extensions,
    /// A fragmented message is in progress (its first frame had no FIN).
    in_message: bool,
    /// A Close frame's header was seen.
    close_seen: bool,
    /// A whole Close frame was scanned: nothing after it is relayed, nor tracked.
    closed: bool,
    /// A malformed header was seen: nothing after it is tracked.
    broken: bool,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
}

impl Frames {
    /// The tracker of the frames the browser sends (`from_client`: masked ones) or the API
    /// sends (unmasked ones), on a WebSocket that negotiated `extensions`.
    pub(crate) fn new(from_client: bool, extensions: Extensions) -> Frames {
        Frames {
            head: [0; MAX_HEADER],
            head_len: 0,
            masked: from_client,
            extensions,
            in_message: false,
            close_seen: false,
            closed: false,
            broken: false,
            remaining: 0,
        }
    }

    /// Whether the bytes relayed so far end exactly at a frame boundary: a header held back
    /// (or refused) was not relayed, so only a frame's payload still due counts.
    pub(crate) fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Whether a Close frame (its header) was among the bytes scanned.
    pub(crate) fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Scans the next bytes of the stream, `data`. With `stop`, stops at the first frame
    /// boundary (at once if what is relayed is at one). A header held back from earlier scans
    /// that is now whole and valid is put at the end of `room`, to be relayed before `data`
    /// (see [`Scanned`]).
    pub(crate) fn scan(&mut self, room: &mut [u8; HELD_ROOM], data: &[u8], stop: bool) -> Scanned {
        let mut held = 0usize;
        if self.broken || self.closed {
            let state = if self.broken {
                State::Malformed
            } else {
                State::Closed
            };
            return Scanned {
                held,
                used: 0,
                state,
            };
        }
        let mut at = 0usize;
        loop {
            if self.remaining > 0 {
                let left = data.len() - at;
                let take = usize::try_from(self.remaining).map_or(left, |r| r.min(left));
                at += take;
                // `take` ≤ `remaining`, which is a u64.
                self.remaining -= take as u64;
                if self.remaining > 0 {
                    return Scanned {
                        held,
                        used: at,
                        state: State::InFrame,
                    };
                }
            }
            // At a frame boundary. After a Close, the stream is over: what follows is not
            // relayed (nor held back, nor checked). One test per frame, not per byte.
            if self.close_seen {
                self.closed = true;
                return Scanned {
                    held,
                    used: at,
                    state: State::Closed,
                };
            }
            if stop || at == data.len() {
                let state = if stop || self.head_len == 0 {
                    State::Boundary
                } else {
                    State::InFrame
                };
                return Scanned {
                    held,
                    used: at,
                    state,
                };
            }
            // A header starts at `at`, or goes on there from earlier scans (`carried` bytes).
            let start = at;
            let carried = usize::from(self.head_len);
            if carried == 0 {
                // All of it here (the usual case): checked where it is, not copied.
                if let [b0, b1, ..] = data[at..] {
                    let len = header_len(b1);
                    if let Some(header) = data.get(at..at + len) {
                        if !(self.first_ok(b0) && self.second_ok(b0, b1) && length_ok(header)) {
                            return self.refuse(held, start);
                        }
                        self.accept(header);
                        at += len;
                        continue;
                    }
                }
            }
            // Byte by byte, each check made as soon as its byte is here.
            let mut len = carried;
            while at < data.len() && (len < 2 || len < header_len(self.head[1])) {
                self.head[len] = data[at];
                len += 1;
                at += 1;
                let ok = match len {
                    1 => self.first_ok(self.head[0]),
                    2 => self.second_ok(self.head[0], self.head[1]),
                    _ => length_ok(&self.head[..len]),
                };
                if !ok {
                    return self.refuse(held, start);
                }
            }
            if len < 2 || len < header_len(self.head[1]) {
                // The input ended inside it: held back (and nothing after it came).
                self.head_len = len as u8;
                return Scanned {
                    held,
                    used: start,
                    state: State::InFrame,
                };
            }
            if carried > 0 {
                // Whole and valid: its bytes from earlier scans go in front of the input's.
                // (`carried` < `len` ≤ MAX_HEADER, so it fits the room.)
                room[HELD_ROOM - carried..].copy_from_slice(&self.head[..carried]);
                held = carried;
            }
            let head = self.head;
            self.accept(&head[..len]);
            self.head_len = 0;
        }
    }

    /// A malformed header starts at `start` (or came before the input): nothing of it nor
    /// after it is relayed, or followed.
    fn refuse(&mut self, held: usize, start: usize) -> Scanned {
        self.broken = true;
        self.head_len = 0;
        Scanned {
            held,
            used: start,
            state: State::Malformed,
        }
    }

    /// Whether a header's first byte (FIN, RSV, opcode) is valid here.
    fn first_ok(&self, b0: u8) -> bool {
        let opcode = b0 & OPCODE;
        let opcode_ok = match opcode {
            CONTINUATION => self.in_message,
            TEXT | BINARY => !self.in_message,
            CLOSE | PING | PONG => b0 & FIN != 0,
            _ => false,
        };
        let rsv = b0 & RSV;
        let rsv_ok = rsv == 0
            || match self.extensions {
                Extensions::None => false,
                Extensions::Deflate => rsv == RSV1 && (opcode == TEXT || opcode == BINARY),
                Extensions::Unknown => true,
            };
        opcode_ok && rsv_ok
    }

    /// Whether a header's second byte (MASK, 7-bit length) is valid after its first.
    fn second_ok(&self, b0: u8, b1: u8) -> bool {
        (b1 & MASK != 0) == self.masked && (b0 & CONTROL == 0 || b1 & LENGTH <= 125)
    }

    /// Takes a whole, valid header: its payload is due next.
    fn accept(&mut self, header: &[u8]) {
        let (b0, b1) = match header {
            [b0, b1, ..] => (*b0, *b1),
            _ => return,
        };
        self.remaining = match b1 & LENGTH {
            126 => header
                .get(2..4)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map_or(0, |b| u64::from(u16::from_be_bytes(b))),
            127 => header
                .get(2..10)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes),
            short => u64::from(short),
        };
        match b0 & OPCODE {
            CONTINUATION | TEXT | BINARY => self.in_message = b0 & FIN == 0,
            CLOSE => self.close_seen = true,
            _ => {}
        }
    }
}

/// A header's whole length as its second byte tells (at least 2, at most [`MAX_HEADER`]).
fn header_len(b1: u8) -> usize {
    let mask = if b1 & MASK != 0 { 4 } else { 0 };
    let length = match b1 & LENGTH {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + length + mask
}

/// Whether a header's first bytes (at least 2, possibly not all of it) leave its length
/// valid, refusing as soon as the bytes here tell: a 64-bit length has its top bit clear
/// (known with its first byte), and a length is in its minimal encoding (§5.2): a 16-bit one
/// is at least 126 (under it iff its first byte is 0 and its second under 126), a 64-bit one
/// at least 65536 (under it iff its first six bytes are 0).
fn length_ok(header: &[u8]) -> bool {
    match header {
        [_, b1, length @ ..] => match b1 & LENGTH {
            126 => !matches!(length, [0, low, ..] if *low < 126),
            127 => match length {
                [high, ..] if high & 0x80 != 0 => false,
                [0, 0, 0, 0, 0, 0, ..] => false,
                _ => true,
            },
            _ => true,
        },
        _ => true,
    }
}

/// Why the proxy closes a WebSocket: the Close frame's status code and reason (a short,
/// stable, machine-readable text; docs/FRONTEND.md lists them for the page's code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseReason {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl CloseReason {
    /// The session was logged out, revoked, or expired: the page should sign in again.
    pub(crate) const SESSION_ENDED: CloseReason = CloseReason {
        code: 1008,
        reason: "session_ended",
    };
    /// The session store could not answer: the session may well be alive; a server-side
    /// condition (1011), so the page reconnects with backoff (a new handshake checks the
    /// session again and answers 401 if it is really gone).
    pub(crate) const SESSION_UNVERIFIABLE: CloseReason = CloseReason {
        code: 1011,
        reason: "session_unverifiable",
    };
    /// No byte either way for `websocket_idle_timeout`.
    pub(crate) const IDLE_TIMEOUT: CloseReason = CloseReason {
        code: 1001,
        reason: "idle_timeout",
    };
    /// The proxy is shutting down (graceful stop).
    pub(crate) const SHUTTING_DOWN: CloseReason = CloseReason {
        code: 1001,
        reason: "shutting_down",
    };
    /// The API's connection failed (reset, broken) while relaying: a server-side condition
    /// (1011), so the page reconnects with backoff.
    pub(crate) const UPSTREAM_FAILED: CloseReason = CloseReason {
        code: 1011,
        reason: "upstream_failed",
    };
    /// The browser's connection failed (reset, broken) while relaying: it is going away
    /// (1001), as the API would see from a browser that closed its tab.
    pub(crate) const CLIENT_GONE: CloseReason = CloseReason {
        code: 1001,
        reason: "client_gone",
    };
    /// A side sent a malformed frame header (RFC 6455 §5: the checks in this module's
    /// documentation).
    pub(crate) const PROTOCOL_ERROR: CloseReason = CloseReason {
        code: 1002,
        reason: "protocol_error",
    };
}

/// Largest Close frame: header 2 + masking key 4 + payload 125.
const MAX_CLOSE: usize = 2 + 4 + 125;

/// A Close frame ready to write.
#[derive(Clone)]
pub(crate) struct CloseFrame {
    bytes: [u8; MAX_CLOSE],
    len: usize,
}

impl CloseFrame {
    /// A Close frame with `reason`'s code and text (at most 123 bytes of it), masked with
    /// `mask` (a client's frame) or not (a server's).
    pub(crate) fn new(reason: CloseReason, mask: Option<[u8; 4]>) -> CloseFrame {
        let text = reason.reason.as_bytes();
        let text = &text[..text.len().min(123)];
        let payload_len = 2 + text.len();
        let mut bytes = [0u8; MAX_CLOSE];
        bytes[0] = 0x88; // FIN, opcode Close
                         // ≤ 125: the 7-bit length.
        bytes[1] = payload_len as u8;
        let mut at = 2;
        if let Some(key) = mask {
            bytes[1] |= 0x80;
            bytes[2..6].copy_from_slice(&key);
            at = 6;
        }
        let payload = &mut bytes[at..at + payload_len];
        payload[..2].copy_from_slice(&reason.code.to_be_bytes());
        payload[2..].copy_from_slice(text);
        if let Some(key) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[i % 4];
            }
        }
        CloseFrame {
            bytes,
            len: at + payload_len,
        }
    }

    /// The frame's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's bytes: `first` (FIN, RSV, opcode), masked or not, `len` bytes of payload.
    fn frame(first: u8, masked: bool, len: usize) -> Vec<u8> {
        let mut out = vec![first];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xffff {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xAB, len));
        out
    }

    /// Scans `pieces` in turn as separate reads: what is relayed (each scan's held bytes,
    /// then its used ones) and the last state.
    fn relay(frames: &mut Frames, pieces: &[&[u8]]) -> (Vec<u8>, State) {
        let mut out = Vec::new();
        let mut state = State::Boundary;
        for piece in pieces {
            let mut room = [0u8; HELD_ROOM];
            let s = frames.scan(&mut room, piece, false);
            assert!(s.used <= piece.len() && s.held <= HELD_ROOM);
            out.extend_from_slice(&room[HELD_ROOM - s.held..]);
            out.extend_from_slice(&piece[..s.used]);
            state = s.state;
        }
        (out, state)
    }

    /// Every split of `stream` into one, two and three reads at the `cuts`.
    fn splits<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<Vec<&'a [u8]>> {
        let mut out = vec![vec![stream]];
        for (n, &i) in cuts.iter().enumerate() {
            out.push(vec![&stream[..i], &stream[i..]]);
            for &j in &cuts[n..] {
                out.push(vec![&stream[..i], &stream[i..j], &stream[j..]]);
            }
        }
        out
    }

    /// A browser's (masked) stream of valid frames: every split relays all of it unchanged,
    /// ending at a boundary.
    #[test]
    fn boundaries_across_any_split() {
        for (from_client, extensions) in [
            (true, Extensions::Deflate),
            (false, Extensions::Deflate),
            (true, Extensions::Unknown),
            (false, Extensions::None),
        ] {
            let m = from_client;
            let rsv1 = if extensions == Extensions::None {
                0
            } else {
                RSV1
            };
            let mut stream = Vec::new();
            // Cut anywhere in and around each header, and here and there in payloads.
            let mut cuts = Vec::new();
            for (first, len) in [
                (0x01 | rsv1, 5),      // text, not final (compressed)
                (0x89, 0),             // ping between fragments
                (0x00, 3),             // continuation, not final
                (0x8A, 125),           // pong, the longest control frame
                (0x80, 300),           // final continuation (16-bit length)
                (0x82 | rsv1, 70_000), // binary (64-bit length)
                (0x88, 2),
            ] {
                cuts.extend(stream.len()..stream.len() + 16);
                stream.extend(frame(first, m, len));
            }
            cuts.extend((0..stream.len()).step_by(4999));
            cuts.sort_unstable();
            cuts.dedup();
            cuts.retain(|&c| c <= stream.len());
            for pieces in splits(&stream, &cuts) {
                let mut frames = Frames::new(from_client, extensions);
                let (out, state) = relay(&mut frames, &pieces);
                assert!(out == stream, "{from_client} {extensions:?} {pieces:?}");
                // It ends with a Close: so does the stream.
                assert_eq!(state, State::Closed);
                assert!(frames.at_boundary() && frames.close_seen());
            }
        }
    }

    /// For each `bad` header (with its payload) after a valid frame, in every split into up
    /// to three reads: only the valid frame is relayed (no byte of the bad header, even when
    /// part of it came in an earlier read), then Malformed, and nothing after.
    fn refused(from_client: bool, extensions: Extensions, before: &[u8], bad: &[u8]) {
        let mut valid = frame(0x81, from_client, 3);
        valid.extend_from_slice(before);
        let mut stream = valid.clone();
        // Its header and a little of its payload: what comes after a refusal is not read.
        stream.extend_from_slice(&bad[..bad.len().min(24)]);
        let cuts: Vec<usize> = (0..=stream.len()).collect();
        for pieces in splits(&stream, &cuts) {
            let mut frames = Frames::new(from_client, extensions);
            let (out, state) = relay(&mut frames, &pieces);
            assert!(
                out == valid && state == State::Malformed,
                "{from_client} {extensions:?} {bad:x?} in {pieces:x?}: {out:x?} {state:?}"
            );
            assert!(frames.at_boundary());
            let mut room = [0u8; HELD_ROOM];
            assert_eq!(
                frames.scan(&mut room, &valid, false),
                Scanned {
                    held: 0,
                    used: 0,
                    state: State::Malformed
                }
            );
        }
    }

    #[test]
    fn a_browser_frame_must_be_masked_an_api_frame_must_not() {
        refused(true, Extensions::None, &[], &frame(0x82, false, 4));
        refused(false, Extensions::None, &[], &frame(0x82, true, 4));
        refused(true, Extensions::None, &[], &frame(0x89, false, 0));
        refused(false, Extensions::None, &[], &frame(0x88, true, 2));
    }

    #[test]
    fn reserved_opcodes_are_malformed() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            for from_client in [true, false] {
                for extensions in [Extensions::None, Extensions::Unknown] {
                    let bad = frame(0x80 | opcode, from_client, 1);
                    refused(from_client, extensions, &[], &bad);
                }
            }
        }
    }

    #[test]
    fn control_frames_must_be_final_and_at_most_125_bytes() {
        for from_client in [true, false] {
            for opcode in [0x8, 0x9, 0xA] {
                refused(
                    from_client,
                    Extensions::None,
                    &[],
                    &frame(opcode, from_client, 0),
                );
                let long = frame(0x80 | opcode, from_client, 126);
                refused(from_client, Extensions::None, &[], &long);
                let huge = frame(0x80 | opcode, from_client, 70_000);
                refused(from_client, Extensions::None, &[], &huge);
            }
            // A fragmented ping inside a fragmented message too.
            let open = frame(0x01, from_client, 2);
            refused(
                from_client,
                Extensions::None,
                &open,
                &frame(0x09, from_client, 1),
            );
        }
    }

    #[test]
    fn rsv_bits_need_an_extension_that_defines_them() {
        for from_client in [true, false] {
            let m = from_client;
            for rsv in [0x40, 0x20, 0x10, 0x70] {
                refused(m, Extensions::None, &[], &frame(0x81 | rsv, m, 1));
                refused(m, Extensions::None, &[], &frame(0x89 | rsv, m, 1));
            }
            // permessage-deflate: RSV1 on a message's first frame only.
            for rsv in [0x20, 0x10, 0x60, 0x50] {
                refused(m, Extensions::Deflate, &[], &frame(0x82 | rsv, m, 1));
            }
            refused(m, Extensions::Deflate, &[], &frame(0xC9, m, 1)); // ping
            refused(m, Extensions::Deflate, &[], &frame(0xC8, m, 2)); // close
            let open = frame(0x41, m, 2); // compressed, not final
            refused(m, Extensions::Deflate, &open, &frame(0xC0, m, 1)); // its continuation
                                                                        // An unknown extension: every RSV bit is let through.
            let mut any = frame(0xF1, m, 1);
            any.extend(frame(0xF9, m, 1));
            any.extend(frame(0x31, m, 1));
            any.extend(frame(0xD0, m, 1));
            let mut frames = Frames::new(m, Extensions::Unknown);
            assert_eq!(relay(&mut frames, &[&any]), (any.clone(), State::Boundary));
        }
    }

    #[test]
    fn fragments_follow_their_message() {
        for from_client in [true, false] {
            let m = from_client;
            // A continuation with no message in progress: at the start, after a final frame,
            // after a fragmented message's end.
            refused(m, Extensions::None, &[], &frame(0x80, m, 1));
            refused(m, Extensions::None, &[], &frame(0x00, m, 1));
            let mut ended = frame(0x01, m, 1);
            ended.extend(frame(0x80, m, 1));
            refused(m, Extensions::None, &ended, &frame(0x80, m, 1));
            // A new message inside one in progress (a ping between is fine).
            let mut open = frame(0x02, m, 1);
            open.extend(frame(0x89, m, 0));
            refused(m, Extensions::None, &open, &frame(0x81, m, 1));
            refused(m, Extensions::None, &open, &frame(0x02, m, 1));
        }
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_is_malformed() {
        for from_client in [true, false] {
            let mut bad = vec![0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0];
            if from_client {
                bad[1] |= 0x80;
                bad.extend_from_slice(&[1, 2, 3, 4]);
            }
            refused(from_client, Extensions::None, &[], &bad);
        }
        // The largest valid length is fine.
        let mut frames = Frames::new(true, Extensions::None);
        let huge = [
            0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
        ];
        assert_eq!(
            relay(&mut frames, &[&huge]),
            (huge.to_vec(), State::InFrame)
        );
    }

    /// A frame with its `len`-byte payload's length in the 16-bit field (`wide` false) or the
    /// 64-bit one, whatever the length.
    fn frame_wide(first: u8, masked: bool, len: usize, wide: bool) -> Vec<u8> {
        let m = if masked { 0x80 } else { 0 };
        let mut out = vec![first];
        if wide {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        } else {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xAB, len));
        out
    }

    #[test]
    fn lengths_must_be_minimally_encoded() {
        for from_client in [true, false] {
            let m = from_client;
            for (len, wide) in [
                (0, false),
                (125, false),
                (0, true),
                (125, true),
                (65_535, true),
            ] {
                refused(m, Extensions::None, &[], &frame_wide(0x82, m, len, wide));
            }
            // The smallest each field may hold.
            let mut fine = frame_wide(0x82, m, 126, false);
            fine.extend(frame_wide(0x82, m, 65_536, true));
            let mut frames = Frames::new(m, Extensions::None);
            assert_eq!(
                relay(&mut frames, &[&fine]),
                (fine.clone(), State::Boundary)
            );
        }
        // A 64-bit length is refused with its sixth byte, before the rest of the header.
        let mut frames = Frames::new(false, Extensions::None);
        let mut room = [0u8; HELD_ROOM];
        let s = frames.scan(&mut room, &[0x82, 0x7f, 0, 0, 0, 0, 0], false);
        assert_eq!(s.state, State::InFrame);
        let s = frames.scan(&mut room, &[0], false);
        assert_eq!((s.held, s.used, s.state), (0, 0, State::Malformed));
        // A 16-bit one with its second byte.
        let mut frames = Frames::new(false, Extensions::None);
        assert_eq!(
            frames.scan(&mut room, &[0x82, 0x7e, 0], false).state,
            State::InFrame
        );
        assert_eq!(
            frames.scan(&mut room, &[125], false).state,
            State::Malformed
        );
    }

    /// Nothing after a whole Close frame is relayed, held back or checked, in any split: a
    /// valid frame, garbage, the start of a header.
    #[test]
    fn nothing_after_a_close_is_relayed() {
        for from_client in [true, false] {
            let m = from_client;
            let mut close = frame(0x81, m, 3);
            close.extend(frame(0x88, m, 2));
            for after in [frame(0x81, m, 3), vec![0x8B, 0x83, 1, 2, 3], vec![0x82]] {
                let mut stream = close.clone();
                stream.extend_from_slice(&after);
                let cuts: Vec<usize> = (0..=stream.len()).collect();
                for pieces in splits(&stream, &cuts) {
                    let mut frames = Frames::new(m, Extensions::None);
                    let (out, state) = relay(&mut frames, &pieces);
                    assert!(out == close, "{m} {after:x?} {pieces:x?}: {out:x?}");
                    assert_eq!(state, State::Closed, "{m} {pieces:x?}");
                    assert!(frames.at_boundary() && frames.close_seen());
                    let mut room = [0u8; HELD_ROOM];
                    let again = frames.scan(&mut room, &after, true);
                    assert_eq!((again.held, again.used), (0, 0));
                    assert_eq!(again.state, State::Closed);
                }
            }
        }
    }

    #[test]
    fn stops_at_the_first_boundary() {
        let mut stream = frame(0x82, false, 10);
        let first = stream.len();
        stream.extend(frame(0x88, false, 2));
        let mut frames = Frames::new(false, Extensions::None);
        let mut room = [0u8; HELD_ROOM];
        assert_eq!(
            frames.scan(&mut room, &stream[..4], false).state,
            State::InFrame
        );
        let s = frames.scan(&mut room, &stream[4..], true);
        assert_eq!(
            s,
            Scanned {
                held: 0,
                used: first - 4,
                state: State::Boundary
            }
        );
        assert!(!frames.close_seen());
        // A header held back is not relayed: what is relayed is at a boundary already.
        let mut frames = Frames::new(false, Extensions::None);
        assert_eq!(frames.scan(&mut room, &stream[..1], false).used, 0);
        assert!(frames.at_boundary());
        let s = frames.scan(&mut room, &stream[1..], true);
        assert_eq!((s.held, s.used, s.state), (0, 0, State::Boundary));
    }

    #[test]
    fn extensions_from_the_handshake() {
        let of = |values: &[&str]| Extensions::negotiated(values.iter().map(|v| v.as_bytes()));
        assert_eq!(of(&[]), Extensions::None);
        assert_eq!(of(&[""]), Extensions::None);
        assert_eq!(of(&[" , "]), Extensions::None);
        assert_eq!(of(&["permessage-deflate"]), Extensions::Deflate);
        assert_eq!(
            of(&["permessage-deflate; client_max_window_bits=15; server_no_context_takeover"]),
            Extensions::Deflate
        );
        assert_eq!(of(&["PerMessage-Deflate"]), Extensions::Deflate);
        assert_eq!(of(&["x-webkit-deflate-frame"]), Extensions::Unknown);
        assert_eq!(of(&["permessage-deflate, foo"]), Extensions::Unknown);
        assert_eq!(of(&["permessage-deflate", "foo; a=1"]), Extensions::Unknown);
        assert_eq!(Extensions::negotiated([&b"\xff"[..]]), Extensions::Unknown);
        // Quoted parameters: a comma, a semicolon, an escaped quote inside.
        assert_eq!(of(&[r#"permessage-deflate; x="a,b""#]), Extensions::Deflate);
        assert_eq!(
            of(&[r#"permessage-deflate; x="a\",b;c", y=1"#]),
            Extensions::Unknown
        );
        assert_eq!(
            of(&[r#"permessage-deflate; x="a\",b;c"; y="\\", permessage-deflate"#]),
            Extensions::Deflate
        );
        assert_eq!(
            of(&[r#"permessage-deflate; x="a,b", foo"#]),
            Extensions::Unknown
        );
        assert_eq!(
            Extensions::negotiated([&b"permessage-deflate; x=\"\xff,\""[..]]),
            Extensions::Deflate
        );
        // A quote not closed (an escape at the end leaves it open): not read, unknown.
        assert_eq!(of(&[r#"permessage-deflate; x="a,b"#]), Extensions::Unknown);
        assert_eq!(of(&[r#"permessage-deflate; x="a\""#]), Extensions::Unknown);
        assert_eq!(
            of(&["permessage-deflate", r#"permessage-deflate; x=""#]),
            Extensions::Unknown
        );
    }

    /// Any bytes in any pieces, either direction, any extensions: no panic, never more used
    /// or held than there is, and a refusal leaves what is relayed at a boundary.
    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6455);
        let extensions = [Extensions::None, Extensions::Deflate, Extensions::Unknown];
        for _ in 0..5000 {
            let mut frames = Frames::new(rng.gen(), extensions[rng.gen_range(0..3)]);
            for _ in 0..rng.gen_range(1..20) {
                let len = rng.gen_range(0..40);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let mut room = [0u8; HELD_ROOM];
                let scanned = frames.scan(&mut room, &data, rng.gen_bool(0.3));
                assert!(scanned.used <= data.len() && scanned.held <= HELD_ROOM);
                if scanned.state == State::Malformed {
                    assert!(frames.at_boundary());
                }
            }
        }
    }

    #[test]
    fn close_frames_encode_code_and_reason() {
        let plain = CloseFrame::new(CloseReason::SESSION_ENDED, None);
        let mut want = vec![0x88, 15, 0x03, 0xf0];
        want.extend_from_slice(b"session_ended");
        assert_eq!(plain.as_bytes(), &want[..]);
        let masked = CloseFrame::new(CloseReason::SESSION_ENDED, Some([9, 8, 7, 6]));
        let bytes = masked.as_bytes();
        assert_eq!(bytes[1], 0x80 | 15);
        let unmasked: Vec<u8> = bytes[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4])
            .collect();
        assert_eq!(unmasked, want[2..]);
        // Valid frames for the checks, each way.
        for (frame, from_client) in [(bytes, true), (plain.as_bytes(), false)] {
            let mut frames = Frames::new(from_client, Extensions::None);
            assert_eq!(relay(&mut frames, &[frame]).1, State::Closed);
            assert!(frames.close_seen());
        }
    }
}

#[cfg(test)]
#[path = "frames_model.rs"]
mod frames_model;
