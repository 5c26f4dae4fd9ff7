#![no_main]

//! Needs a running Redis at `FUZZ_REDIS_URL` (scripts/fuzz.sh starts one).

use std::sync::OnceLock;

use countersign_fuzz::checks::SessionRecordRig;

static RIG: OnceLock<SessionRecordRig> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rig = RIG.get_or_init(|| {
        let url = std::env::var("FUZZ_REDIS_URL")
            .expect("FUZZ_REDIS_URL must name a running Redis (scripts/fuzz.sh starts one)");
        SessionRecordRig::new(&url)
    });
    rig.check(data);
});
