//! The fuzz targets' entry into the frame tracker ([`Frames::scan`]), which is private to
//! this module: an inherent impl of the hidden `countersign::__fuzz::WebSocketFrames`
//! (src/lib.rs), so that nothing else of the tracker is public. fuzz/src/checks.rs (target
//! `ws_frames`) asserts its properties.

use crate::__fuzz::{Run, Scan, ScanState, WebSocketFrames};

use super::frames::{Extensions, Frames, Scanned, State, HELD_ROOM};

impl WebSocketFrames {
    /// Most header bytes the tracker ever holds back.
    pub const HELD_ROOM: usize = HELD_ROOM;

    /// Scans `reads` in turn as one direction's reads (`from_client`: the browser's, masked
    /// frames; `extensions` 0: none negotiated, 1: permessage-deflate, else one the proxy
    /// does not know) exactly as the relay does: each read behind a room of
    /// [`Self::HELD_ROOM`] bytes (left as the scan before left it, poisoned first here), the
    /// room's last `held` bytes then the read's first `used` relayed. A read marked `stop`
    /// is scanned up to the first frame boundary, then its rest on its own, as the relay's
    /// close follows it (relayed here too, so that every way of reading a stream relays the
    /// same).
    pub fn run(from_client: bool, extensions: u8, reads: &[(&[u8], bool)]) -> Run {
        let extensions = match extensions {
            0 => Extensions::None,
            1 => Extensions::Deflate,
            _ => Extensions::Unknown,
        };
        let mut frames = Frames::new(from_client, extensions);
        let longest = reads.iter().map(|(read, _)| read.len()).max().unwrap_or(0);
        let mut buf = vec![0u8; HELD_ROOM + longest];
        let mut run = Run::default();
        for &(read, stop) in reads {
            buf[..HELD_ROOM].fill(0xEE);
            buf[HELD_ROOM..HELD_ROOM + read.len()].copy_from_slice(read);
            let Some((room, data)) = buf.split_first_chunk_mut::<HELD_ROOM>() else {
                return run;
            };
            let scanned = frames.scan(room, &data[..read.len()], stop);
            // Bounded so that a wrong count is a finding of the fuzz check, not a panic here.
            let from = HELD_ROOM.saturating_sub(scanned.held);
            let to = (HELD_ROOM + scanned.used).min(HELD_ROOM + read.len());
            run.relayed.extend_from_slice(&buf[from..to]);
            run.scans.push(scan(&frames, read.len(), stop, scanned));
            if stop {
                // The rest of the read, no longer behind the room: a room of its own.
                let rest = read.get(scanned.used..).unwrap_or_default();
                let mut room = [0xEEu8; HELD_ROOM];
                let scanned = frames.scan(&mut room, rest, false);
                run.relayed
                    .extend_from_slice(&room[HELD_ROOM.saturating_sub(scanned.held)..]);
                run.relayed
                    .extend_from_slice(&rest[..scanned.used.min(rest.len())]);
                run.scans.push(scan(&frames, rest.len(), false, scanned));
            }
        }
        run
    }
}

fn scan(frames: &Frames, input: usize, stop: bool, scanned: Scanned) -> Scan {
    Scan {
        input,
        stop,
        held: scanned.held,
        used: scanned.used,
        state: match scanned.state {
            State::Boundary => ScanState::Boundary,
            State::InFrame => ScanState::InFrame,
            State::Malformed => ScanState::Malformed,
            State::Closed => ScanState::Closed,
        },
        at_boundary: frames.at_boundary(),
        close_seen: frames.close_seen(),
    }
}
