//! Frame boundaries of a relayed WebSocket byte stream (RFC 6455 §5.2), tracked as the bytes
//! pass, and the Close frames the proxy writes itself (§5.5.1).
//!
//! The tracker reads each frame header (2 to 14 bytes, possibly split across reads: the few
//! bytes of a header are copied aside until it is whole) and counts the payload down; it
//! never buffers, changes or reads the payload, nor the RSV bits (extensions such as
//! permessage-deflate, negotiated end to end, keep working) nor the opcode beyond noting a
//! Close. What it checks is only what the framing itself needs: a 64-bit length must have
//! its top bit clear (§5.2). The endpoints check the rest (masking direction, control frame
//! rules, UTF-8, extensions), as they do without a proxy.

/// Longest frame header: 2 bytes, a 64-bit length (8), a masking key (4).
const MAX_HEADER: usize = 14;

/// Where a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// At a frame boundary: every byte scanned ends a frame (`used` may be short of the input
    /// when the scan was asked to stop at the first boundary).
    Boundary,
    /// Inside a frame (its header or its payload): more bytes are due.
    InFrame,
    /// A malformed header starts at `used`. `split`: part of it came in an earlier scan
    /// (and was relayed), so the stream behind it no longer ends at a frame boundary.
    Malformed { split: bool },
}

/// The result of [`Frames::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Bytes of the input that belong to frames (before any malformed header; up to the
    /// first boundary when asked to stop there).
    pub(crate) used: usize,
    pub(crate) state: State,
}

/// The framing state of one direction of a WebSocket.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// The current header's bytes so far (only the first `head_len` are meaningful).
    head: [u8; MAX_HEADER],
    /// Bytes of the current header seen (0: not inside a header).
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// A Close frame's header was seen.
    close_seen: bool,
    /// A malformed header was seen: nothing after it is tracked.
    broken: bool,
}

impl Frames {
    /// Whether the bytes scanned so far end exactly at a frame boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0 && !self.broken
    }

    /// Whether a Close frame (its header) was among the bytes scanned.
    pub(crate) fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Scans the next bytes of the stream. With `stop`, stops at the first frame boundary
    /// (at once if the stream is at one).
    pub(crate) fn scan(&mut self, data: &[u8], stop: bool) -> Scanned {
        if self.broken {
            return Scanned {
                used: 0,
                state: State::Malformed { split: false },
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
                        used: at,
                        state: State::InFrame,
                    };
                }
            }
            if self.head_len == 0 && (stop || at == data.len()) {
                return Scanned {
                    used: at,
                    state: State::Boundary,
                };
            }
            // A header: this one's first byte is here unless it started in an earlier scan.
            let split = self.head_len > 0;
            let start = at;
            while at < data.len() && self.head_len < self.header_len() {
                self.head[self.head_len] = data[at];
                self.head_len += 1;
                at += 1;
                // A 64-bit length's top bit is known with its first byte.
                if self.head_len == 3 && self.head[1] & 0x7f == 127 && self.head[2] & 0x80 != 0 {
                    self.broken = true;
                    return Scanned {
                        used: start,
                        state: State::Malformed { split },
                    };
                }
            }
            if self.head_len < self.header_len() {
                return Scanned {
                    used: at,
                    state: State::InFrame,
                };
            }
            self.remaining = self.payload_len();
            if self.head[0] & 0x0f == 0x8 {
                self.close_seen = true;
            }
            self.head_len = 0;
        }
    }

    /// The length of the current header as far as its bytes so far tell (at least 2).
    fn header_len(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        let length = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + length + mask
    }

    /// The payload length of the complete header in `head`.
    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut length = [0u8; 8];
                length.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(length)
            }
            short => u64::from(short),
        }
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
    /// A side sent a frame header the framing cannot carry.
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

    /// Every split of a stream of frames into two reads finds the same boundaries.
    #[test]
    fn boundaries_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(0x01, true, 5)); // text, not final
        stream.extend(frame(0x89, true, 0)); // ping between fragments
        stream.extend(frame(0xC0, true, 300)); // continuation, RSV1 (as deflate sets)
        stream.extend(frame(0x82, false, 70_000));
        stream.extend(frame(0x88, true, 2));
        for cut in 0..stream.len() {
            let mut frames = Frames::default();
            let a = frames.scan(&stream[..cut], false);
            assert_eq!(a.used, cut);
            let b = frames.scan(&stream[cut..], false);
            assert_eq!(b.used, stream.len() - cut);
            assert_eq!(b.state, State::Boundary, "cut {cut}");
            assert!(frames.at_boundary());
            assert!(frames.close_seen());
        }
    }

    #[test]
    fn stops_at_the_first_boundary() {
        let mut stream = frame(0x82, false, 10);
        let first = stream.len();
        stream.extend(frame(0x88, false, 2));
        let mut frames = Frames::default();
        assert_eq!(frames.scan(&stream[..4], false).state, State::InFrame);
        let s = frames.scan(&stream[4..], true);
        assert_eq!(
            s,
            Scanned {
                used: first - 4,
                state: State::Boundary
            }
        );
        assert!(!frames.close_seen());
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_is_malformed() {
        let mut stream = frame(0x82, false, 3);
        let good = stream.len();
        stream.extend_from_slice(&[0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        let mut frames = Frames::default();
        assert_eq!(
            frames.scan(&stream, false),
            Scanned {
                used: good,
                state: State::Malformed { split: false }
            }
        );
        let mut frames = Frames::default();
        assert_eq!(frames.scan(&stream[..good + 2], false).used, good + 2);
        assert_eq!(
            frames.scan(&stream[good + 2..], false).state,
            State::Malformed { split: true }
        );
        // The largest valid length is fine.
        let mut frames = Frames::default();
        let huge = [
            0x82, 0x7f, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2,
        ];
        assert_eq!(frames.scan(&huge, false).state, State::InFrame);
    }

    /// Any bytes in any pieces: no panic, never more used than given.
    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6455);
        for _ in 0..2000 {
            let mut frames = Frames::default();
            for _ in 0..rng.gen_range(1..20) {
                let len = rng.gen_range(0..40);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let scanned = frames.scan(&data, rng.gen_bool(0.3));
                assert!(scanned.used <= data.len());
                if let State::Malformed { .. } = scanned.state {
                    assert!(!frames.at_boundary());
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
        let mut frames = Frames::default();
        assert_eq!(frames.scan(bytes, false).state, State::Boundary);
        assert!(frames.close_seen());
    }
}
