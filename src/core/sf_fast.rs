//! Borrowed RFC 8941 dictionaries for the three fields the verifier parses on every request
//! (`Signature-Input`, `Signature`, `Content-Digest`), with a strict fast-path parser and `sfv`
//! as the reference fallback.
//!
//! [`parse_dictionary`] accepts only the shapes conformant signers produce (no string escapes,
//! no decimals, byte sequences of at most 64 bytes, no repeated keys, a bounded number of
//! members and parameters) and then returns exactly what `sfv::Parser::parse_dictionary` would
//! return; for anything else it declines with `None`, and [`parse_or_fallback`] hands the input
//! to `sfv`, whose result is viewed through the same borrowed types. So the verifier has one
//! code path whatever parsed the field, and a field the fast path cannot prove equivalent is
//! never interpreted by it. tests/core_fastpath.rs checks fast == sfv differentially.
//!
//! On the verifier's hot path the same grammar is run as two scans that materialise nothing:
//! [`scan_signature_input`] (covered names and the profile's parameters per member) and
//! [`scan_byte_members`] (`Signature`, `Content-Digest`: the wanted byte sequences decoded in
//! place). Each accepts exactly what [`parse_dictionary`] accepts (tests/core_fastpath.rs checks
//! that too); when one declines, the verifier uses the parser.
//!
//! This module is public only for those tests; it is not a stable API.

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// Longest byte sequence the fast path decodes inline (a SHA-512 digest).
pub const MAX_INLINE_BYTES: usize = 64;
/// Most dictionary members the fast path accepts (duplicate keys are checked by a linear scan).
pub const MAX_FAST_MEMBERS: usize = 16;
/// Most parameters on one item or inner list the fast path accepts.
pub const MAX_FAST_PARAMS: usize = 16;

/// The base64 engine `sfv` 0.10 decodes byte sequences with (padding optional, trailing bits
/// allowed), so the fast path accepts and decodes exactly the same texts.
const SFV_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_encode_padding(true),
);

/// A byte sequence: decoded inline by the fast path, or borrowed from an `sfv` value.
#[derive(Clone, Copy)]
pub enum ByteSeq<'a> {
    /// Decoded by the fast path (at most [`MAX_INLINE_BYTES`]).
    Inline {
        /// Number of valid bytes in `buf`.
        len: u8,
        /// The bytes, valid up to `len`.
        buf: [u8; MAX_INLINE_BYTES],
    },
    /// Borrowed from an `sfv` parse.
    Borrowed(&'a [u8]),
}

impl ByteSeq<'_> {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ByteSeq::Inline { len, buf } => buf.get(..usize::from(*len)).unwrap_or(&[]),
            ByteSeq::Borrowed(b) => b,
        }
    }
}

impl PartialEq for ByteSeq<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl fmt::Debug for ByteSeq<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteSeq({:?})", self.as_slice())
    }
}

/// A bare item, borrowing its text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bare<'a> {
    /// An integer.
    Integer(i64),
    /// A decimal (only from the `sfv` fallback; the fast path declines decimals).
    Decimal(sfv::Decimal),
    /// A string, unescaped.
    String(&'a str),
    /// A token.
    Token(&'a str),
    /// A byte sequence, decoded.
    ByteSeq(ByteSeq<'a>),
    /// A boolean.
    Boolean(bool),
}

/// Parameters in the order received; keys are unique.
pub type Params<'a> = Vec<(&'a str, Bare<'a>)>;

/// Looks a parameter up by name.
pub fn param<'p, 'a>(params: &'p [(&'a str, Bare<'a>)], name: &str) -> Option<&'p Bare<'a>> {
    params.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// An item with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<'a> {
    /// The value.
    pub bare: Bare<'a>,
    /// Its parameters.
    pub params: Params<'a>,
}

/// An inner list with its parameters.
#[derive(Debug, Clone)]
pub struct InnerList<'a> {
    /// The items.
    pub items: Vec<Item<'a>>,
    /// The list's parameters.
    pub params: Params<'a>,
    /// The received text of the whole inner list (`(...)` and its parameters) when the fast
    /// path saw it written exactly as RFC 8941 serialises it (single spaces, no space after `;`,
    /// no `=?1`, no leading zeros, no byte sequences); `None` otherwise and for `sfv` input.
    /// The verifier then uses this text as the `@signature-params` value instead of
    /// re-serialising (tests/core_perf_canonical.rs checks it equals [`write_inner_list`]).
    pub canonical: Option<&'a str>,
}

/// Equality of the parsed values; `canonical` (a property of the text) is not compared.
impl PartialEq for InnerList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.items == other.items && self.params == other.params
    }
}

/// A dictionary member's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry<'a> {
    /// An item.
    Item(Item<'a>),
    /// An inner list.
    InnerList(InnerList<'a>),
}

/// A dictionary: members in order, keys unique.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dict<'a> {
    /// The members.
    pub members: Vec<(&'a str, Entry<'a>)>,
}

impl<'a> Dict<'a> {
    /// The member named `key`.
    pub fn get(&self, key: &str) -> Option<&Entry<'a>> {
        self.members.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// A view of a dictionary `sfv` parsed.
    pub fn from_sfv(dict: &'a sfv::Dictionary) -> Self {
        Dict {
            members: dict
                .iter()
                .map(|(k, v)| {
                    let entry = match v {
                        sfv::ListEntry::Item(item) => Entry::Item(Item::from_sfv(item)),
                        sfv::ListEntry::InnerList(il) => Entry::InnerList(InnerList {
                            items: il.items.iter().map(Item::from_sfv).collect(),
                            params: params_from_sfv(&il.params),
                            canonical: None,
                        }),
                    };
                    (k.as_str(), entry)
                })
                .collect(),
        }
    }

    /// The same dictionary as `sfv` values (for the differential tests).
    pub fn to_sfv(&self) -> sfv::Dictionary {
        self.members
            .iter()
            .map(|(k, v)| {
                let entry = match v {
                    Entry::Item(item) => sfv::ListEntry::Item(item.to_sfv()),
                    Entry::InnerList(il) => sfv::ListEntry::InnerList(sfv::InnerList {
                        items: il.items.iter().map(Item::to_sfv).collect(),
                        params: params_to_sfv(&il.params),
                    }),
                };
                ((*k).to_owned(), entry)
            })
            .collect()
    }
}

impl<'a> Item<'a> {
    /// A view of an item `sfv` parsed.
    pub fn from_sfv(item: &'a sfv::Item) -> Self {
        Item {
            bare: bare_from_sfv(&item.bare_item),
            params: params_from_sfv(&item.params),
        }
    }

    /// The same item as an `sfv` value.
    pub fn to_sfv(&self) -> sfv::Item {
        sfv::Item {
            bare_item: bare_to_sfv(&self.bare),
            params: params_to_sfv(&self.params),
        }
    }
}

fn bare_from_sfv(b: &sfv::BareItem) -> Bare<'_> {
    match b {
        sfv::BareItem::Integer(v) => Bare::Integer(*v),
        sfv::BareItem::Decimal(v) => Bare::Decimal(*v),
        sfv::BareItem::String(v) => Bare::String(v),
        sfv::BareItem::Token(v) => Bare::Token(v),
        sfv::BareItem::ByteSeq(v) => Bare::ByteSeq(ByteSeq::Borrowed(v)),
        sfv::BareItem::Boolean(v) => Bare::Boolean(*v),
    }
}

fn bare_to_sfv(b: &Bare<'_>) -> sfv::BareItem {
    match b {
        Bare::Integer(v) => sfv::BareItem::Integer(*v),
        Bare::Decimal(v) => sfv::BareItem::Decimal(*v),
        Bare::String(v) => sfv::BareItem::String((*v).to_owned()),
        Bare::Token(v) => sfv::BareItem::Token((*v).to_owned()),
        Bare::ByteSeq(v) => sfv::BareItem::ByteSeq(v.as_slice().to_vec()),
        Bare::Boolean(v) => sfv::BareItem::Boolean(*v),
    }
}

fn params_from_sfv(p: &sfv::Parameters) -> Params<'_> {
    p.iter()
        .map(|(k, v)| (k.as_str(), bare_from_sfv(v)))
        .collect()
}

fn params_to_sfv(p: &[(&str, Bare<'_>)]) -> sfv::Parameters {
    p.iter()
        .map(|(k, v)| ((*k).to_owned(), bare_to_sfv(v)))
        .collect()
}

/// Parses with the fast path, else with `sfv` into `slot` (which the result then borrows).
/// `Err` when `sfv` rejects the input.
pub fn parse_or_fallback<'a>(
    input: &'a [u8],
    slot: &'a mut Option<sfv::Dictionary>,
) -> Result<Dict<'a>, &'static str> {
    fold_or_fallback(input, slot, |dict: &mut Dict<'a>, key, entry| {
        dict.members.push((key, entry));
    })
}

/// Folds the members of a dictionary, in order, into a fresh `S`: with the fast path, else (if
/// it declines) with `sfv` into `slot`, starting again from `S::default()`. So `S` only ever sees
/// the members of one complete, valid parse. `Err` when `sfv` rejects the input.
///
/// The verifier folds instead of collecting so that it keeps only the members it wants,
/// without allocating a member list.
pub fn fold_or_fallback<'a, S: Default>(
    input: &'a [u8],
    slot: &'a mut Option<sfv::Dictionary>,
    mut f: impl FnMut(&mut S, &'a str, Entry<'a>),
) -> Result<S, &'static str> {
    let mut state = S::default();
    if fold_dictionary(input, &mut |key, entry| f(&mut state, key, entry)).is_some() {
        return Ok(state);
    }
    fold_sfv(input, slot, f)
}

/// [`fold_or_fallback`] for text the caller already holds as `&str` (a field value it checked),
/// which saves the fast path's UTF-8 check.
pub fn fold_or_fallback_str<'a, S: Default>(
    input: &'a str,
    slot: &'a mut Option<sfv::Dictionary>,
    mut f: impl FnMut(&mut S, &'a str, Entry<'a>),
) -> Result<S, &'static str> {
    let mut state = S::default();
    if input.is_ascii() && fold_text(input, &mut |key, entry| f(&mut state, key, entry)).is_some() {
        return Ok(state);
    }
    fold_sfv(input.as_bytes(), slot, f)
}

/// The `sfv` half of [`fold_or_fallback`].
fn fold_sfv<'a, S: Default>(
    input: &'a [u8],
    slot: &'a mut Option<sfv::Dictionary>,
    mut f: impl FnMut(&mut S, &'a str, Entry<'a>),
) -> Result<S, &'static str> {
    let parsed = slot.insert(sfv::Parser::parse_dictionary(input)?);
    let mut state = S::default();
    for (key, entry) in Dict::from_sfv(parsed).members {
        f(&mut state, key, entry);
    }
    Ok(state)
}

/// The fast path: `Some` only when the input is a dictionary of the supported shapes, and then
/// equal to what `sfv` 0.10 parses; `None` otherwise (including for every invalid input).
pub fn parse_dictionary(input: &[u8]) -> Option<Dict<'_>> {
    let mut dict = Dict::default();
    fold_dictionary(input, &mut |key, entry| dict.members.push((key, entry)))?;
    Some(dict)
}

/// The fast path as a fold: calls `f` for each member in order and returns `Some` if the whole
/// input was accepted. On `None`, `f` may have seen a prefix of the members; callers discard
/// what they built.
fn fold_dictionary<'a>(input: &'a [u8], f: &mut dyn FnMut(&'a str, Entry<'a>)) -> Option<()> {
    if !input.is_ascii() {
        return None;
    }
    fold_text(std::str::from_utf8(input).ok()?, f)
}

/// [`fold_dictionary`] on ASCII text.
fn fold_text<'a>(text: &'a str, f: &mut dyn FnMut(&'a str, Entry<'a>)) -> Option<()> {
    dictionary_with(text, &mut |cur, _| cur.entry(), f)
}

/// The dictionary grammar of the fast path, shared by every reader of it: keys, separators,
/// repeated keys (declined), with each member's value parsed by `value` (called with the cursor
/// just after the key, and the key) and handed to `emit` once its key is known to be new.
fn dictionary_with<'a, T>(
    text: &'a str,
    value: &mut dyn FnMut(&mut Cursor<'a>, &'a str) -> Option<T>,
    emit: &mut dyn FnMut(&'a str, T),
) -> Option<()> {
    let mut cur = Cursor {
        text,
        pos: 0,
        tidy: true,
    };
    cur.skip_sp();
    // Keys seen so far, for the repeated-key check, without allocating.
    let mut keys: [&str; MAX_FAST_MEMBERS] = [""; MAX_FAST_MEMBERS];
    let mut count = 0;
    if cur.at_end() {
        return Some(());
    }
    loop {
        let key = cur.key()?;
        let entry = value(&mut cur, key)?;
        // `sfv` keeps the first position and the last value of a repeated key; declining is
        // simpler than reproducing that.
        let seen = keys.get(..count)?;
        if seen.contains(&key) {
            return None;
        }
        *keys.get_mut(count)? = key;
        count += 1;
        emit(key, entry);
        cur.skip_ows();
        if cur.at_end() {
            return Some(());
        }
        if cur.peek() != Some(b',') {
            return None;
        }
        cur.pos += 1;
        cur.skip_ows();
        if cur.at_end() {
            return None;
        }
    }
}

/// What [`scan_byte_members`] found under one wanted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScannedKind {
    /// No such member.
    Missing,
    /// An item whose value is a byte sequence (in [`ScannedBytes::as_slice`]).
    Bytes,
    /// An item of another type.
    NotBytes,
    /// An inner list.
    InnerList,
}

/// One wanted member of a [`scan_byte_members`] scan.
#[derive(Debug, Clone, Copy)]
pub struct ScannedBytes {
    /// What the member is.
    pub kind: ScannedKind,
    len: usize,
    buf: [u8; MAX_INLINE_BYTES],
}

impl Default for ScannedBytes {
    fn default() -> Self {
        ScannedBytes {
            kind: ScannedKind::Missing,
            len: 0,
            buf: [0; MAX_INLINE_BYTES],
        }
    }
}

impl ScannedBytes {
    /// The decoded bytes (empty unless [`ScannedKind::Bytes`]).
    pub fn as_slice(&self) -> &[u8] {
        match self.kind {
            ScannedKind::Bytes => self.buf.get(..self.len).unwrap_or_default(),
            _ => &[],
        }
    }
}

/// The scan of a dictionary of byte sequences (`Signature`, `Content-Digest`): the same grammar
/// and acceptance as the fast path ([`parse_dictionary`] accepts exactly the texts this
/// accepts), filling `out[i]` with what the member named `wanted[i]` is, its bytes decoded
/// straight into it; nothing is materialised for those members. `None` when the fast path
/// declines (then `out` holds nothing meaningful). The `wanted` keys are distinct (a repeated
/// one fills only its first slot).
pub fn scan_byte_members(text: &str, wanted: &[&str], out: &mut [ScannedBytes]) -> Option<()> {
    if !text.is_ascii() {
        return None;
    }
    dictionary_with(
        text,
        &mut |cur, key| cur.byte_member(key, wanted, out),
        &mut |_, ()| {},
    )
}

/// The exact-shape reader of a byte-sequence dictionary (`Signature`, `Content-Digest` as the
/// countersign signer writes them): `Some(len)` only when `text` is the one member
/// `<key>=:<base64>:`, nothing before or after, no parameters, `key` a valid key and the base64
/// decoding (as [`scan_byte_members`] decodes it) into `out`; the bytes are then `out[..len]`.
/// On that subset [`scan_byte_members`] finds exactly this member with these bytes (whatever
/// decodes under the engine consists of characters it reads as base64). Anything else is
/// `None`: the caller then runs the scan.
pub fn match_byte_member(text: &str, key: &str, out: &mut [u8; MAX_INLINE_BYTES]) -> Option<usize> {
    let key_bytes = key.as_bytes();
    if !matches!(key_bytes.first(), Some(b'*' | b'a'..=b'z'))
        || !key_bytes.iter().all(|&b| KEY_CHAR[usize::from(b)])
    {
        return None;
    }
    let b64 = text
        .strip_prefix(key)?
        .strip_prefix("=:")?
        .strip_suffix(':')?;
    SFV_BASE64.decode_slice(b64, out).ok()
}

/// Most covered components a [`ScannedList`] records (more: [`ScannedList::plain`] is false).
pub const MAX_SCANNED_ITEMS: usize = 16;

/// The parameters of a `Signature-Input` member that the countersign profile reads, each kept
/// only when it has the type the profile expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignatureParams<'a> {
    /// `created` (an integer).
    pub created: Option<i64>,
    /// `expires` (an integer).
    pub expires: Option<i64>,
    /// `nonce` (a string).
    pub nonce: Option<&'a str>,
    /// `keyid` (a string).
    pub keyid: Option<&'a str>,
    /// `alg` (a string).
    pub alg: Option<&'a str>,
    /// `tag` (a string).
    pub tag: Option<&'a str>,
    /// Some parameter is none of these, or one of these has another type.
    pub other: bool,
}

impl<'a> SignatureParams<'a> {
    /// The bit of a parameter name this struct keeps (for the repeated-name check), or 0.
    fn bit(name: &str) -> u8 {
        match name {
            "created" => 1,
            "expires" => 2,
            "nonce" => 4,
            "keyid" => 8,
            "alg" => 16,
            "tag" => 32,
            _ => 0,
        }
    }

    fn record(&mut self, bit: u8, value: Bare<'a>) {
        match (bit, value) {
            (1, Bare::Integer(v)) => self.created = Some(v),
            (2, Bare::Integer(v)) => self.expires = Some(v),
            (4, Bare::String(v)) => self.nonce = Some(v),
            (8, Bare::String(v)) => self.keyid = Some(v),
            (16, Bare::String(v)) => self.alg = Some(v),
            (32, Bare::String(v)) => self.tag = Some(v),
            _ => self.other = true,
        }
    }
}

/// A `Signature-Input` inner list as [`scan_signature_input`] sees it: no item or parameter
/// list materialised, only what the verifier's common case needs.
#[derive(Debug, Clone, Copy)]
pub struct ScannedList<'a> {
    /// The scanned text.
    text: &'a str,
    /// Where the covered names (the first [`MAX_SCANNED_ITEMS`]) lie in `text`, valid up to
    /// `len`. Offsets rather than `&str`s keep the struct small: it is moved per member.
    spans: [(u16, u16); MAX_SCANNED_ITEMS],
    len: usize,
    /// Every item is a string without parameters, there are at most [`MAX_SCANNED_ITEMS`],
    /// and each lies within the first 64 KiB of the text: then [`Self::name`] gives the whole
    /// covered list.
    pub plain: bool,
    /// The list's parameters.
    pub params: SignatureParams<'a>,
    /// As [`InnerList::canonical`].
    pub canonical: Option<&'a str>,
}

impl<'a> ScannedList<'a> {
    /// How many names were recorded.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no name was recorded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th covered name.
    pub fn name(&self, i: usize) -> Option<&'a str> {
        if i >= self.len {
            return None;
        }
        let (start, end) = *self.spans.get(i)?;
        self.text.get(usize::from(start)..usize::from(end))
    }

    fn push(&mut self, start: usize, end: usize) {
        match (u16::try_from(start), u16::try_from(end)) {
            (Ok(start), Ok(end)) if self.len < MAX_SCANNED_ITEMS => {
                if let Some(slot) = self.spans.get_mut(self.len) {
                    *slot = (start, end);
                }
                self.len += 1;
            }
            _ => self.plain = false,
        }
    }
}

/// A `Signature-Input` member as [`scan_signature_input`] sees it.
// Not boxed: the point of the scan is no allocation per member; the value is moved once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
pub enum ScannedMember<'a> {
    /// An item (never a signature's input).
    Item,
    /// An inner list.
    InnerList(ScannedList<'a>),
}

/// The verifier's scan of a `Signature-Input` value: the same grammar and acceptance as the fast
/// path ([`parse_dictionary`] accepts exactly the texts this accepts), calling `f` for each
/// member in order, but keeping only borrowed names and the profile's parameters of each inner
/// list, with no allocation for the members it is built for. `None` when the fast path declines
/// (then `f` may have seen a prefix; callers discard what they built).
pub fn scan_signature_input<'a>(
    text: &'a str,
    f: &mut dyn FnMut(&'a str, ScannedMember<'a>),
) -> Option<()> {
    if !text.is_ascii() {
        return None;
    }
    dictionary_with(text, &mut |cur, _| cur.scanned_member(), f)
}

/// A `Signature-Input` value of exactly the shape the countersign signer writes, as
/// [`match_signature_input_template`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateMatch<'a> {
    /// The member's key (the signature's label).
    pub label: &'a str,
    /// Which of the given covered-list texts the member's list is.
    pub list: usize,
    /// The parameters (all six of the profile's, each of its type, nothing else).
    pub params: SignatureParams<'a>,
    /// The inner list with its parameters (everything after `<label>=`), in serialised form.
    pub canonical: &'a str,
}

/// The exact-shape reader of `Signature-Input`: `Some` only when `text` is one member
/// `<key>=(<lists[i]>;created=<int>;expires=<int>;nonce="<s>";keyid="<s>";alg="hmac-sha256";tag="<s>"`,
/// with nothing before or after, where each `lists[i]` is a covered list as RFC 8941 serialises
/// it including the closing `)` (no list a prefix of another), each integer has 1 to 15 digits
/// and no leading zero, and each string has no escape. That is a subset of what
/// [`scan_signature_input`] accepts and decides, and on it the scan reports exactly this member
/// (a plain list, these parameters, `canonical` = the text after `=`). Anything else (another
/// order, more members, spaces, escapes, other parameters or types) is `None`: the caller then
/// runs the scan.
pub fn match_signature_input_template<'a, L: AsRef<str>>(
    text: &'a str,
    lists: &[L],
) -> Option<TemplateMatch<'a>> {
    let bytes = text.as_bytes();
    // The key, as `Cursor::key` reads it.
    if !matches!(bytes.first(), Some(b'*' | b'a'..=b'z')) {
        return None;
    }
    let key_len = bytes.iter().position(|&b| !KEY_CHAR[usize::from(b)])?;
    let label = text.get(..key_len)?;
    let mut pos = key_len;
    let expect = |pos: &mut usize, literal: &[u8]| -> Option<()> {
        let end = *pos + literal.len();
        (bytes.get(*pos..end)? == literal).then(|| *pos = end)
    };
    expect(&mut pos, b"=(")?;
    let canonical_start = key_len + 1;
    let list = lists.iter().position(|l| {
        let l = l.as_ref().as_bytes();
        bytes.get(pos..pos + l.len()) == Some(l)
    })?;
    pos += lists.get(list)?.as_ref().len();
    expect(&mut pos, b";created=")?;
    let created = template_integer(bytes, &mut pos)?;
    expect(&mut pos, b";expires=")?;
    let expires = template_integer(bytes, &mut pos)?;
    expect(&mut pos, b";nonce=\"")?;
    let nonce = template_string(text, &mut pos)?;
    expect(&mut pos, b";keyid=\"")?;
    let keyid = template_string(text, &mut pos)?;
    expect(&mut pos, b";alg=\"hmac-sha256\";tag=\"")?;
    let tag = template_string(text, &mut pos)?;
    if pos != bytes.len() {
        return None;
    }
    Some(TemplateMatch {
        label,
        list,
        params: SignatureParams {
            created: Some(created),
            expires: Some(expires),
            nonce: Some(nonce),
            keyid: Some(keyid),
            alg: Some("hmac-sha256"),
            tag: Some(tag),
            other: false,
        },
        canonical: text.get(canonical_start..)?,
    })
}

/// An integer of the template: 1 to 15 digits (more: sfv rejects it), no leading zero (not in
/// serialised form).
fn template_integer(bytes: &[u8], pos: &mut usize) -> Option<i64> {
    let digits = bytes.get(*pos..)?;
    let mut value = 0i64;
    let mut len = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        if len == 15 {
            return None;
        }
        value = value * 10 + i64::from(b - b'0');
        len += 1;
    }
    if len == 0 || (len > 1 && digits.first() == Some(&b'0')) {
        return None;
    }
    *pos += len;
    Some(value)
}

/// A string of the template after its opening `"`: plain characters up to the closing `"`
/// (an escape or any other byte: `None`).
fn template_string<'a>(text: &'a str, pos: &mut usize) -> Option<&'a str> {
    let start = *pos;
    let rest = text.as_bytes().get(start..)?;
    let len = rest
        .iter()
        .position(|&b| !PLAIN_STRING_CHAR[usize::from(b)])?;
    if rest.get(len) != Some(&b'"') {
        return None;
    }
    *pos = start + len + 1;
    text.get(start..start + len)
}

/// Byte classes as lookup tables (one load per byte instead of a chain of comparisons), built
/// at compile time from the predicate.
macro_rules! class_table {
    (|$b:ident| $pred:expr) => {{
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            table[i] = $pred;
            i += 1;
        }
        table
    }};
}

const fn is_tchar_or_colon_slash(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
                | b':'
                | b'/'
        )
}

/// Characters after a token's first.
static TOKEN_CHAR: [bool; 256] = class_table!(|b| is_tchar_or_colon_slash(b));
/// Characters after a key's first.
static KEY_CHAR: [bool; 256] =
    class_table!(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'.'));
/// Characters of a string the fast path takes as they are (visible ASCII and space, except
/// `"` and `\`, which end the string or need unescaping).
static PLAIN_STRING_CHAR: [bool; 256] =
    class_table!(|b| b >= 0x20 && b < 0x7f && b != b'"' && b != b'\\');
/// Decimal digits.
static DIGIT: [bool; 256] = class_table!(|b| b.is_ascii_digit());
/// Characters sfv admits inside a byte sequence.
static BASE64_CHAR: [bool; 256] =
    class_table!(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'=' | b'/'));

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
    /// False once anything since the last reset was written other than as RFC 8941
    /// serialises it (see [`InnerList::canonical`]).
    tidy: bool,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    /// Skips spaces; returns how many.
    fn count_sp(&mut self) -> usize {
        let start = self.pos;
        self.skip_sp();
        self.pos - start
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Advances over bytes in `class`; returns the text passed over.
    fn take_class(&mut self, class: &[bool; 256]) -> Option<&'a str> {
        let start = self.pos;
        let rest = self.text.as_bytes().get(start..)?;
        let len = rest
            .iter()
            .position(|&b| !class[usize::from(b)])
            .unwrap_or(rest.len());
        self.pos = start + len;
        self.text.get(start..self.pos)
    }

    fn key(&mut self) -> Option<&'a str> {
        match self.peek() {
            Some(b'*' | b'a'..=b'z') => {}
            _ => return None,
        }
        self.take_class(&KEY_CHAR)
    }

    /// A dictionary member's value, after its key.
    fn entry(&mut self) -> Option<Entry<'a>> {
        if self.peek() == Some(b'=') {
            self.pos += 1;
            if self.peek() == Some(b'(') {
                Some(Entry::InnerList(self.inner_list()?))
            } else {
                Some(Entry::Item(self.item()?))
            }
        } else {
            Some(Entry::Item(Item {
                bare: Bare::Boolean(true),
                params: self.params()?,
            }))
        }
    }

    /// [`Self::entry`] as [`scan_signature_input`] keeps it: the grammar of
    /// [`Self::inner_list_with`] and [`Self::params_each`], written out for the common shape
    /// (string items without parameters) so that nothing is materialised or moved per item.
    fn scanned_member(&mut self) -> Option<ScannedMember<'a>> {
        if self.peek() != Some(b'=') || self.text.as_bytes().get(self.pos + 1) != Some(&b'(') {
            self.entry()?;
            return Some(ScannedMember::Item);
        }
        self.pos += 1;
        let start = self.pos;
        self.pos += 1;
        self.tidy = true;
        let mut list = ScannedList {
            text: self.text,
            spans: [(0, 0); MAX_SCANNED_ITEMS],
            len: 0,
            plain: true,
            params: SignatureParams::default(),
            canonical: None,
        };
        let mut first = true;
        loop {
            // Serialised: no space after `(` or before `)`, one between items.
            let spaces = self.count_sp();
            match self.peek() {
                None => return None,
                Some(b')') => {
                    if spaces != 0 {
                        self.tidy = false;
                    }
                    self.pos += 1;
                    self.signature_params(&mut list.params)?;
                    if self.tidy {
                        list.canonical = self.text.get(start..self.pos);
                    }
                    return Some(ScannedMember::InnerList(list));
                }
                Some(b'"') => {
                    if spaces != usize::from(!first) {
                        self.tidy = false;
                    }
                    // As `bare` reads a string.
                    self.pos += 1;
                    let name_start = self.pos;
                    self.take_class(&PLAIN_STRING_CHAR)?;
                    let name_end = self.pos;
                    if self.peek() != Some(b'"') {
                        return None;
                    }
                    self.pos += 1;
                    if self.peek() == Some(b';') {
                        self.params()?;
                        list.plain = false;
                    } else {
                        list.push(name_start, name_end);
                    }
                }
                Some(_) => {
                    if spaces != usize::from(!first) {
                        self.tidy = false;
                    }
                    self.item()?;
                    list.plain = false;
                }
            }
            first = false;
            match self.peek() {
                Some(b' ' | b')') => {}
                _ => return None,
            }
        }
    }

    /// [`Self::params_each`] into [`SignatureParams`]: the same grammar, limits and
    /// repeated-name check, with the profile's names told apart by a bit.
    fn signature_params(&mut self, out: &mut SignatureParams<'a>) -> Option<()> {
        let mut seen = 0u8;
        let mut others: [&str; MAX_FAST_PARAMS] = [""; MAX_FAST_PARAMS];
        let mut other_count = 0;
        let mut count = 0;
        while self.peek() == Some(b';') {
            let (key, value) = self.param_after_semicolon()?;
            if count >= MAX_FAST_PARAMS {
                return None;
            }
            count += 1;
            let bit = SignatureParams::bit(key);
            if bit != 0 {
                if seen & bit != 0 {
                    return None;
                }
                seen |= bit;
            } else {
                if others.get(..other_count)?.contains(&key) {
                    return None;
                }
                *others.get_mut(other_count)? = key;
                other_count += 1;
            }
            out.record(bit, value);
        }
        Some(())
    }

    fn inner_list(&mut self) -> Option<InnerList<'a>> {
        let mut items = Vec::with_capacity(8);
        let mut params = Vec::new();
        let canonical = self.inner_list_with(&mut |item| items.push(item), &mut |key, value| {
            if params.capacity() == 0 {
                params.reserve(8);
            }
            params.push((key, value));
        })?;
        Some(InnerList {
            items,
            params,
            canonical,
        })
    }

    /// The inner-list grammar: hands each item and then each of the list's parameters over
    /// as parsed; returns the list's canonical text (see [`InnerList::canonical`]).
    fn inner_list_with(
        &mut self,
        on_item: &mut dyn FnMut(Item<'a>),
        on_param: &mut dyn FnMut(&'a str, Bare<'a>),
    ) -> Option<Option<&'a str>> {
        if self.peek() != Some(b'(') {
            return None;
        }
        let start = self.pos;
        self.pos += 1;
        self.tidy = true;
        let mut first = true;
        loop {
            // Serialised: no space after `(` or before `)`, one between items.
            let spaces = self.count_sp();
            match self.peek() {
                None => return None,
                Some(b')') => {
                    if spaces != 0 {
                        self.tidy = false;
                    }
                    self.pos += 1;
                    self.params_each(on_param)?;
                    let canonical = if self.tidy {
                        self.text.get(start..self.pos)
                    } else {
                        None
                    };
                    return Some(canonical);
                }
                Some(_) => {
                    if spaces != usize::from(!first) {
                        self.tidy = false;
                    }
                }
            }
            on_item(self.item()?);
            first = false;
            match self.peek() {
                Some(b' ' | b')') => {}
                _ => return None,
            }
        }
    }

    fn item(&mut self) -> Option<Item<'a>> {
        let bare = self.bare()?;
        let params = self.params()?;
        Some(Item { bare, params })
    }

    fn params(&mut self) -> Option<Params<'a>> {
        let mut params = Vec::new();
        self.params_each(&mut |key, value| {
            if params.capacity() == 0 {
                params.reserve(8);
            }
            params.push((key, value));
        })?;
        Some(params)
    }

    /// One parameter, `;` already seen: the key and its value (`true` when it has none).
    /// Shared by [`Self::params_each`] and [`Self::signature_params`].
    #[inline]
    fn param_after_semicolon(&mut self) -> Option<(&'a str, Bare<'a>)> {
        self.pos += 1;
        if self.count_sp() != 0 {
            self.tidy = false;
        }
        let key = self.key()?;
        if self.peek() != Some(b'=') {
            return Some((key, Bare::Boolean(true)));
        }
        self.pos += 1;
        let value = self.bare()?;
        // `true` serialises as the bare key.
        if matches!(value, Bare::Boolean(true)) {
            self.tidy = false;
        }
        Some((key, value))
    }

    /// The parameter grammar: hands each parameter over in order, without collecting them.
    fn params_each(&mut self, f: &mut dyn FnMut(&'a str, Bare<'a>)) -> Option<()> {
        // Keys seen so far, for the repeated-key check, without allocating.
        let mut keys: [&str; MAX_FAST_PARAMS] = [""; MAX_FAST_PARAMS];
        let mut count = 0;
        while self.peek() == Some(b';') {
            let (key, value) = self.param_after_semicolon()?;
            // As for dictionary keys: `sfv` lets a repeated parameter overwrite in place.
            let seen = keys.get(..count)?;
            if seen.contains(&key) {
                return None;
            }
            *keys.get_mut(count)? = key;
            count += 1;
            f(key, value);
        }
        Some(())
    }

    /// A byte sequence (the cursor on its opening `:`), decoded into `buf`; its length.
    fn byte_seq_into(&mut self, buf: &mut [u8; MAX_INLINE_BYTES]) -> Option<usize> {
        if self.peek() != Some(b':') {
            return None;
        }
        self.pos += 1;
        let b64 = self.take_class(&BASE64_CHAR)?;
        if self.peek() != Some(b':') {
            return None;
        }
        self.pos += 1;
        // Padding and trailing bits may differ from the serialisation: not tidy.
        self.tidy = false;
        SFV_BASE64.decode_slice(b64, buf).ok()
    }

    /// [`Self::entry`] for [`scan_byte_members`]: a member named in `wanted` is classified
    /// into its slot of `out` (a byte sequence decoded straight into it); others are only
    /// checked.
    fn byte_member(&mut self, key: &str, wanted: &[&str], out: &mut [ScannedBytes]) -> Option<()> {
        let Some(slot) = wanted
            .iter()
            .position(|w| *w == key)
            .and_then(|i| out.get_mut(i))
        else {
            self.entry()?;
            return Some(());
        };
        if self.peek() == Some(b'=') && self.text.as_bytes().get(self.pos + 1) == Some(&b':') {
            self.pos += 1;
            let len = self.byte_seq_into(&mut slot.buf)?;
            // As `bare` stores it inline.
            u8::try_from(len).ok()?;
            self.params()?;
            slot.len = len;
            slot.kind = ScannedKind::Bytes;
        } else {
            slot.kind = match self.entry()? {
                Entry::Item(_) => ScannedKind::NotBytes,
                Entry::InnerList(_) => ScannedKind::InnerList,
            };
        }
        Some(())
    }

    fn bare(&mut self) -> Option<Bare<'a>> {
        match self.peek()? {
            b'?' => {
                let value = match self.text.as_bytes().get(self.pos + 1)? {
                    b'0' => false,
                    b'1' => true,
                    _ => return None,
                };
                self.pos += 2;
                Some(Bare::Boolean(value))
            }
            b'"' => {
                self.pos += 1;
                // Escapes would need unescaping into new storage: declined.
                let s = self.take_class(&PLAIN_STRING_CHAR)?;
                if self.peek() != Some(b'"') {
                    return None;
                }
                self.pos += 1;
                Some(Bare::String(s))
            }
            b':' => {
                let mut buf = [0u8; MAX_INLINE_BYTES];
                let len = self.byte_seq_into(&mut buf)?;
                Some(Bare::ByteSeq(ByteSeq::Inline {
                    len: u8::try_from(len).ok()?,
                    buf,
                }))
            }
            b if b == b'*' || b.is_ascii_alphabetic() => {
                let token = self.take_class(&TOKEN_CHAR)?;
                Some(Bare::Token(token))
            }
            b if b == b'-' || b.is_ascii_digit() => {
                let negative = b == b'-';
                if negative {
                    self.pos += 1;
                }
                let digits = self.take_class(&DIGIT)?;
                // `sfv` rejects more than 15 digits; a `.` makes a decimal, which is declined.
                if digits.is_empty() || digits.len() > 15 || self.peek() == Some(b'.') {
                    return None;
                }
                // Leading zeros and `-0` serialise differently.
                if (digits.len() > 1 && digits.starts_with('0')) || (negative && digits == "0") {
                    self.tidy = false;
                }
                let magnitude: i64 = digits.parse().ok()?;
                Some(Bare::Integer(if negative { -magnitude } else { magnitude }))
            }
            _ => None,
        }
    }
}

/// A value RFC 8941 cannot serialise (out-of-range integer, invalid string or token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSerializable;

impl fmt::Display for NotSerializable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("value cannot be serialised as a structured field")
    }
}

impl std::error::Error for NotSerializable {}

/// Appends `;name=value` for each parameter as RFC 8941 serialises it (`;name` alone for
/// `true`). `Err` for a value RFC 8941 cannot serialise (only possible for `sfv` input).
pub fn write_params(out: &mut String, params: &[(&str, Bare<'_>)]) -> Result<(), NotSerializable> {
    for (name, value) in params {
        out.push(';');
        out.push_str(name);
        if *value != Bare::Boolean(true) {
            out.push('=');
            write_bare(out, value)?;
        }
    }
    Ok(())
}

/// Appends one bare item as RFC 8941 serialises it.
pub fn write_bare(out: &mut String, value: &Bare<'_>) -> Result<(), NotSerializable> {
    match value {
        Bare::Boolean(b) => out.push_str(if *b { "?1" } else { "?0" }),
        Bare::Integer(v) => {
            if !(-999_999_999_999_999..=999_999_999_999_999).contains(v) {
                return Err(NotSerializable);
            }
            write_integer(out, *v);
        }
        Bare::String(s) => {
            if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(NotSerializable);
            }
            out.push('"');
            if s.bytes().any(|b| b == b'"' || b == b'\\') {
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
            } else {
                out.push_str(s);
            }
            out.push('"');
        }
        Bare::Token(t) => {
            let mut bytes = t.bytes();
            let first_ok = bytes
                .next()
                .is_some_and(|b| b == b'*' || b.is_ascii_alphabetic());
            if !first_ok
                || !bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b))
            {
                return Err(NotSerializable);
            }
            out.push_str(t);
        }
        Bare::ByteSeq(b) => {
            out.push(':');
            SFV_BASE64.encode_string(b.as_slice(), out);
            out.push(':');
        }
        Bare::Decimal(d) => {
            // Rare (fallback input only): sfv's own serialiser, for its range check, given the
            // canonical value (see `canonical_decimal`).
            sfv::RefItemSerializer::new(out)
                .bare_item(&sfv::RefBareItem::Decimal(canonical_decimal(*d)))
                .map_err(|_| NotSerializable)?;
        }
    }
    Ok(())
}

/// A decimal as RFC 8941 §4.1.5 serialises it: rounded to three fractional digits (ties to
/// even), then without trailing zeros (`1.50` is `1.5`, `2.000` is `2.0`, `-0.0` is `0.0`).
/// sfv 0.10 writes the parsed scale as it came (`1.50`), so a signature base holding a received
/// decimal would differ from a conformant peer's; normalised first, its serialiser writes the
/// canonical text (it adds `.0` to a whole number itself).
pub(crate) fn canonical_decimal(value: sfv::Decimal) -> sfv::Decimal {
    value.round_dp(3).normalize()
}

/// Every decimal of parsed list or dictionary members made canonical ([`canonical_decimal`]),
/// so that they serialise as RFC 8941 requires (the `;key` component re-serialises a
/// dictionary member, `signature_base_for` a `Signature-Input` member).
pub(crate) fn canonicalize_decimals<'a>(members: impl Iterator<Item = &'a mut sfv::ListEntry>) {
    fn bare(item: &mut sfv::BareItem) {
        if let sfv::BareItem::Decimal(d) = item {
            *d = canonical_decimal(*d);
        }
    }
    fn params(params: &mut sfv::Parameters) {
        params.values_mut().for_each(bare);
    }
    fn item(item: &mut sfv::Item) {
        bare(&mut item.bare_item);
        params(&mut item.params);
    }
    for member in members {
        match member {
            sfv::ListEntry::Item(i) => item(i),
            sfv::ListEntry::InnerList(list) => {
                list.items.iter_mut().for_each(item);
                params(&mut list.params);
            }
        }
    }
}

/// Appends the base64 of a short `bytes` (a digest, a MAC, a nonce) through a stack buffer:
/// `Engine::encode_string` goes through a chunked writer, dearer than the encoding itself at
/// these sizes.
pub(crate) fn push_base64(out: &mut String, engine: &impl base64::Engine, bytes: &[u8]) {
    let mut buf = [0u8; 128];
    match engine.encode_slice(bytes, &mut buf) {
        Ok(len) => {
            if let Some(Ok(text)) = buf.get(..len).map(std::str::from_utf8) {
                out.push_str(text);
            }
        }
        // Longer than the buffer.
        Err(_) => engine.encode_string(bytes, out),
    }
}

/// Appends the decimal digits of `v` without going through `core::fmt`.
pub fn write_integer(out: &mut String, v: i64) {
    if v < 0 {
        out.push('-');
    }
    write_u64(out, v.unsigned_abs());
}

/// Appends the decimal digits of `n`.
pub fn write_u64(out: &mut String, mut n: u64) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        // `n % 10` is a single digit.
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Pushed one by one: cheaper than validating the digits as UTF-8 to push them as a `&str`.
    for &digit in digits.get(start..).unwrap_or_default() {
        out.push(char::from(digit));
    }
}

/// Appends the serialisation of an inner list: `(item item);params`.
pub fn write_inner_list(out: &mut String, list: &InnerList<'_>) -> Result<(), NotSerializable> {
    out.push('(');
    for (i, item) in list.items.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        write_bare(out, &item.bare)?;
        write_params(out, &item.params)?;
    }
    out.push(')');
    write_params(out, &list.params)
}
