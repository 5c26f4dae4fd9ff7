//! Certificates made on the fly with rcgen for the mutual-TLS tests: a CA, and server or client
//! certificates it issues, with their keys as PEM.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

pub fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A certificate issued by a CA, with its key as PKCS#8 PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// A client (`client = true`) or server certificate for `name` issued by `ca`, with a new
/// key of rcgen's default algorithm.
pub fn issue(ca: &Ca, name: &str, client: bool) -> Leaf {
    issue_with(ca, name, KeyPair::generate().unwrap(), client, None)
}

/// [`issue`] for `key`, valid from and until the given years (January 1st) when `years` is
/// set.
pub fn issue_with(
    ca: &Ca,
    name: &str,
    key: KeyPair,
    client: bool,
    years: Option<(i32, i32)>,
) -> Leaf {
    let sans = if client {
        Vec::new()
    } else {
        vec![name.to_owned()]
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if let Some((from, until)) = years {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}
