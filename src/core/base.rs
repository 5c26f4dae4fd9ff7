//! RFC 9421 §2.5: the signature base, its own type with `Display`.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Range;

use super::components::{ComponentId, LineCache, RequestView};
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
    pub(crate) fn build<C: Borrow<ComponentId>>(
        view: &RequestView<'_>,
        covered: &[C],
        params_line: &str,
    ) -> Result<SignatureBase, BaseError> {
        Self::build_known(view, covered, params_line, &[])
    }

    /// [`Self::build`] with the values of some covered fields given instead of read from the
    /// request (see [`Self::build_recording`]'s `known`).
    pub(crate) fn build_known<C: Borrow<ComponentId>>(
        view: &RequestView<'_>,
        covered: &[C],
        params_line: &str,
        known: &[(usize, &str)],
    ) -> Result<SignatureBase, BaseError> {
        if let Some(dup) = first_duplicate(covered) {
            return Err(BaseError::new(BaseErrorKind::DuplicateComponent(
                dup.as_serialized().to_owned(),
            )));
        }
        Self::build_recording(
            view,
            covered,
            params_line.len(),
            |out| {
                out.push_str(params_line);
                Ok(())
            },
            &mut [],
            known,
        )
    }

    /// The base for a `covered` list the caller has already checked for duplicates (see
    /// [`first_duplicate`]), with the `@signature-params` value written straight into the base
    /// by `write_params` (no intermediate string; `params_len` sizes the buffer), also recording
    /// where the lines of the first `lines.len()` covered components lie in the base (so a
    /// verifier can read a covered field's value back from the base instead of from the header
    /// map).
    ///
    /// `known` gives, for some positions in `covered`, the component's value as the caller
    /// already holds it (a field it has just read or is about to set): each must be a plain
    /// field component (no `;key`, `;bs`), and the value exactly what reading the field would
    /// give (its lines trimmed and joined with `", "`). Such a line is written without a
    /// header-map lookup.
    pub(crate) fn build_recording<C: Borrow<ComponentId>, E: From<BaseError>>(
        view: &RequestView<'_>,
        covered: &[C],
        params_len: usize,
        write_params: impl FnOnce(&mut String) -> Result<(), E>,
        lines: &mut [Range<usize>],
        known: &[(usize, &str)],
    ) -> Result<SignatureBase, E> {
        let mut out = String::with_capacity(64 * (covered.len() + 1) + params_len);
        let mut lines = lines.iter_mut();
        // What the components of this base parse, parsed once for all of them (empty, and
        // free, unless a `;key` or `@query-param` component is covered).
        let mut cache = LineCache::default();
        for (position, c) in covered.iter().enumerate() {
            let start = out.len();
            match known.iter().find(|(at, _)| *at == position) {
                Some((_, value)) => c.borrow().write_known_line(value, &mut out),
                None => c.borrow().write_lines(view, &mut out, &mut cache)?,
            }
            if let Some(line) = lines.next() {
                *line = start..out.len();
            }
        }
        out.push_str("\"@signature-params\": ");
        write_params(&mut out)?;
        Ok(SignatureBase(out))
    }
}

/// The first component identifier that occurs twice (compared as serialised), if any.
///
/// Signatures cover a handful of components, so a quadratic scan without allocation is the
/// cheapest check; a long list (a hostile `Signature-Input`) is sorted instead, to stay
/// O(n log n).
pub(crate) fn first_duplicate<C: Borrow<ComponentId>>(covered: &[C]) -> Option<&ComponentId> {
    const LINEAR_MAX: usize = 16;
    if covered.len() <= LINEAR_MAX {
        for (i, c) in covered.iter().enumerate() {
            let c = c.borrow();
            if covered[..i]
                .iter()
                .any(|earlier| earlier.borrow().as_serialized() == c.as_serialized())
            {
                return Some(c);
            }
        }
        return None;
    }
    let mut sorted: Vec<&ComponentId> = covered.iter().map(Borrow::borrow).collect();
    sorted.sort_unstable_by(|a, b| a.as_serialized().cmp(b.as_serialized()));
    sorted
        .windows(2)
        .find(|w| w[0].as_serialized() == w[1].as_serialized())
        .map(|w| w[1])
}
