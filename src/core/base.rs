//! RFC 9421 §2.5: the signature base, its own type with `Display`.

use std::collections::HashSet;
use std::fmt;

use super::components::{ComponentId, RequestView};
use super::error::{BaseError, BaseErrorKind};

/// The exact bytes that are MACed: one line per covered component, then the
/// `"@signature-params"` line, with no final newline.
#[derive(Clone, PartialEq, Eq)]
pub struct SignatureBase(String);

impl SignatureBase {
    /// The bytes to MAC.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SignatureBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SignatureBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureBase({:?})", self.0)
    }
}

pub(crate) struct SignatureBaseBuilder;

impl SignatureBaseBuilder {
    /// Builds the base for `covered` over `view`. `params_line` is the serialised inner list of
    /// the `Signature-Input` member (component list and parameters, order kept).
    pub(crate) fn build(
        view: &RequestView<'_>,
        covered: &[ComponentId],
        params_line: &str,
    ) -> Result<SignatureBase, BaseError> {
        let mut out = String::with_capacity(64 * (covered.len() + 1) + params_line.len());
        if covered.len() > 1 {
            let mut seen = HashSet::with_capacity(covered.len());
            for c in covered {
                if !seen.insert(c.as_serialized()) {
                    return Err(BaseError::new(BaseErrorKind::DuplicateComponent(
                        c.as_serialized().to_owned(),
                    )));
                }
            }
        }
        for c in covered {
            c.write_lines(view, &mut out)?;
        }
        out.push_str("\"@signature-params\": ");
        out.push_str(params_line);
        Ok(SignatureBase(out))
    }
}
