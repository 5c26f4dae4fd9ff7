//! Key rotation and runtime key swaps: epoch keyids across a boundary, the HKDF derivation
//! checked against an independent computation, forged epochs, and `KeyringHandle::store`
//! replacing the keyring while requests are being signed and verified.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use countersign::core::{
    derive_rotated, signature_base_for, KeySpec, Keyring, KeyringHandle, Nonce, Policy, Reason,
    RequestView, Rotation, Secret, Signer, SignerConfig, Verifier, ROTATION_SALT,
};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::HeaderValue;
use http::request::Parts;
use sha2::Sha256;

const PERIOD: u64 = 6 * 3600;
/// An epoch boundary: the first second of epoch 80_000.
const BOUNDARY: u64 = 80_000 * PERIOD;
const MASTER: [u8; 32] = [0x33; 32];

fn spec(id: &str, byte: u8, retired: bool) -> KeySpec {
    KeySpec {
        id: id.to_owned(),
        secret: Secret::new(vec![byte; 32]).unwrap(),
        retired,
        rotation: None,
    }
}

fn rotating_handle() -> KeyringHandle {
    KeyringHandle::new(
        Keyring::new(
            "edge",
            vec![KeySpec {
                id: "edge".to_owned(),
                secret: Secret::new(MASTER.to_vec()).unwrap(),
                retired: false,
                rotation: None,
            }],
            Rotation::Every(Duration::from_secs(PERIOD)),
        )
        .unwrap(),
    )
}

/// HKDF-SHA256(ikm = secret, salt = "countersign/v1", info = keyid), 32 bytes, computed here
/// without the library.
fn independent_hkdf(secret: &[u8], keyid: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"countersign/v1"), secret);
    let mut okm = [0u8; 32];
    hk.expand(keyid.as_bytes(), &mut okm).unwrap();
    okm
}

fn hmac_b64(key: &[u8], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn request() -> Parts {
    http::Request::builder()
        .method("GET")
        .uri("/reports?year=2026")
        .header("host", "api.example.com")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn sign(signer: &Signer, now: u64) -> Parts {
    let mut parts = request();
    signer
        .sign(&mut parts, b"", None, now, &Nonce::random())
        .unwrap();
    parts
}

fn header(parts: &Parts, name: &str) -> String {
    parts.headers[name].to_str().unwrap().to_owned()
}

fn reason(verifier: &Verifier, parts: &Parts, now: u64) -> Reason {
    match verifier.verify(parts, b"", now) {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(e) => e.reason(),
    }
}

/// A request MACed by hand with `key`, claiming `keyid` and `created`: what a holder of one
/// epoch's derived key could forge.
fn forged(keyid: &str, created: u64, key: &[u8]) -> Parts {
    let mut parts = request();
    let digest = countersign::core::content_digest_sha256(b"");
    parts
        .headers
        .insert("content-digest", HeaderValue::from_str(&digest).unwrap());
    let member = format!(
        r#"("@method" "@authority" "@path" "@query" "content-digest");created={created};expires={};nonce="Zm9yZ2VkLW5vbmNlLXZhbHVl";keyid="{keyid}";alg="hmac-sha256";tag="countersign""#,
        created + 10
    );
    let base = signature_base_for(&RequestView::from_parts(&parts), &member).unwrap();
    let mac = hmac_b64(key, base.as_bytes());
    parts.headers.insert(
        "signature-input",
        HeaderValue::from_str(&format!("countersign={member}")).unwrap(),
    );
    parts.headers.insert(
        "signature",
        HeaderValue::from_str(&format!("countersign=:{mac}:")).unwrap(),
    );
    parts
}

#[test]
fn signature_from_before_boundary_verifies_after_it() {
    let handle = rotating_handle();
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let verifier = Verifier::new(handle, Policy::default());

    let before = sign(&signer, BOUNDARY - 1);
    let after = sign(&signer, BOUNDARY + 1);
    let old_epoch = BOUNDARY / PERIOD - 1;
    let new_epoch = BOUNDARY / PERIOD;
    assert!(header(&before, "signature-input").contains(&format!("keyid=\"edge.{old_epoch}\"")));
    assert!(header(&after, "signature-input").contains(&format!("keyid=\"edge.{new_epoch}\"")));

    // 2 s later, across the boundary, within the window: the old epoch's key still verifies
    // because the epoch is taken from `created`, not from the verifier's clock.
    let v = verifier.verify(&before, b"", BOUNDARY + 1).unwrap();
    assert_eq!(v.keyid, format!("edge.{old_epoch}"));
    assert_eq!(v.created, BOUNDARY - 1);
    verifier.verify(&after, b"", BOUNDARY + 1).unwrap();
    // And the old signature dies with the window, as every signature does.
    assert_eq!(reason(&verifier, &before, BOUNDARY + 12), Reason::Expired);
}

#[test]
fn forged_epoch_is_unknown_key() {
    let handle = rotating_handle();
    let verifier = Verifier::new(handle.clone(), Policy::default());
    let old_epoch = BOUNDARY / PERIOD - 1;
    let new_epoch = BOUNDARY / PERIOD;

    // Relabelled keyid on a genuine signature.
    let signer = Signer::new(handle, SignerConfig::default());
    let mut relabelled = sign(&signer, BOUNDARY - 1);
    let input = header(&relabelled, "signature-input").replace(
        &format!("keyid=\"edge.{old_epoch}\""),
        &format!("keyid=\"edge.{new_epoch}\""),
    );
    relabelled
        .headers
        .insert("signature-input", HeaderValue::from_str(&input).unwrap());
    assert_eq!(reason(&verifier, &relabelled, BOUNDARY), Reason::UnknownKey);

    // A leaked epoch key used to sign a request created in the next epoch, MAC and all.
    let old_key = independent_hkdf(&MASTER, &format!("edge.{old_epoch}"));
    let stretched = forged(&format!("edge.{old_epoch}"), BOUNDARY + 1, &old_key);
    assert_eq!(
        reason(&verifier, &stretched, BOUNDARY + 1),
        Reason::UnknownKey
    );
    // The same forgery with a matching `created` verifies: the MAC itself is sound, only the
    // epoch rule rejected it above.
    let honest = forged(&format!("edge.{old_epoch}"), BOUNDARY - 1, &old_key);
    verifier.verify(&honest, b"", BOUNDARY).unwrap();

    // A future epoch, and ids that are not `{id}.{epoch}`.
    for keyid in [
        format!("edge.{}", new_epoch + 1),
        "edge".to_owned(),
        format!("edge.+{new_epoch}"),
        format!("edge.0{new_epoch}"),
        format!("other.{new_epoch}"),
        format!("edge.{new_epoch}.{new_epoch}"),
    ] {
        let key = independent_hkdf(&MASTER, &keyid);
        let parts = forged(&keyid, BOUNDARY + 1, &key);
        assert_eq!(
            reason(&verifier, &parts, BOUNDARY + 1),
            Reason::UnknownKey,
            "{keyid}"
        );
    }
}

#[test]
fn derived_keys_equal_independent_hkdf() {
    assert_eq!(ROTATION_SALT, b"countersign/v1");
    let master = Secret::new(MASTER.to_vec()).unwrap();
    for keyid in [
        "edge.0",
        "edge.79999",
        "edge.80000",
        "k1.18446744073709551615",
    ] {
        let ours = derive_rotated(&master, keyid);
        assert_eq!(
            ours.expose(),
            &independent_hkdf(&MASTER, keyid)[..],
            "{keyid}"
        );
    }

    let keyring = rotating_handle().load();
    for now in [BOUNDARY - 1, BOUNDARY, BOUNDARY + PERIOD - 1, 0] {
        let key = keyring.signing_key(now);
        let expected_id = format!("edge.{}", now / PERIOD);
        assert_eq!(&*key.keyid, expected_id);
        assert_eq!(
            key.secret.expose(),
            &independent_hkdf(&MASTER, &expected_id)[..]
        );
        // The verifier's derivation matches; the cache returns the same key again.
        let v = keyring.verification_key(&expected_id, now).unwrap();
        assert_eq!(v.expose(), key.secret.expose());
        let again = keyring.verification_key(&expected_id, now).unwrap();
        assert_eq!(again.expose(), key.secret.expose());
    }
}

/// The wire signature is HMAC-SHA256 with the independently derived key over the base.
#[test]
fn rotated_signature_is_hmac_with_independently_derived_key() {
    let signer = Signer::new(rotating_handle(), SignerConfig::default());
    let parts = sign(&signer, BOUNDARY + 7);
    let input = header(&parts, "signature-input");
    let member = input.strip_prefix("countersign=").unwrap();
    let base = signature_base_for(&RequestView::from_parts(&parts), member).unwrap();
    let key = independent_hkdf(&MASTER, &format!("edge.{}", BOUNDARY / PERIOD));
    assert_eq!(
        header(&parts, "signature"),
        format!("countersign=:{}:", hmac_b64(&key, base.as_bytes()))
    );
}

#[test]
fn retired_master_rejects_all_its_epochs() {
    let handle = rotating_handle();
    let signer = Signer::new(handle.clone(), SignerConfig::default());
    let parts = sign(&signer, BOUNDARY);
    let verifier = Verifier::new(handle.clone(), Policy::default());
    verifier.verify(&parts, b"", BOUNDARY).unwrap();

    handle.store(
        Keyring::new(
            "next",
            vec![
                KeySpec {
                    id: "edge".to_owned(),
                    secret: Secret::new(MASTER.to_vec()).unwrap(),
                    retired: true,
                    rotation: None,
                },
                spec("next", 0x44, false),
            ],
            Rotation::Every(Duration::from_secs(PERIOD)),
        )
        .unwrap(),
    );
    assert_eq!(reason(&verifier, &parts, BOUNDARY), Reason::UnknownKey);
    let fresh = sign(&signer, BOUNDARY);
    assert!(header(&fresh, "signature-input").contains("keyid=\"next."));
    verifier.verify(&fresh, b"", BOUNDARY).unwrap();
}

/// docs/PROTOCOL.md §5: the period is a whole number of seconds, 1 s to 365 days. Any other
/// is refused, as the default or as a key's own, never rounded (1.5 s must not become 1 s).
#[test]
fn rotation_period_outside_whole_seconds_1s_to_365d_is_refused() {
    const YEAR: u64 = 365 * 24 * 3600;
    let build = |own: Option<Rotation>, default: Rotation| {
        Keyring::new(
            "k",
            vec![KeySpec {
                rotation: own,
                ..spec("k", 1, false)
            }],
            default,
        )
    };
    for (period, problem) in [
        (Duration::from_millis(1500), "whole number of seconds"),
        (Duration::from_millis(500), "whole number of seconds"),
        (Duration::new(60, 1), "whole number of seconds"),
        (Duration::ZERO, "at least 1s"),
        (Duration::from_secs(YEAR + 1), "maximum of 365d"),
        (Duration::from_secs(u64::MAX), "maximum of 365d"),
    ] {
        let every = Rotation::Every(period);
        for result in [build(Some(every), Rotation::Off), build(None, every)] {
            let err = result.expect_err(&format!("{period:?}")).to_string();
            assert!(err.contains(problem), "{period:?}: {err}");
        }
        // An unused default is checked too.
        assert!(build(Some(Rotation::Off), every).is_err(), "{period:?}");
    }
    for secs in [1, PERIOD, YEAR] {
        let every = Rotation::Every(Duration::from_secs(secs));
        let k = build(None, every).unwrap();
        assert_eq!(k.active_rotation(), every);
        assert_eq!(&*k.signing_key(secs * 3).keyid, "k.3");
    }
}

#[test]
fn keyring_swap_mid_stream() {
    let now = 1_700_000_000;
    let signer_handle =
        KeyringHandle::new(Keyring::single("old", Secret::new(vec![1; 32]).unwrap()).unwrap());
    let verifier_handle = KeyringHandle::new(
        Keyring::new("old", vec![spec("old", 1, false)], Rotation::Off).unwrap(),
    );
    let signer = Signer::new(signer_handle.clone(), SignerConfig::default());
    let verifier = Verifier::new(verifier_handle.clone(), Policy::default());

    let old_signed = sign(&signer, now);
    verifier.verify(&old_signed, b"", now).unwrap();
    // Phase one done before the swap keeps the keyring it loaded.
    let in_flight = verifier.verify_headers(&old_signed, now).unwrap();

    // Step 1: the verifier learns the new key while still accepting the old one.
    verifier_handle.store(
        Keyring::new(
            "old",
            vec![spec("old", 1, false), spec("new", 2, false)],
            Rotation::Off,
        )
        .unwrap(),
    );
    verifier.verify(&old_signed, b"", now).unwrap();

    // Step 2: the signer switches to the new key (same handle, no new Signer).
    signer_handle.store(
        Keyring::new(
            "new",
            vec![spec("old", 1, false), spec("new", 2, false)],
            Rotation::Off,
        )
        .unwrap(),
    );
    let new_signed = sign(&signer, now);
    assert!(header(&new_signed, "signature-input").contains("keyid=\"new\""));
    verifier.verify(&new_signed, b"", now).unwrap();
    verifier.verify(&old_signed, b"", now).unwrap();

    // Step 3: the old key is removed from the verifier: old-key signatures are refused.
    verifier_handle.store(Keyring::new("new", vec![spec("new", 2, false)], Rotation::Off).unwrap());
    assert_eq!(reason(&verifier, &old_signed, now), Reason::UnknownKey);
    verifier.verify(&new_signed, b"", now).unwrap();
    assert_eq!(in_flight.check_body(b"").unwrap().keyid, "old");

    // A clone of the verifier shares the handle, so it sees the swap too.
    assert_eq!(
        reason(&verifier.clone(), &old_signed, now),
        Reason::UnknownKey
    );
}

/// Swaps while other threads sign and verify: no request fails for any reason other than the
/// removed key, and once the swap is done, every old-key signature is refused.
#[test]
fn keyring_swap_under_concurrent_verification() {
    let now = 1_700_000_000;
    let verifier_handle = KeyringHandle::new(
        Keyring::new(
            "old",
            vec![spec("old", 1, false), spec("new", 2, false)],
            Rotation::Off,
        )
        .unwrap(),
    );
    let verifier = Verifier::new(verifier_handle.clone(), Policy::default());
    let old_signer = Signer::new(
        KeyringHandle::new(
            Keyring::new("old", vec![spec("old", 1, false)], Rotation::Off).unwrap(),
        ),
        SignerConfig::default(),
    );
    let new_signer = Signer::new(
        KeyringHandle::new(
            Keyring::new("new", vec![spec("new", 2, false)], Rotation::Off).unwrap(),
        ),
        SignerConfig::default(),
    );
    let old_request = Arc::new(sign(&old_signer, now));
    let new_request = Arc::new(sign(&new_signer, now));

    let swapped = Arc::new(AtomicBool::new(false));
    let rejected_after_swap = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let verifier = verifier.clone();
            let old_request = old_request.clone();
            let new_request = new_request.clone();
            let swapped = swapped.clone();
            let rejected_after_swap = rejected_after_swap.clone();
            std::thread::spawn(move || {
                // Run until the swap is published, then 50 more rounds.
                let mut after = 0;
                while after < 50 {
                    let swap_done = swapped.load(Ordering::SeqCst);
                    if swap_done {
                        after += 1;
                    }
                    verifier.verify(&new_request, b"", now).unwrap();
                    match verifier.verify(&old_request, b"", now) {
                        Ok(_) => assert!(!swap_done, "old key accepted after the swap"),
                        Err(e) => {
                            assert_eq!(e.reason(), Reason::UnknownKey);
                            if swap_done {
                                rejected_after_swap.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    verifier_handle.store(Keyring::new("new", vec![spec("new", 2, false)], Rotation::Off).unwrap());
    swapped.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(reason(&verifier, &old_request, now), Reason::UnknownKey);
    verifier.verify(&new_request, b"", now).unwrap();
    assert_eq!(rejected_after_swap.load(Ordering::SeqCst), 4 * 50);
}
