//! Differential property test of [`Frames::scan`]: a reference model written from the RFCs
//! (RFC 6455 §5.1–§5.5, RFC 7692 §6), which sees one direction's whole byte stream at once,
//! against the tracker fed read by read exactly as `splice.rs` feeds it (the bytes behind a
//! room of [`HELD_ROOM`] bytes, `held` of the room then `used` of the read relayed).
//!
//! The model knows nothing of the tracker's byte-by-byte checks: it parses whole headers,
//! checks them against the RFCs' rules, and for a header cut short by the end of the stream
//! asks whether *any* completion of its bytes could be valid (the tracker refuses a header
//! as soon as its bytes prove it malformed, and holds it back otherwise).
//!
//! The streams: 1 to 11 frames (random FIN, RSV, opcode, masking, payloads of 0 to 299
//! bytes, now and then 65,536 or more, so 7/16/64-bit lengths; a Close only as the last
//! frame, now and then), valid for their direction and extensions, half of them then mutated
//! (a flipped mask bit, a reserved opcode, a control frame not final or long or with an
//! extended length, RSV bits, a 64-bit length's top bit, a length not minimally encoded, a
//! misplaced continuation or new message, a Close in the middle (what follows it is not
//! relayed), any byte overwritten, the stream cut anywhere or inside a header, a last frame
//! declaring 2^62 bytes); cut into one read, 1-byte reads or reads of random sizes (empty
//! ones too), one of them scanned with `stop`. 2,000 cases, a few seconds in debug.
//!
//! Run: `cargo test --all-features --lib websocket::frames::frames_model`.

use proptest::prelude::*;

use super::{Extensions, Frames, Scanned, State, HELD_ROOM};

/// A whole frame header as RFC 6455 §5.2 lays it out.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    rsv2: bool,
    rsv3: bool,
    opcode: u8,
    masked: bool,
    /// The 7-bit "Payload len" field (126: 16-bit length follows, 127: 64-bit).
    len_field: u8,
    /// The payload length as declared (for 127, all 64 bits, the top one included).
    payload_len: u64,
    /// Bytes of the header: 2, the extended length, the masking key.
    size: usize,
}

/// The header at the start of `bytes`, or None when `bytes` is too short to hold all of it.
fn parse(bytes: &[u8]) -> Option<Header> {
    let first = *bytes.first()?;
    let second = *bytes.get(1)?;
    let len_field = second & 0x7f;
    let masked = second & 0x80 != 0;
    let (payload_len, extended) = match len_field {
        126 => {
            let b = bytes.get(2..4)?;
            (u64::from(b[0]) << 8 | u64::from(b[1]), 2)
        }
        127 => {
            let b = bytes.get(2..10)?;
            (b.iter().fold(0u64, |n, &x| n << 8 | u64::from(x)), 8)
        }
        n => (u64::from(n), 0),
    };
    let size = 2 + extended + if masked { 4 } else { 0 };
    if bytes.len() < size {
        return None;
    }
    Some(Header {
        fin: first & 0b1000_0000 != 0,
        rsv1: first & 0b0100_0000 != 0,
        rsv2: first & 0b0010_0000 != 0,
        rsv3: first & 0b0001_0000 != 0,
        opcode: first & 0b0000_1111,
        masked,
        len_field,
        payload_len,
        size,
    })
}

/// The rule `h` breaks, with `fragmented` (a data message is open: its last data frame had
/// no FIN), on a direction whose frames must be `masked`, with `extensions` negotiated.
fn violation(
    h: &Header,
    fragmented: bool,
    masked: bool,
    extensions: Extensions,
) -> Option<&'static str> {
    // §5.1 / §5.3: a client masks every frame it sends; a server masks none.
    if h.masked != masked {
        return Some("masking");
    }
    let data = matches!(h.opcode, 0x0..=0x2);
    let control = matches!(h.opcode, 0x8..=0xA);
    // §5.2: %x3-7 and %xB-F are reserved.
    if !data && !control {
        return Some("reserved opcode");
    }
    // §5.5: control frames are not fragmented and carry at most 125 bytes; since §5.2 wants
    // the minimal length encoding, their length is always in the 7-bit field.
    if control && !h.fin {
        return Some("fragmented control frame");
    }
    if control && (h.payload_len > 125 || h.len_field > 125) {
        return Some("control frame over 125 bytes");
    }
    // §5.4: continuations only inside a fragmented message, and a new data message only
    // outside one (control frames may be interleaved).
    if h.opcode == 0x0 && !fragmented {
        return Some("continuation outside a message");
    }
    if matches!(h.opcode, 0x1 | 0x2) && fragmented {
        return Some("new message inside a fragmented one");
    }
    // §5.2: RSV bits are 0 unless a negotiated extension defines them. RFC 7692 §6:
    // permessage-deflate defines RSV1 ("Per-Message Compressed") only, set on a data
    // message's first frame, never on a control frame nor a non-first fragment.
    let rsv_ok = match extensions {
        Extensions::None => !(h.rsv1 || h.rsv2 || h.rsv3),
        Extensions::Deflate => !h.rsv2 && !h.rsv3 && (!h.rsv1 || matches!(h.opcode, 0x1 | 0x2)),
        Extensions::Unknown => true,
    };
    if !rsv_ok {
        return Some("RSV bit");
    }
    // §5.2: "the most significant bit MUST be 0" of a 64-bit length.
    if h.len_field == 127 && h.payload_len >> 63 != 0 {
        return Some("64-bit length's top bit");
    }
    // §5.2: "the minimal number of bytes MUST be used to encode the length".
    if (h.len_field == 126 && h.payload_len < 126)
        || (h.len_field == 127 && h.payload_len < 1 << 16)
    {
        return Some("length not minimally encoded");
    }
    None
}

/// Whether the first bytes of a header (not all of it) can still begin a valid one: some
/// completion is valid. Trying every value of the first missing byte, the rest zero, covers
/// them all: the rules read the first two bytes, a 64-bit length's top bit (its first
/// byte), and that an extended length is not too small (a 1 in its first missing byte
/// suffices, when that byte still counts toward it, and when it no longer does, the bytes
/// that do are all here); zeros break no other rule.
fn can_complete(partial: &[u8], fragmented: bool, masked: bool, extensions: Extensions) -> bool {
    (0..=255u8).any(|next| {
        let mut candidate = partial.to_vec();
        candidate.push(next);
        candidate.resize(14, 0);
        parse(&candidate).is_some_and(|h| violation(&h, fragmented, masked, extensions).is_none())
    })
}

/// What the model makes of a whole stream.
#[derive(Debug)]
struct Model {
    /// Length of the prefix to relay: whole valid frames, then the payload of the last one
    /// as far as the stream goes, or up to a header held back (cut short) or refused.
    relay: usize,
    /// Where the malformed header starts, if one is.
    malformed: Option<usize>,
    /// Every frame start (the headers' first bytes), and the end of the last whole frame:
    /// the positions where the stream is at a frame boundary, ascending.
    boundaries: Vec<usize>,
    /// Where each valid Close frame's header starts.
    closes: Vec<usize>,
    /// Where the first whole Close frame ends: nothing after it is relayed (RFC 6455
    /// §5.5.1: a side sends nothing after its Close).
    closed: Option<usize>,
}

fn model(stream: &[u8], masked: bool, extensions: Extensions) -> Model {
    let mut fragmented = false;
    let mut at = 0usize;
    let mut boundaries = vec![0];
    let mut closes = Vec::new();
    loop {
        let rest = &stream[at..];
        if rest.is_empty() {
            return Model {
                relay: at,
                malformed: None,
                boundaries,
                closes,
                closed: None,
            };
        }
        let Some(h) = parse(rest) else {
            let malformed = !can_complete(rest, fragmented, masked, extensions);
            return Model {
                relay: at,
                malformed: malformed.then_some(at),
                boundaries,
                closes,
                closed: None,
            };
        };
        if violation(&h, fragmented, masked, extensions).is_some() {
            return Model {
                relay: at,
                malformed: Some(at),
                boundaries,
                closes,
                closed: None,
            };
        }
        if h.opcode == 0x8 {
            closes.push(at);
        }
        if h.opcode <= 0x2 {
            fragmented = !h.fin;
        }
        let end = (at + h.size) as u64 + h.payload_len;
        if end > stream.len() as u64 {
            // Inside its payload at the end of the stream: all of it relayed.
            return Model {
                relay: stream.len(),
                malformed: None,
                boundaries,
                closes,
                closed: None,
            };
        }
        at = end as usize;
        boundaries.push(at);
        if h.opcode == 0x8 {
            return Model {
                relay: at,
                malformed: None,
                boundaries,
                closes,
                closed: Some(at),
            };
        }
    }
}

/// One frame to build: the shape a valid stream would give it, before any mutation.
#[derive(Debug, Clone)]
struct Spec {
    /// 0–5: a data frame, 6–9: a control frame (ping, pong; a Close when last and 6).
    kind: u8,
    fin: bool,
    /// Which RSV bits (where the extensions allow them).
    rsv: u8,
    len: usize,
    key: [u8; 4],
    seed: u32,
}

/// A change that may (or may not) make the stream malformed.
#[derive(Debug, Clone)]
enum Mutation {
    FlipMask(usize),
    ReservedOpcode(usize, u8),
    ControlNotFinal(usize),
    ControlLong(usize, usize),
    ControlExtendedLength(usize),
    Rsv(usize, u8),
    TopBit(usize),
    Continuation(usize),
    NewMessage(usize),
    /// Any byte anywhere (most land in payloads).
    Overwrite(usize, u8),
    /// The stream cut short anywhere.
    Truncate(usize),
    /// The stream cut short inside a frame's header, after this many of its bytes.
    TruncateHeader(usize, usize),
    /// A last frame declaring 2^62 bytes, of which the stream has a few.
    Huge,
    /// The length in a wider field than it needs (16-bit, or 64-bit when `wide`).
    NonMinimal(usize, bool),
    /// The frame made a Close (a control frame then): nothing after it is relayed.
    Close(usize),
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0u8..10,
        any::<bool>(),
        0u8..8,
        // Short payloads often, so that headers come close together; now and then one that
        // needs the 64-bit length (the smallest such, and a little more).
        prop_oneof![
            10 => 0usize..300,
            10 => 0usize..8,
            1 => 65_536usize..65_600,
        ],
        any::<[u8; 4]>(),
        any::<u32>(),
    )
        .prop_map(|(kind, fin, rsv, len, key, seed)| Spec {
            kind,
            fin,
            rsv,
            len,
            key,
            seed,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Frame indices, taken modulo the frames' count.
    let i = 0usize..12;
    prop_oneof![
        i.clone().prop_map(Mutation::FlipMask),
        (i.clone(), prop_oneof![3u8..8, 0xBu8..0x10])
            .prop_map(|(i, o)| Mutation::ReservedOpcode(i, o)),
        i.clone().prop_map(Mutation::ControlNotFinal),
        (i.clone(), 126usize..300).prop_map(|(i, n)| Mutation::ControlLong(i, n)),
        i.clone().prop_map(Mutation::ControlExtendedLength),
        (i.clone(), 1u8..8).prop_map(|(i, r)| Mutation::Rsv(i, r)),
        i.clone().prop_map(Mutation::TopBit),
        i.clone().prop_map(Mutation::Continuation),
        i.clone().prop_map(Mutation::NewMessage),
        (any::<usize>(), any::<u8>()).prop_map(|(at, v)| Mutation::Overwrite(at, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (i.clone(), 1usize..14).prop_map(|(i, k)| Mutation::TruncateHeader(i, k)),
        Just(Mutation::Huge),
        (i.clone(), any::<bool>()).prop_map(|(i, w)| Mutation::NonMinimal(i, w)),
        i.clone().prop_map(Mutation::Close),
    ]
}

/// How the stream is cut into reads.
#[derive(Debug, Clone)]
enum Reads {
    Whole,
    OneByte,
    /// These sizes in turn, again and again (0: an empty scan, as `follow` may make).
    Sizes(Vec<usize>),
}

fn reads() -> impl Strategy<Value = Reads> {
    prop_oneof![
        1 => Just(Reads::Whole),
        1 => Just(Reads::OneByte),
        2 => prop::collection::vec(1usize..20, 1..8).prop_map(Reads::Sizes),
        2 => prop::collection::vec(0usize..400, 1..6).prop_map(|mut sizes| {
            // Some progress each round.
            sizes.push(1);
            Reads::Sizes(sizes)
        }),
    ]
}

fn extensions() -> impl Strategy<Value = Extensions> {
    prop_oneof![
        Just(Extensions::None),
        Just(Extensions::Deflate),
        Just(Extensions::Unknown)
    ]
}

/// The bytes of one frame: `first` (FIN, RSV, opcode), the length `declared` in `encoding`
/// (0: minimal, 1: at least 16-bit, 2: 64-bit: 1 and 2 are not minimal for short lengths),
/// masked with `key` or not, and `shown` bytes of pseudo-random payload.
fn encode(
    first: u8,
    masked: bool,
    declared: u64,
    encoding: u8,
    key: [u8; 4],
    shown: usize,
    seed: u32,
) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match encoding {
        0 if declared < 126 => out.push(m | declared as u8),
        0 | 1 if declared <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(declared as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&declared.to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&key);
    }
    // Payload bytes that may well look like headers (a tracker that lost its place would
    // read them as such).
    let mut x = seed | 1;
    out.extend((0..shown).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    out
}

/// A stream of frames from `specs`, valid for the direction and extensions, then mutated.
fn build(specs: &[Spec], masked: bool, extensions: Extensions, mutations: &[Mutation]) -> Vec<u8> {
    let mut fragmented = false;
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        starts.push(stream.len());
        // A mutation's frame index, modulo the frames' count.
        let hits = |j: usize| j % specs.len() == i;
        let made_close = mutations
            .iter()
            .any(|m| matches!(*m, Mutation::Close(j) if hits(j)));
        let last = i + 1 == specs.len();
        let control = s.kind >= 6 || made_close;
        let mut opcode = if made_close || (last && s.kind == 6) {
            0x8
        } else if control {
            [0x9, 0xA][usize::from(s.kind) % 2]
        } else if fragmented {
            0x0
        } else {
            1 + s.kind % 2
        };
        let mut fin = control || s.fin;
        let mut len = if control { s.len % 126 } else { s.len };
        let mut encoding = 0;
        let mut rsv = match extensions {
            Extensions::None => 0,
            Extensions::Deflate if opcode == 0x1 || opcode == 0x2 => s.rsv & 0x4,
            Extensions::Deflate => 0,
            Extensions::Unknown => s.rsv,
        };
        let mut mask = masked;
        let mut declared = None;
        for m in mutations {
            match *m {
                Mutation::FlipMask(j) if hits(j) => mask = !mask,
                Mutation::ReservedOpcode(j, o) if hits(j) => opcode = o,
                Mutation::ControlNotFinal(j) if hits(j) && control => fin = false,
                Mutation::ControlLong(j, n) if hits(j) && control => len = n,
                Mutation::ControlExtendedLength(j) if hits(j) && control => {
                    encoding = 1 + (s.seed % 2) as u8
                }
                Mutation::Rsv(j, r) if hits(j) => rsv = r,
                Mutation::TopBit(j) if hits(j) => declared = Some((1u64 << 63) | len as u64),
                Mutation::Continuation(j) if hits(j) && !control => opcode = 0x0,
                Mutation::NewMessage(j) if hits(j) && !control => opcode = 1 + s.kind % 2,
                Mutation::NonMinimal(j, wide) if hits(j) => encoding = 1 + u8::from(wide),
                _ => {}
            }
        }
        let first = u8::from(fin) << 7 | rsv << 4 | opcode;
        let (declared, encoding) = match declared {
            Some(d) => (d, 2),
            None => (len as u64, encoding),
        };
        stream.extend(encode(first, mask, declared, encoding, s.key, len, s.seed));
        if opcode <= 0x2 {
            fragmented = !fin;
        }
    }
    for m in mutations {
        match *m {
            Mutation::Huge => {
                let opcode = if fragmented { 0x0 } else { 0x2 };
                let key = [9, 8, 7, 6];
                stream.extend(encode(0x80 | opcode, masked, 1 << 62, 2, key, 17, 5));
            }
            Mutation::Overwrite(at, v) if !stream.is_empty() => {
                let at = at % stream.len();
                stream[at] = v;
            }
            Mutation::Truncate(at) => stream.truncate(at % (stream.len() + 1)),
            Mutation::TruncateHeader(j, k) => {
                let at = starts[j % starts.len()] + k;
                stream.truncate(at.min(stream.len()));
            }
            _ => {}
        }
    }
    stream
}

/// Feeds `stream` to a tracker read by read as `splice.rs` does (with `stop` on read
/// `stop_at`, the rest of that read then scanned on its own, as `follow` does), checks every
/// scan against `want`, and returns what was relayed and the last state.
fn feed(
    stream: &[u8],
    masked: bool,
    extensions: Extensions,
    reads: &Reads,
    stop_at: Option<usize>,
    want: &Model,
) -> Result<(Vec<u8>, State), TestCaseError> {
    let mut frames = Frames::new(masked, extensions);
    let mut out: Vec<u8> = Vec::new();
    let mut state = State::Boundary;
    let mut refused = false;
    let mut closed = false;
    let mut at = 0usize;
    let mut n = 0usize;
    // The direction's buffer: the room, then the read (room bytes left from before, as
    // in the proxy's buffer, never zeroed: poisoned here).
    let mut buf = vec![0xEEu8; HELD_ROOM + stream.len()];
    let is_boundary = |pos: usize| want.boundaries.binary_search(&pos).is_ok();
    while at < stream.len() || n == 0 {
        let size = match reads {
            Reads::Whole => stream.len(),
            Reads::OneByte => 1,
            Reads::Sizes(sizes) => sizes[n % sizes.len()],
        }
        .min(stream.len() - at);
        let stop = stop_at == Some(n);
        n += 1;
        let read = &stream[at..at + size];
        buf[HELD_ROOM..HELD_ROOM + size].copy_from_slice(read);
        let mut offset = 0;
        // The read, then (after a stop) its rest, as `follow` scans it.
        for stop in if stop { vec![true, false] } else { vec![false] } {
            let before = out.len();
            buf[..HELD_ROOM].fill(0xEE);
            let data_at = HELD_ROOM + offset;
            let (room, rest) = buf.split_at_mut(HELD_ROOM);
            let room: &mut [u8; HELD_ROOM] =
                room.try_into().map_err(|_| TestCaseError::fail("room"))?;
            let scanned = frames.scan(room, &rest[offset..size], stop);
            let Scanned {
                held,
                used,
                state: s,
            } = scanned;
            prop_assert!(held <= HELD_ROOM && used <= size - offset, "{scanned:?}");
            if refused || closed {
                let state = if refused {
                    State::Malformed
                } else {
                    State::Closed
                };
                prop_assert_eq!(
                    scanned,
                    Scanned {
                        held: 0,
                        used: 0,
                        state
                    }
                );
            }
            // What goes on: the room's last `held` bytes (put there by the scan), then the
            // read's first `used`, one run in the buffer.
            // (After a stop, the room is no longer in front of the rest: but a stop that used
            // bytes was inside a payload, so no header was held back to give.)
            if offset > 0 {
                prop_assert_eq!(held, 0, "a scan after a stop holds nothing back to give");
            }
            out.extend_from_slice(&buf[data_at - held..data_at + used]);
            prop_assert!(
                out.len() <= want.relay,
                "relayed {} > model {}",
                out.len(),
                want.relay
            );
            prop_assert!(
                out[before..] == stream[before..out.len()],
                "relayed bytes differ at {before}"
            );
            if let Some(bad) = want.malformed {
                prop_assert!(
                    out.len() <= bad,
                    "a byte of the malformed header at {bad} relayed"
                );
            }
            prop_assert_eq!(
                frames.at_boundary(),
                is_boundary(out.len()),
                "at_boundary at {}",
                out.len()
            );
            let close = want.closes.iter().any(|&c| c < out.len());
            prop_assert_eq!(frames.close_seen(), close, "close_seen at {}", out.len());
            if stop {
                prop_assert_eq!(held, 0, "a stop holds nothing back to give");
                // Up to the first boundary at or after what was relayed before, no further.
                let next = want.boundaries.iter().copied().find(|&b| b >= before);
                match s {
                    State::Boundary => prop_assert_eq!(Some(out.len()), next, "stop"),
                    State::Closed if !closed => prop_assert_eq!(Some(out.len()), next, "stop"),
                    State::Closed => {}
                    State::InFrame => {
                        prop_assert_eq!(used, size - offset, "stop inside a payload");
                        prop_assert!(next.is_none_or(|b| b > out.len()), "stop passed a boundary");
                    }
                    State::Malformed => prop_assert!(refused, "a stop refused a header"),
                }
            }
            if s == State::Malformed {
                prop_assert!(frames.at_boundary(), "at_boundary after a refusal");
                refused = true;
            }
            if s == State::Closed {
                prop_assert_eq!(Some(out.len()), want.closed, "Closed where the Close ends");
                prop_assert!(frames.at_boundary(), "at_boundary after a Close");
                closed = true;
            }
            state = s;
            offset += used;
        }
        at += size;
        if size == 0 && at >= stream.len() {
            break;
        }
    }
    Ok((out, state))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The tracker relays exactly the model's prefix, whatever the reads, refuses iff the
    /// model finds a malformed header, and ends Closed iff the model finds a whole Close.
    #[test]
    fn scan_agrees_with_the_rfc_model(
        masked in any::<bool>(),
        extensions in extensions(),
        specs in prop::collection::vec(spec(), 1..12),
        mutations in prop_oneof![Just(Vec::new()), prop::collection::vec(mutation(), 1..3)],
        reads in reads(),
        stop_at in prop::option::weighted(0.3, 0usize..40),
    ) {
        let stream = build(&specs, masked, extensions, &mutations);
        let want = model(&stream, masked, extensions);
        let (out, state) = feed(&stream, masked, extensions, &reads, stop_at, &want)?;
        prop_assert!(out == stream[..want.relay], "relayed {} bytes, model {}", out.len(), want.relay);
        prop_assert_eq!(state == State::Malformed, want.malformed.is_some(), "{:?} vs {:?}", state, want.malformed);
        prop_assert_eq!(state == State::Closed, want.closed.is_some(), "{:?} vs {:?}", state, want.closed);
        if want.malformed.is_none() && want.closed.is_none() {
            let whole = want.relay == stream.len() && want.boundaries.last() == Some(&stream.len());
            let last = if whole { State::Boundary } else { State::InFrame };
            prop_assert_eq!(state, last);
        }
    }
}

/// The model itself, on streams whose verdict is known by hand (a model that accepts
/// everything would agree with a tracker that does).
#[test]
fn the_model_refuses_what_the_rfcs_refuse() {
    let none = Extensions::None;
    let deflate = Extensions::Deflate;
    let ok = |s: &[u8], m: bool, e: Extensions| {
        let r = model(s, m, e);
        r.malformed.is_none() && r.relay == s.len()
    };
    let bad_at = |s: &[u8], m: bool, e: Extensions| model(s, m, e).malformed;
    // Valid: text, ping between fragments, the smallest 16- and 64-bit lengths, deflate RSV1.
    assert!(ok(&encode(0x81, false, 3, 0, [0; 4], 3, 1), false, none));
    let mut s = encode(0x01, false, 2, 0, [0; 4], 2, 1);
    s.extend(encode(0x89, false, 0, 0, [0; 4], 0, 1));
    s.extend(encode(0x80, false, 2, 0, [0; 4], 2, 1));
    assert!(ok(&s, false, none));
    assert!(ok(&encode(0x82, true, 126, 1, [1; 4], 126, 1), true, none));
    assert!(ok(
        &encode(0x82, true, 1 << 16, 2, [1; 4], 1 << 16, 1),
        true,
        none
    ));
    assert!(ok(&encode(0xC1, false, 1, 0, [0; 4], 1, 1), false, deflate));
    assert!(ok(
        &encode(0xF1, false, 1, 0, [0; 4], 1, 1),
        false,
        Extensions::Unknown
    ));
    // Malformed.
    for (s, m, e) in [
        (encode(0x81, true, 3, 0, [0; 4], 3, 1), false, none),
        (encode(0x81, false, 3, 0, [0; 4], 3, 1), true, none),
        (encode(0x83, false, 3, 0, [0; 4], 3, 1), false, none),
        (encode(0x09, false, 0, 0, [0; 4], 0, 1), false, none),
        (encode(0x89, false, 126, 0, [0; 4], 126, 1), false, none),
        (encode(0x89, false, 5, 1, [0; 4], 5, 1), false, none),
        (encode(0x80, false, 1, 0, [0; 4], 1, 1), false, none),
        (encode(0xC1, false, 1, 0, [0; 4], 1, 1), false, none),
        (encode(0xA1, false, 1, 0, [0; 4], 1, 1), false, deflate),
        (encode(0xC9, false, 1, 0, [0; 4], 1, 1), false, deflate),
        (encode(0x82, false, 1 << 63, 2, [0; 4], 1, 1), false, none),
        (encode(0x81, true, 3, 2, [1; 4], 3, 1), true, none),
        (encode(0x82, false, 125, 1, [0; 4], 125, 1), false, none),
        (
            encode(0x82, false, 0xffff, 2, [0; 4], 0xffff, 1),
            false,
            none,
        ),
        (vec![0x82, 0x7e, 0, 125], false, none),
        (vec![0x82, 0x7f, 0, 0, 0, 0, 0, 0], false, none),
        (vec![0x83], false, none),
        (vec![0x82, 0x7f, 0x80], false, none),
        (vec![0x89, 0x7e], false, none),
    ] {
        assert_eq!(bad_at(&s, m, e), Some(0), "{s:x?}");
    }
    // Cut short but fine so far: held back, not refused.
    for s in [
        &[0x82u8][..],
        &[0x82, 0xff, 0x7f, 1, 2],
        &[0x82, 0xfe, 0],
        &[0x82, 0xff, 0, 0, 0, 0, 0],
        &[0x82, 0xff, 0, 0, 0, 0, 0, 1],
    ] {
        let r = model(s, true, none);
        assert_eq!((r.relay, r.malformed), (0, None), "{s:x?}");
    }
    // Nothing after a whole Close, valid or not; a Close cut short is relayed as it goes.
    let mut s = encode(0x88, false, 2, 0, [0; 4], 2, 1);
    let close_end = s.len();
    s.extend(encode(0x81, false, 3, 0, [0; 4], 3, 1));
    s.push(0x83);
    let r = model(&s, false, none);
    assert_eq!(
        (r.relay, r.malformed, r.closed),
        (close_end, None, Some(close_end))
    );
    let r = model(&s[..close_end - 1], false, none);
    assert_eq!(
        (r.relay, r.malformed, r.closed),
        (close_end - 1, None, None)
    );
}
