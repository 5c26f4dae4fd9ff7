#!/usr/bin/env python3
"""Independent implementation of the countersign profile, written from docs/PROTOCOL.md only.

Stdlib only. A signer and a verifier of RFC 9421 (hmac-sha256) + RFC 9530 Content-Digest as the
"countersign profile" describes them, plus a differential harness against the real binary:

    python3 interop/spec_from_doc.py --countersign target/release/countersign

prints one line per check and `N passed, M failed`; exit status 1 when anything failed.
Where PROTOCOL.md left a choice open when this was written, the document has since been made
explicit (the comments cite its sections), so a check failing here means the document and the
implementation disagree: fix whichever is wrong. Run by scripts/interop.sh.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover
    tomllib = None

# ---------------------------------------------------------------------------------------------
# RFC 8941 structured fields
# ---------------------------------------------------------------------------------------------


class SFError(Exception):
    pass


class Token(str):
    """An sf-token (distinct from an sf-string)."""


class Dec:
    """An sf-decimal kept as (sign, integer digits, fraction digits) so it serialises exactly."""

    def __init__(self, neg, ip, fp):
        self.neg, self.ip, self.fp = neg, ip, fp

    def __eq__(self, o):
        return isinstance(o, Dec) and self.serialize() == o.serialize()

    def serialize(self):
        ip = self.ip.lstrip("0") or "0"
        fp = self.fp.rstrip("0") or "0"
        neg = self.neg and not (ip == "0" and fp == "0")
        return ("-" if neg else "") + ip + "." + fp


class Item:
    def __init__(self, value, params=None):
        self.value = value
        self.params = params if params is not None else {}


class InnerList:
    def __init__(self, items, params=None):
        self.items = items
        self.params = params if params is not None else {}


LCALPHA = "abcdefghijklmnopqrstuvwxyz"
ALPHA = LCALPHA + LCALPHA.upper()
DIGIT = "0123456789"
TCHAR = "!#$%&'*+-.^_`|~" + DIGIT + ALPHA
B64CH = ALPHA + DIGIT + "+/="


class _P:
    def __init__(self, s):
        self.s = s
        self.i = 0

    def eof(self):
        return self.i >= len(self.s)

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self):
        c = self.peek()
        self.i += 1
        return c

    def skip_sp(self):
        while self.peek() == " ":
            self.i += 1

    def skip_ows(self):
        while self.peek() in (" ", "\t") and not self.eof():
            self.i += 1

    def key(self):
        c = self.peek()
        if not c or not (c in LCALPHA or c == "*"):
            raise SFError("bad key")
        start = self.i
        while not self.eof() and (self.peek() in LCALPHA + DIGIT + "_-.*"):
            self.i += 1
        return self.s[start:self.i]

    def bare(self):
        c = self.peek()
        if c == "-" or (c and c in DIGIT):
            return self.number()
        if c == '"':
            return self.string()
        if c == ":":
            return self.binary()
        if c == "?":
            self.i += 1
            b = self.take()
            if b == "1":
                return True
            if b == "0":
                return False
            raise SFError("bad boolean")
        if c and (c in ALPHA or c == "*"):
            return self.token()
        raise SFError("bad bare item")

    def number(self):
        neg = False
        if self.peek() == "-":
            neg = True
            self.i += 1
        if not self.peek() or self.peek() not in DIGIT:
            raise SFError("bad number")
        num = ""
        is_dec = False
        while not self.eof():
            c = self.peek()
            if c in DIGIT:
                num += c
                self.i += 1
            elif not is_dec and c == ".":
                if len(num) > 12:
                    raise SFError("decimal too long")
                num += c
                is_dec = True
                self.i += 1
            else:
                break
            if not is_dec and len(num) > 15:
                raise SFError("integer too long")
            if is_dec and len(num) > 16:
                raise SFError("decimal too long")
        if not is_dec:
            return -int(num) if neg else int(num)
        ip, fp = num.split(".")
        if fp == "" or len(fp) > 3:
            raise SFError("bad decimal")
        return Dec(neg, ip, fp)

    def string(self):
        self.i += 1
        out = []
        while True:
            if self.eof():
                raise SFError("unterminated string")
            c = self.take()
            if c == "\\":
                if self.eof():
                    raise SFError("bad escape")
                n = self.take()
                if n not in ('"', "\\"):
                    raise SFError("bad escape")
                out.append(n)
            elif c == '"':
                return "".join(out)
            elif ord(c) < 0x20 or ord(c) > 0x7E:
                raise SFError("bad string char")
            else:
                out.append(c)

    def token(self):
        start = self.i
        self.i += 1
        while not self.eof() and (self.peek() in TCHAR or self.peek() in ":/"):
            self.i += 1
        return Token(self.s[start:self.i])

    def binary(self):
        self.i += 1
        start = self.i
        while not self.eof() and self.peek() != ":":
            if self.peek() not in B64CH:
                raise SFError("bad base64 char")
            self.i += 1
        if self.eof():
            raise SFError("unterminated byte sequence")
        txt = self.s[start:self.i]
        self.i += 1
        try:
            stripped = txt.rstrip("=")
            return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
        except Exception:
            raise SFError("bad base64")

    def params(self):
        ps = {}
        while self.peek() == ";":
            self.i += 1
            self.skip_sp()
            k = self.key()
            v = True
            if self.peek() == "=":
                self.i += 1
                v = self.bare()
            ps[k] = v  # RFC 8941: a repeated key overwrites the value, keeps its position
        return ps

    def item(self):
        v = self.bare()
        return Item(v, self.params())

    def item_or_list(self):
        if self.peek() == "(":
            return self.inner_list()
        return self.item()

    def inner_list(self):
        self.i += 1
        items = []
        while not self.eof():
            self.skip_sp()
            if self.peek() == ")":
                self.i += 1
                return InnerList(items, self.params())
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise SFError("bad inner list")
        raise SFError("unterminated inner list")


def sf_parse_dictionary(s):
    p = _P(s)
    p.skip_sp()
    d = {}
    while not p.eof():
        k = p.key()
        if p.peek() == "=":
            p.i += 1
            v = p.item_or_list()
        else:
            v = Item(True, p.params())
        d[k] = v
        p.skip_ows()
        if p.eof():
            return d
        if p.take() != ",":
            raise SFError("expected comma")
        p.skip_ows()
        if p.eof():
            raise SFError("trailing comma")
    return d


def sf_ser_bare(v):
    if v is True:
        return "?1"
    if v is False:
        return "?0"
    if isinstance(v, int):
        if abs(v) > 999999999999999:
            raise SFError("integer out of range")
        return str(v)
    if isinstance(v, Dec):
        return v.serialize()
    if isinstance(v, Token):
        return str(v)
    if isinstance(v, str):
        for ch in v:
            if ord(ch) < 0x20 or ord(ch) > 0x7E:
                raise SFError("string not serialisable")
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (bytes, bytearray)):
        return ":" + base64.b64encode(bytes(v)).decode() + ":"
    raise SFError("unknown type")


def sf_ser_params(ps):
    out = ""
    for k, v in ps.items():
        out += ";" + k
        if v is not True:
            out += "=" + sf_ser_bare(v)
    return out


def sf_ser_item(it):
    return sf_ser_bare(it.value) + sf_ser_params(it.params)


def sf_ser_member(m):
    if isinstance(m, InnerList):
        return "(" + " ".join(sf_ser_item(i) for i in m.items) + ")" + sf_ser_params(m.params)
    return sf_ser_item(m)


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1 request
# ---------------------------------------------------------------------------------------------


class Request:
    def __init__(self, method, target, headers, body, version="HTTP/1.1"):
        self.method = method  # str
        self.target = target  # str (request-target as sent)
        self.headers = list(headers)  # [(name str, value bytes)]
        self.body = body  # bytes
        self.version = version

    def lines(self, name):
        n = name.lower()
        return [v for (k, v) in self.headers if k.lower() == n]

    def remove(self, name):
        n = name.lower()
        self.headers = [(k, v) for (k, v) in self.headers if k.lower() != n]

    def add(self, name, value):
        self.headers.append((name, value if isinstance(value, bytes) else value.encode()))

    def to_bytes(self):
        out = ("%s %s %s\r\n" % (self.method, self.target, self.version)).encode("latin-1")
        for k, v in self.headers:
            out += k.encode() + b": " + v + b"\r\n"
        return out + b"\r\n" + self.body


def parse_raw(data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no end of head")
    lines = head.split(b"\r\n")
    method, target, version = lines[0].decode("latin-1").split(" ")
    headers = []
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers.append((k.decode("latin-1"), v.strip(b" \t")))
    body = rest
    cl = [v for (k, v) in headers if k.lower() == "content-length"]
    if cl:
        body = rest[: int(cl[0])]
    return Request(method, target, headers, body, version)


def split_target(req):
    """-> (uri_scheme or None, uri_authority or None, path, query or None, path_and_query)."""
    t = req.target
    if req.method == "CONNECT" and not t.startswith("/"):
        return None, t, "", None, ""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", t)
    scheme = authority = None
    if m:
        scheme, authority, t = m.group(1).lower(), m.group(2), m.group(3)
    path, q, query = t.partition("?")
    return scheme, authority, path, (query if q else None), t


# ---------------------------------------------------------------------------------------------
# The signature base (PROTOCOL.md §3)
# ---------------------------------------------------------------------------------------------


class BaseError(Exception):
    pass


SP_HTAB = b" \t"
FIELD_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
DERIVED = {"@method", "@authority", "@scheme", "@target-uri", "@request-target", "@path",
           "@query", "@query-param"}


def normalise_authority(raw, scheme):
    a = raw.strip(" \t")
    if "@" in a:
        a = a[a.rfind("@") + 1:]
    if not a or any(ord(c) < 0x21 or ord(c) > 0x7E or c in "/?#" for c in a):
        raise BaseError("bad authority")
    # An IPv6 literal is bracketed on both sides: a lone `[` or `]` is an error.
    if a.startswith("[") != ("]" in a):
        raise BaseError("unbalanced brackets in authority")
    # "outside the brackets it may hold at most one `:`, with a host before it".
    outside = a[a.rfind("]") + 1:] if "]" in a else a
    if outside.count(":") > 1 or a.startswith(":"):
        raise BaseError("ambiguous port in authority")
    a = a.lower()
    after = a[a.rfind("]") + 1:] if "]" in a else a
    # "ends in exactly :80 ... and that `:` is not inside an IPv6 literal's brackets".
    # "an empty port (`h:`, `[::1]:`) has its `:` removed, whatever the scheme".
    if after.endswith(":"):
        a = a[:-1]
    elif scheme in ("http", "ws") and after.endswith(":80"):
        a = a[:-3]
    elif scheme in ("https", "wss") and after.endswith(":443"):
        a = a[:-4]
    return a


def field_value(req, name):
    lines = req.lines(name)
    if not lines:
        raise BaseError("covered field absent: " + name)
    parts = []
    for v in lines:
        v = v.strip(SP_HTAB)
        if any(not (0x20 <= b <= 0x7E or b == 0x09) for b in v):
            raise BaseError("obs-text in field " + name)
        parts.append(v.decode("ascii"))
    return ", ".join(parts)


def printable(s):
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in s):
        raise BaseError("non-printable derived component")
    return s


QP_SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-._")


def _pct_decode(b):
    out = bytearray()
    i = 0
    while i < len(b):
        if b[i] == 0x25 and i + 2 < len(b) + 0 and all(chr(x) in "0123456789abcdefABCDEF" for x in b[i + 1:i + 3]) and len(b[i + 1:i + 3]) == 2:
            out.append(int(b[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def _qp_encode(s):
    return "".join(chr(b) if b in QP_SAFE else "%%%02X" % b for b in s.encode("utf-8"))


def query_params(query):
    out = []
    for piece in (query or "").encode("latin-1").split(b"&"):
        if not piece:
            continue  # §3.1: empty pieces (a&&b) are skipped
        n, _, v = piece.partition(b"=")
        n = _pct_decode(n.replace(b"+", b" ")).decode("utf-8", "replace")
        v = _pct_decode(v.replace(b"+", b" ")).decode("utf-8", "replace")
        out.append((_qp_encode(n), _qp_encode(v)))
    return out


def validate_component(it):
    """PROTOCOL.md §3.1 identifier rules; raises BaseError."""
    if not isinstance(it.value, str) or isinstance(it.value, Token):
        raise BaseError("identifier not a string")
    name = it.value
    ps = it.params
    if name.startswith("@"):
        if name not in DERIVED:
            raise BaseError("unknown derived component")
        if name == "@query-param":
            if list(ps.keys()) != ["name"] or not isinstance(ps["name"], str) or isinstance(ps["name"], Token):
                raise BaseError("@query-param needs exactly name=")
        elif ps:
            raise BaseError("parameter on derived component")
        return
    if not name or any(c not in FIELD_NAME_CHARS for c in name):
        raise BaseError("bad field name")
    keys = list(ps.keys())
    if not keys:
        return
    if keys == ["key"] and isinstance(ps["key"], str) and not isinstance(ps["key"], Token):
        return
    if keys == ["bs"] and ps["bs"] is True:
        return
    raise BaseError("unsupported component parameters")


def slash_pq(pq):
    """The path and query as received, the path `/` when empty (`http://h?x=1` gives `/?x=1`)."""
    return pq if pq.startswith("/") else "/" + pq


def build_base(req, items, params_text, scheme_cfg=None, authority_cfg=None, signer=False):
    """Signature base bytes for the covered `items` (list of Item) and the @signature-params text."""
    uri_scheme, uri_auth, path, query, pq = split_target(req)
    if signer:
        scheme = uri_scheme or "http"
    else:
        scheme = scheme_cfg or uri_scheme or "http"
    hosts = req.lines("host")

    def authority():
        if not signer and authority_cfg:
            raw = authority_cfg
        elif uri_auth is not None:
            raw = uri_auth
            # "A `Host` field beside a URI authority must name the same authority (exactly one
            # line, equal to it after the normalisation above)".
            if not signer and hosts:
                if len(hosts) != 1:
                    raise BaseError("two Host lines beside the URI authority")
                try:
                    host = hosts[0].decode("ascii")
                except UnicodeDecodeError:
                    raise BaseError("non-ASCII Host")
                if normalise_authority(host, scheme) != normalise_authority(raw, scheme):
                    raise BaseError("Host names another authority than the URI")
        else:
            if len(hosts) != 1:
                raise BaseError("Host must occur exactly once")
            try:
                raw = hosts[0].decode("ascii")
            except UnicodeDecodeError:
                raise BaseError("non-ASCII Host")
        return normalise_authority(raw, scheme)

    lines = []
    seen = set()
    qps = None
    for it in items:
        validate_component(it)
        ident = sf_ser_item(it)
        if ident in seen:
            raise BaseError("duplicate component")
        seen.add(ident)
        name = it.value
        if name == "@method":
            vals = [req.method]
        elif name == "@authority":
            vals = [authority()]
        elif name == "@scheme":
            vals = [scheme]
        elif name == "@path":
            vals = [printable(path or "/")]
        elif name == "@query":
            vals = [printable("?" + (query or ""))]
        elif name == "@target-uri":
            # PROTOCOL.md: nothing after the authority for CONNECT (authority form) and
            # OPTIONS * (RFC 9112 section 3.3).
            authority_form = (req.method == "CONNECT" and not req.target.startswith("/")
                              and "://" not in req.target)
            asterisk_form = req.method == "OPTIONS" and req.target == "*"
            rest = "" if authority_form or asterisk_form else slash_pq(pq)
            vals = [printable("%s://%s%s" % (scheme, authority(), rest))]
        elif name == "@request-target":
            if req.method == "CONNECT" and uri_auth is not None and not pq:
                # PROTOCOL.md: the authority-form target as received, not normalised
                vals = [printable(uri_auth)]
            elif req.method == "OPTIONS" and req.target == "*":
                vals = ["*"]
            else:
                vals = [printable(slash_pq(pq))]
        elif name == "@query-param":
            if qps is None:
                qps = query_params(query)
            want = it.params["name"]
            vals = [v for (n, v) in qps if n == want]
            if not vals:
                raise BaseError("query parameter absent")
            if len(vals) > 1:
                raise BaseError("query parameter repeated (RFC 9421 section 2.2.8)")
        elif "bs" in it.params:
            ls = req.lines(name)
            if not ls:
                raise BaseError("covered field absent")
            vals = [", ".join(":" + base64.b64encode(v.strip(SP_HTAB)).decode() + ":" for v in ls)]
        elif "key" in it.params:
            try:
                d = sf_parse_dictionary(field_value(req, name))
            except SFError:
                raise BaseError("field is not a dictionary")
            k = it.params["key"]
            if k not in d:
                raise BaseError("dictionary member absent")
            vals = [sf_ser_member(d[k])]
        else:
            vals = [field_value(req, name)]
        for v in vals:
            lines.append(ident + ": " + v + "\n")
    return ("".join(lines) + '"@signature-params": ' + params_text).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Identity encoding (§4)
# ---------------------------------------------------------------------------------------------

ID_UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HEX = set(b"0123456789abcdefABCDEF")


def id_encode(s):
    if not s:
        raise ValueError("empty identity name")
    return "".join(chr(b) if b in ID_UNRESERVED else "%%%02X" % b for b in s.encode("utf-8"))


def id_decode(v):
    """v: str (field value). Returns the decoded str or raises ValueError."""
    if not v:
        raise ValueError("empty")
    b = v.encode("latin-1")
    out = bytearray()
    i = 0
    while i < len(b):
        c = b[i]
        if c in ID_UNRESERVED:
            out.append(c)
            i += 1
        elif c == 0x25 and i + 2 < len(b) + 1 and len(b[i + 1:i + 3]) == 2 and all(x in HEX for x in b[i + 1:i + 3]):
            out.append(int(b[i + 1:i + 3], 16))
            i += 3
        else:
            raise ValueError("not canonical")
    return out.decode("utf-8")  # raises UnicodeDecodeError (a ValueError)


# ---------------------------------------------------------------------------------------------
# Keys (§5)
# ---------------------------------------------------------------------------------------------

SALT = b"countersign/v1"


def hkdf_sha256(ikm, salt, info, length=32):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def valid_key_id(k):
    return bool(k) and all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in k)


def parse_duration(s):
    m = re.fullmatch(r"\s*(\d+)(ms|s|m|h|d)\s*", s)
    if not m:
        raise ValueError("bad duration")
    n, u = int(m.group(1)), m.group(2)
    ms = n * {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}[u]
    if ms % 1000:
        raise ValueError("not whole seconds")
    return ms // 1000


def parse_rotation(rot):
    """A `rotation` value (§5): None for "off", else the period in whole seconds."""
    if rot == "off":
        return None
    period = parse_duration(rot)
    if not (1 <= period <= 365 * 86400):
        raise ValueError("rotation period out of range")
    return period


class Keyring:
    """keys: id -> (secret, retired, period or None); rotation is per key (§5), the top-level
    `rotation` being the default of keys without their own."""

    def __init__(self, text):
        t = tomllib.loads(text)
        self.active = t["active"]
        default_period = parse_rotation(t.get("rotation", "off"))
        self.keys = {}
        for k in t["keys"]:
            kid = k["id"]
            if not valid_key_id(kid):
                raise ValueError("bad key id")
            period = parse_rotation(k["rotation"]) if "rotation" in k else default_period
            if "secret" in k:
                sec = base64.b64decode(k["secret"], validate=True)
            elif "secret_env" in k:
                sec = base64.b64decode(os.environ[k["secret_env"]], validate=True)
            else:
                with open(k["secret_file"]) as f:
                    sec = base64.b64decode(f.read().strip(), validate=True)
            if len(sec) < 32:
                raise ValueError("secret shorter than 32 bytes")
            if kid in self.keys:
                raise ValueError("duplicate key id")
            self.keys[kid] = (sec, bool(k.get("retired", False)), period)
        if any(p is not None for (_, _, p) in self.keys.values()) and any("." in kid for kid in self.keys):
            raise ValueError("key id with '.' while a key rotates")
        if self.active not in self.keys or self.keys[self.active][1]:
            raise ValueError("active key missing or retired")

    def signing_key(self, created):
        sec, _, period = self.keys[self.active]
        if period is None:
            return self.active, sec
        kid = "%s.%d" % (self.active, created // period)
        return kid, hkdf_sha256(sec, SALT, kid.encode("ascii"))

    def verifying_key(self, keyid, created):
        k = self.keys.get(keyid)
        if k is not None:
            # With a rotating key no id holds a '.', so an exact id is never also id.epoch.
            return k[0] if not k[1] and k[2] is None else None
        base, dot, ep = keyid.rpartition(".")
        k = self.keys.get(base) if dot else None
        if not k or k[1] or k[2] is None:
            return None
        if not re.fullmatch(r"0|[1-9][0-9]*", ep) or int(ep) != created // k[2]:
            return None
        return hkdf_sha256(k[0], SALT, keyid.encode("ascii"))


# ---------------------------------------------------------------------------------------------
# Signer (§1, §2, §4, §5)
# ---------------------------------------------------------------------------------------------

MAX_SIGNATURE_TIME = 999999999999999
PROFILE = ["@method", "@authority", "@path", "@query", "content-digest"]


class SignError(Exception):
    pass


def sign(req, keyring, created, nonce, user=None, roles=(), window=10, label="countersign",
         tag="countersign", extra_headers=(), max_components=64, param_order=None,
         component_order=None, digests=("sha-256",)):
    """Returns a new Request. param_order/component_order/digests let the harness act as an
    'other RFC 9421 signer' (still conformant)."""
    req = Request(req.method, req.target, req.headers, req.body, req.version)
    if user is not None and user == "":
        raise SignError("empty user")
    if any(r == "" for r in roles):
        raise SignError("empty role")
    if roles and user is None:
        raise SignError("roles without user")
    # §2: a caller-chosen nonce is 22..256 characters of 0x21-0x7E other than `"` and `\`.
    if not (22 <= len(nonce) <= 256) or any(
            not (0x21 <= ord(c) <= 0x7E) or c in '"\\' for c in nonce):
        raise SignError("nonce must be 22-256 visible ASCII characters other than quote and backslash")
    if created < 0 or created > MAX_SIGNATURE_TIME or created + window > MAX_SIGNATURE_TIME:
        raise SignError("time out of range")
    for h in ("content-digest", "x-auth-user", "x-auth-roles", "signature-input", "signature"):
        req.remove(h)
    # authority consistency (§3.1 Authority, signer paragraph)
    uri_scheme, uri_auth, _, _, _ = split_target(req)
    hosts = req.lines("host")
    if len(hosts) > 1:
        raise SignError("more than one Host")
    if uri_auth is not None and hosts:
        sch = uri_scheme or "http"
        try:
            if normalise_authority(uri_auth, sch) != normalise_authority(hosts[0].decode("ascii"), sch):
                raise SignError("URI authority and Host differ")
        except (BaseError, UnicodeDecodeError) as e:
            raise SignError(str(e))
    dig = []
    for alg in digests:
        h = hashlib.sha256 if alg == "sha-256" else hashlib.sha512
        dig.append("%s=:%s:" % (alg, base64.b64encode(h(req.body).digest()).decode()))
    req.add("Content-Digest", ", ".join(dig))
    comps = list(PROFILE)
    if user is not None:
        req.add("X-Auth-User", id_encode(user))
        comps.append("x-auth-user")
        if roles:
            req.add("X-Auth-Roles", ",".join(id_encode(r) for r in roles))
            comps.append("x-auth-roles")
    for h in extra_headers:
        if req.lines(h):
            comps.append(h.lower())
    if len(comps) > max_components:
        raise SignError("too many components")
    if component_order:
        comps = component_order(comps)
    keyid, key = keyring.signing_key(created)
    params = {"created": created, "expires": created + window, "nonce": nonce, "keyid": keyid,
              "alg": "hmac-sha256", "tag": tag}
    if param_order:
        params = param_order(params)
    items = [Item(c) for c in comps]
    sig_params = sf_ser_member(InnerList(items, params))
    try:
        base = build_base(req, items, sig_params, signer=True)
    except BaseError as e:
        raise SignError(str(e))
    mac = hmac.new(key, base, hashlib.sha256).digest()
    req.add("Signature-Input", "%s=%s" % (label, sig_params))
    req.add("Signature", "%s=:%s:" % (label, base64.b64encode(mac).decode()))
    return req


# ---------------------------------------------------------------------------------------------
# Verifier (§6)
# ---------------------------------------------------------------------------------------------


class Reject(Exception):
    def __init__(self, reason, why=""):
        super().__init__(reason)
        self.reason, self.why = reason, why


def combine_ascii(req, name):
    lines = req.lines(name)
    if not lines:
        return None
    out = []
    for v in lines:
        try:
            out.append(v.strip(SP_HTAB).decode("ascii"))
        except UnicodeDecodeError:
            raise Reject("malformed_signature", name + " not ASCII")
    return ", ".join(out)


def verify(req, keyring, now, window=10, skew=2, tag="countersign", scheme=None, authority=None,
           required=tuple(PROFILE), identity=("x-auth-user", "x-auth-roles"), extra=(),
           max_components=64, body_limit=1 << 20):
    """Returns dict like the CLI's JSON: {"valid": True, "user", "roles", "keyid"} or
    {"valid": False, "reason"}."""
    try:
        return _verify(req, keyring, now, window, skew, tag, scheme, authority, required, identity,
                       extra, max_components, body_limit)
    except Reject as r:
        return {"valid": False, "reason": r.reason, "why": r.why}


def _verify(req, keyring, now, W, S, tag, scheme, authority, required, identity, extra, maxc, limit):
    M = "malformed_signature"
    # 1
    si = combine_ascii(req, "signature-input")
    if si is None:
        raise Reject("missing_signature", "no Signature-Input")
    try:
        sid = sf_parse_dictionary(si)
    except SFError as e:
        raise Reject(M, "Signature-Input: %s" % e)
    # 2
    sel = [(lbl, m) for lbl, m in sid.items()
           if isinstance(m, InnerList) and isinstance(m.params.get("tag"), str)
           and not isinstance(m.params.get("tag"), Token) and m.params.get("tag") == tag]
    if len(sel) > 1:
        raise Reject(M, "two members with our tag")
    if not sel:
        raise Reject("missing_signature", "no member with our tag")
    label, member = sel[0]
    if len(member.items) > maxc:
        raise Reject(M, "too many components")
    # 3
    sg = combine_ascii(req, "signature")
    if sg is None:
        raise Reject("missing_signature", "no Signature")
    try:
        sgd = sf_parse_dictionary(sg)
    except SFError as e:
        raise Reject(M, "Signature: %s" % e)
    if label not in sgd:
        raise Reject("missing_signature", "no Signature member for label")
    sm = sgd[label]
    if not isinstance(sm, Item) or not isinstance(sm.value, bytes):
        raise Reject(M, "Signature member not a byte sequence")
    mac_recv = sm.value
    # 4  one pass in received order (§6 step 4): type check, then alg value, per parameter
    ps = member.params

    def is_str(v):
        return isinstance(v, str) and not isinstance(v, Token)

    for k, v in ps.items():
        if k in ("created", "expires"):
            if isinstance(v, bool) or not isinstance(v, int):
                raise Reject(M, k + " not an integer")
        elif k in ("nonce", "keyid", "alg", "tag"):
            if not is_str(v):
                raise Reject(M, k + " not a string")
            if k == "alg" and v != "hmac-sha256":
                raise Reject("unsupported_algorithm")
    # 5
    if "keyid" not in ps:
        raise Reject(M, "no keyid")
    if "created" not in ps or ps["created"] < 0:
        raise Reject(M, "created absent or negative")
    created = ps["created"]
    # 6
    if created > now + S:
        raise Reject("not_yet_valid")
    if created + W + S < now:
        raise Reject("expired", "created too old")
    if "expires" in ps and ps["expires"] + S < now:
        raise Reject("expired", "expires passed")
    # 7
    nonce = ps.get("nonce")
    if nonce is None:
        raise Reject(M, "no nonce")
    if not (22 <= len(nonce) <= 256):
        raise Reject(M, "nonce length")
    # 8
    seen = set()
    for it in member.items:
        try:
            validate_component(it)
        except BaseError as e:
            raise Reject(M, str(e))
        ident = sf_ser_item(it)
        if ident in seen:
            raise Reject(M, "duplicate component")
        seen.add(ident)
    plain = set(it.value for it in member.items if not it.params)
    # 9
    for r in required:
        if r not in plain:
            raise Reject("missing_digest" if r == "content-digest" else "insufficient_coverage", r)
    # 10
    if "content-digest" not in plain:
        raise Reject("missing_digest")
    cd_lines = req.lines("content-digest")
    if not cd_lines:
        raise Reject("missing_digest", "no Content-Digest field")
    try:
        cdv = field_value(req, "content-digest")
        cdd = sf_parse_dictionary(cdv)
    except (SFError, BaseError) as e:
        raise Reject(M, "Content-Digest: %s" % e)
    digests = {}
    for alg in ("sha-256", "sha-512"):
        if alg in cdd:
            m = cdd[alg]
            if not isinstance(m, Item) or not isinstance(m.value, bytes):
                raise Reject(M, alg + " not a byte sequence")
            digests[alg] = m.value
    if not digests:
        raise Reject("missing_digest", "no sha-256/sha-512 member")
    # 11  covered in plain form (§6 step 11)
    for f in list(identity) + list(extra):
        if req.lines(f) and f not in plain:
            raise Reject("insufficient_coverage", f + " present, not covered")
    # 12
    key = keyring.verifying_key(ps["keyid"], created)
    if key is None:
        raise Reject("unknown_key")
    # 13
    try:
        base = build_base(req, member.items, sf_ser_member(member), scheme_cfg=scheme, authority_cfg=authority)
    except (BaseError, SFError) as e:
        raise Reject(M, "base: %s" % e)
    # 14
    mac = hmac.new(key, base, hashlib.sha256).digest()
    if len(mac_recv) != 32 or not hmac.compare_digest(mac, mac_recv):
        raise Reject("bad_signature")
    # 15
    user, roles = None, []
    has_user = bool(req.lines(identity[0]))
    has_roles = bool(req.lines(identity[1]))
    if has_user:
        try:
            user = id_decode(field_value(req, identity[0]))
        except (ValueError, BaseError) as e:
            raise Reject(M, "user: %s" % e)
    if has_roles:
        try:
            rv = field_value(req, identity[1])
        except BaseError as e:
            raise Reject(M, "roles: %s" % e)
        if rv != "":
            try:
                roles = [id_decode(p) for p in rv.split(",")]
            except ValueError as e:
                raise Reject(M, "roles: %s" % e)
    if has_roles and not has_user:
        raise Reject(M, "roles without user")
    # phase 2
    if len(req.body) > limit:
        raise Reject("body_too_large")
    for alg, want in digests.items():
        h = hashlib.sha256 if alg == "sha-256" else hashlib.sha512
        if not hmac.compare_digest(h(req.body).digest(), want):
            raise Reject("digest_mismatch", alg)
    out = {"valid": True}
    if user is not None:
        out["user"] = user
        out["roles"] = roles
    out["keyid"] = ps["keyid"]
    last = created + W
    if "expires" in ps:
        last = min(last, max(ps["expires"], 0))
    out["replay_until"] = last + S + 1
    return out


# ---------------------------------------------------------------------------------------------
# Self-check of the worked example (§8)
# ---------------------------------------------------------------------------------------------

WORKED_SECRET = bytes(range(32))
WORKED_KEYRING = """active = "k1"
rotation = "off"
[[keys]]
id = "k1"
secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
"""
WORKED_NONCE = "dGhpcyBpcyBhIG5vbmNlIQ"
WORKED_REQ = (b'POST /orders?id=42&note=caf%C3%A9 HTTP/1.1\r\nHost: API.Example.com\r\n'
              b'Content-Type: application/json\r\nContent-Length: 23\r\n\r\n{"item":"book","qty":1}')
WORKED_BASE = (
    '"@method": POST\n"@authority": api.example.com\n"@path": /orders\n'
    '"@query": ?id=42&note=caf%C3%A9\n'
    '"content-digest": sha-256=:SqTsJBvyNh+ArgZhJK4lNXo+XGqb5zDvy9gHJLvgICE=:\n'
    '"x-auth-user": Zo%C3%AB%20Smith\n"x-auth-roles": admin,r%26d\n'
    '"@signature-params": ("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user" '
    '"x-auth-roles");created=1700000000;expires=1700000010;nonce="dGhpcyBpcyBhIG5vbmNlIQ";'
    'keyid="k1";alg="hmac-sha256";tag="countersign"').encode()
WORKED_SIG = "countersign=:w5inAMU+tfmDROq96fWRhHPjU2bBtWVYC1xs+TjQFtE=:"


# ---------------------------------------------------------------------------------------------
# Differential harness
# ---------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, binary, verbose=False):
        self.bin = binary
        self.verbose = verbose
        self.passed = 0
        self.failed = []
        # Removed by close(): the keyrings written here hold test secrets only, but a run
        # leaves nothing behind in /tmp.
        self._tmpdir = tempfile.TemporaryDirectory(prefix="cs-interop-")
        self.tmp = self._tmpdir.name
        self._kr = {}

    def close(self):
        self._tmpdir.cleanup()

    def keyring(self, text):
        if text not in self._kr:
            p = os.path.join(self.tmp, "kr%d.toml" % len(self._kr))
            with open(p, "w") as f:
                f.write(text)
            self._kr[text] = (p, Keyring(text))
        return self._kr[text]

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            if self.verbose:
                print("PASS", name)
        else:
            self.failed.append(name)
            print("FAIL", name, detail)

    def _run(self, args, data):
        p = subprocess.run([self.bin] + args, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return p.returncode, p.stdout, p.stderr

    def cs_verify(self, raw, kr, now, window=10, skew=2):
        rc, out, err = self._run(["verify", "--keyring", kr, "--now", str(now), "--window", str(window),
                                  "--skew", str(skew), "-"], raw)
        if rc == 2:
            return {"valid": False, "reason": "cli-error", "why": err.decode(errors="replace").strip()}
        r = json.loads(out.decode().strip().splitlines()[-1])
        r["why"] = err.decode(errors="replace").strip()
        return r

    def cs_sign(self, raw, kr, created, nonce=None, user=None, roles=None, window=10):
        args = ["sign", "--keyring", kr, "--created", str(created), "--window", str(window)]
        if nonce is not None:
            args += ["--nonce", nonce]
        if user is not None:
            args += ["--user", user]
        if roles is not None:
            args += ["--roles", roles]
        rc, out, err = self._run(args + ["-"], raw)
        return rc, out, err.decode(errors="replace").strip()

    @staticmethod
    def _key(r):
        k = {"valid": r.get("valid"), "reason": r.get("reason")}
        if r.get("valid"):
            k.update(user=r.get("user"), roles=r.get("roles", []) if r.get("user") is not None else None,
                     keyid=r.get("keyid"))
        return k

    def diff_verify(self, name, raw, krtext=WORKED_KEYRING, now=1700000000, window=10, skew=2, expect=None):
        """Run both verifiers on the same bytes; they must agree (and agree with `expect`, a reason
        code or 'valid', when given: that is what PROTOCOL.md says)."""
        krpath, kr = self.keyring(krtext)
        cs = self.cs_verify(raw, krpath, now, window, skew)
        try:
            req = parse_raw(raw)
            py = verify(req, kr, now, window, skew)
        except Exception as e:  # pragma: no cover
            py = {"valid": False, "reason": "py-exception", "why": repr(e)}
        a, b = self._key(cs), self._key(py)
        detail = "countersign=%s (%s) python=%s (%s)" % (a, cs.get("why", ""), b, py.get("why", ""))
        ok = a == b
        if expect == "cli-error" and a["reason"] == "cli-error":
            ok = True  # the CLI's raw-HTTP parser refuses the bytes: not representable, not a verdict
        if expect is not None:
            exp = "valid" if a["valid"] else a["reason"]
            ok = ok and exp == expect
            detail += " doc-expects=%s" % expect
        self.check("verify: " + name, ok, detail)
        return cs, py

    def diff_sign(self, name, raw, krtext=WORKED_KEYRING, created=1700000000, nonce=WORKED_NONCE,
                  user=None, roles=None, window=10, expect_refuse=None):
        """countersign sign vs the Python signer on the same input: same refusal, or the same
        added fields byte for byte; then each side's output verifies with the other verifier."""
        krpath, kr = self.keyring(krtext)
        if isinstance(raw, Request):
            raw = raw.to_bytes()
        rc, out, err = self.cs_sign(raw, krpath, created, nonce, user, roles, window)
        rl = [r for r in roles.split(",")] if roles else []
        if roles == "":
            rl = []
        try:
            pyreq = sign(parse_raw(raw), kr, created, nonce, user=user, roles=rl, window=window)
            py_err = None
        except (SignError, ValueError) as e:
            pyreq, py_err = None, str(e)
        cs_refused = rc != 0
        py_refused = py_err is not None
        ok = cs_refused == py_refused
        detail = "countersign rc=%d %s | python %s" % (rc, err, py_err or "signed")
        if expect_refuse is not None:
            ok = ok and (cs_refused == expect_refuse)
        if ok and not cs_refused:
            csreq = parse_raw(out)
            for h in ("content-digest", "x-auth-user", "x-auth-roles", "signature-input", "signature"):
                if csreq.lines(h) != pyreq.lines(h):
                    ok = False
                    detail += " | %s differs: cs=%r py=%r" % (h, csreq.lines(h), pyreq.lines(h))
        self.check("sign: " + name, ok, detail)
        if not cs_refused:
            pv = verify(parse_raw(out), kr, created, window=max(window, 10))
            self.check("sign: %s -> python verifies countersign's output" % name, pv["valid"], str(pv))
        if not py_refused:
            cv = self.cs_verify(pyreq.to_bytes(), krpath, created, window=max(window, 10))
            self.check("sign: %s -> countersign verifies python's output" % name, cv["valid"], str(cv))


def req(method="GET", target="/", headers=(("Host", "api.example.com"),), body=b""):
    hs = [(k, v.encode("utf-8") if isinstance(v, str) else v) for k, v in headers]
    if body and not any(k.lower() == "content-length" for k, _ in hs):
        hs.append(("Content-Length", str(len(body)).encode()))
    return Request(method, target, hs, body)


def resign(r, kr, created=1700000000, nonce=WORKED_NONCE, mutate_headers=None, **kw):
    """Sign with the Python signer, then let `mutate_headers(Request)` tamper."""
    s = sign(r, kr, created, nonce, **kw)
    if mutate_headers:
        mutate_headers(s)
    return s.to_bytes()


def set_header(r, name, value):
    r.remove(name)
    r.add(name, value)


def manual(r, kr, sig_input, components_text=None, label="countersign", created=1700000000,
           key=None, mac_override=None, drop=(), add=(), body_digest=True):
    """Build a request signed over an arbitrary Signature-Input member text (what another RFC
    9421 signer might send). The base is built by *this* implementation from the parsed member."""
    r = Request(r.method, r.target, r.headers, r.body, r.version)
    for h in ("signature-input", "signature"):
        r.remove(h)
    if body_digest and not r.lines("content-digest"):
        r.add("Content-Digest", "sha-256=:%s:" % base64.b64encode(hashlib.sha256(r.body).digest()).decode())
    for k, v in add:
        r.add(k, v)
    try:
        m = sf_parse_dictionary(label + "=" + sig_input)[label]
        if key is None:
            kid, cr = m.params.get("keyid"), m.params.get("created", 0)
            key = (kr.verifying_key(kid, cr) if isinstance(kid, str) and isinstance(cr, int) else None) or b"x" * 32
        base = build_base(r, m.items, sf_ser_member(m))
        mac = hmac.new(key, base, hashlib.sha256).digest()
    except (BaseError, SFError):
        mac = b"\0" * 32
    if mac_override is not None:
        mac = mac_override
    r.add("Signature-Input", label + "=" + sig_input)
    r.add("Signature", "%s=:%s:" % (label, base64.b64encode(mac).decode()))
    for h in drop:
        r.remove(h)
    return r.to_bytes()


def kr_text(active="k1", rotation="off", keys=(("k1", WORKED_SECRET, False),)):
    """keys: (id, secret, retired) or (id, secret, retired, the key's own rotation)."""
    out = 'active = "%s"\nrotation = "%s"\n' % (active, rotation)
    for kid, sec, retired, *own in keys:
        out += '[[keys]]\nid = "%s"\nsecret = "%s"\n' % (kid, base64.b64encode(sec).decode())
        if retired:
            out += "retired = true\n"
        if own:
            out += 'rotation = "%s"\n' % own[0]
    return out


def run_all(h):
    N = 1700000000
    NONCE = WORKED_NONCE
    _, K = h.keyring(WORKED_KEYRING)

    # --- 0. the worked example, self-check (no binary) -----------------------------------------
    wr = parse_raw(WORKED_REQ)
    signed = sign(wr, K, N, NONCE, user="Zoë Smith", roles=["admin", "r&d"])
    si = signed.lines("signature-input")[0].decode()
    m = sf_parse_dictionary(si)["countersign"]
    h.check("doc §8: base byte for byte", build_base(signed, m.items, sf_ser_member(m)) == WORKED_BASE)
    h.check("doc §8: Signature", signed.lines("signature")[0].decode() == WORKED_SIG)
    for now, exp in ((N - 2, True), (N + 12, True), (N - 3, False), (N + 13, False)):
        v = verify(signed, K, now)
        h.check("doc §8: accepted window at now=created%+d" % (now - N), v["valid"] == exp, str(v))
    v = verify(signed, K, N)
    h.check("doc §8: identity + replay_until", v.get("user") == "Zoë Smith" and v.get("roles") == ["admin", "r&d"]
            and v.get("replay_until") == N + 13, str(v))
    h.diff_sign("doc §8 worked example", WORKED_REQ, user="Zoë Smith", roles="admin,r&d")

    # --- 1. signing: countersign sign vs python sign --------------------------------------------
    users = ["alice", "Zoë Smith", "a,b", "100%", "a b", "emoji 🦀", "~-._", "x/y?z#w", "Ünïcødé",
             "'quote\"", "tab\there", "semi;colon=eq", "+plus", "%41"]
    for u in users:
        h.diff_sign("user %r" % u, req(), user=u)
    for roles in ["admin", "admin,r&d", "a b,c%d,emoji 🦀", "Ünï,x", ""]:
        h.diff_sign("roles %r" % roles, req(), user="bob", roles=roles)
    h.diff_sign("no identity", req())
    h.diff_sign("empty user refused", req(), user="", expect_refuse=True)
    h.diff_sign("empty role (a,,b) refused", req(), user="bob", roles="a,,b", expect_refuse=True)
    h.diff_sign("client X-Auth-* stripped (anonymous)", req(headers=(("Host", "h"), ("X-Auth-User", "mallory"),
                                                                      ("x-auth-roles", "root"))))
    h.diff_sign("client X-Auth-* replaced", req(headers=(("Host", "h"), ("X-Auth-User", "mallory"))), user="bob")
    h.diff_sign("old Signature/Content-Digest replaced",
                req(headers=(("Host", "h"), ("Content-Digest", "sha-256=:AAAA:"), ("Signature", "x=:AAAA:"),
                             ("Signature-Input", 'x=();tag="countersign"'))))
    targets = ["/", "/a%2Fb", "/a;b=c/d;e", "/trailing/", "/?", "/p?", "/p?a=1&b=%2F&c=+x", "/p?a%20b=c%zz",
               "/p??x", "//double", "/p?x=1;y=2&", "/~user/%7E", "/p?q=%E2%82%AC"]
    for t in targets:
        h.diff_sign("target %s" % t, req(target=t))
    for host in ["API.Example.COM", "api.example.com:80", "api.example.com:8080", "api.example.com:443",
                 "api.example.com:080", "[::1]", "[::1]:80", "[FE80::1]:8443", "user@host", "u:p@Host:80",
                 "127.0.0.1:80", "host:", "HOST:", "[::1]:", "u@host:", "host::80"]:
        h.diff_sign("Host %s" % host, req(headers=(("Host", host),)))
    for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "get", "M-SEARCH", "HEAD"]:
        h.diff_sign("method %s" % method, req(method=method, body=b"x" if method == "PUT" else b""))
    h.diff_sign("absolute-form http://Api.Example.com:80/p?q", req(target="http://Api.Example.com:80/p?q", headers=()))
    h.diff_sign("absolute-form https://h:443/p", req(target="https://h:443/p", headers=()))
    h.diff_sign("absolute-form + same Host", req(target="http://api.example.com/p",
                                                 headers=(("Host", "API.example.com:80"),)))
    h.diff_sign("absolute-form + different Host refused", req(target="http://api.example.com/p",
                                                              headers=(("Host", "other.example"),)),
                expect_refuse=True)
    h.diff_sign("two Host lines refused", req(headers=(("Host", "a"), ("Host", "a"))), expect_refuse=True)
    h.diff_sign("binary body", req(method="POST", body=bytes(range(256)) * 3))
    h.diff_sign("body with CRLFs", req(method="POST", body=b"\r\n\r\nx\r\n"))
    h.diff_sign("window 1", req(), window=1)
    h.diff_sign("window 3600", req(), window=3600)
    h.diff_sign("created 0", req(), created=0)
    h.diff_sign("created = MAX - window", req(), created=MAX_SIGNATURE_TIME - 10)
    h.diff_sign("created + window > MAX refused", req(), created=MAX_SIGNATURE_TIME - 9, expect_refuse=True)
    # §2: a signer refuses quotes and backslashes in a caller-chosen nonce (a verifier accepts
    # any sf-string of 22-256 characters: "nonce 22 chars with escapes" below).
    h.diff_sign("nonce with quote and backslash refused", req(), nonce='ab"cd\\efghijklmnopqrstuvwxyz',
                expect_refuse=True)
    h.diff_sign("nonce short refused", req(), nonce="short", expect_refuse=True)

    # --- 2. python-signed requests verified by both ---------------------------------------------
    def both(name, r, expect="valid", krtext=WORKED_KEYRING, now=N, window=10, skew=2, **kw):
        _, kr = h.keyring(krtext)
        raw = resign(r, kr, **kw)
        return h.diff_verify(name, raw, krtext, now, window, skew, expect)

    both("roles with comma/percent/space/emoji", req(), user="Zoë", roles=["a,b", "100%", "x y", "🦀"])
    both("user only, no roles field", req(), user="carol")
    both("sha-512 only digest", req(method="POST", body=b"hello"), digests=("sha-512",))
    both("sha-256 + sha-512 digest", req(method="POST", body=b"hello"), digests=("sha-256", "sha-512"))
    both("keyid-first parameter order", req(),
         param_order=lambda p: {k: p[k] for k in ("keyid", "alg", "created", "expires", "nonce", "tag")})
    both("no expires", req(), param_order=lambda p: {k: v for k, v in p.items() if k != "expires"})
    both("no alg", req(), param_order=lambda p: {k: v for k, v in p.items() if k != "alg"})
    both("extra unknown parameters", req(), param_order=lambda p: dict(p, foo=Token("bar"), dec=Dec(False, "1", "5"),
                                                                         flag=True, b=b"\x01", f=False, n=-3))
    both("reversed components", req(), user="u", roles=["r"], component_order=lambda c: list(reversed(c)))
    both("label other than countersign", req(), label="sig1")
    both("other tag -> missing_signature", req(), tag="other", expect="missing_signature")
    both("now = created - skew", req(), now=N - 2)
    both("now = created - skew - 1", req(), now=N - 3, expect="not_yet_valid")
    both("now = created + W + S", req(), now=N + 12)
    both("now = created + W + S + 1", req(), now=N + 13, expect="expired")
    both("verifier window 5: created + 7", req(), now=N + 7, window=5)
    both("verifier window 5: created + 8", req(), now=N + 8, window=5, expect="expired")
    for w, now, exp in ((1, N + 3, "valid"), (1, N + 4, "expired")):
        _, kr = h.keyring(WORKED_KEYRING)
        h.diff_verify("signer window %d, now=created+%d" % (w, now - N), resign(req(), kr, window=w), now=now, expect=exp)
    both("skew 0 at created+W", req(), now=N + 10, skew=0)
    both("skew 0 at created+W+1", req(), now=N + 11, skew=0, expect="expired")
    both("expires before created", req(), now=N, param_order=lambda p: dict(p, expires=N - 5), expect="expired")
    both("expires sooner than the window: expires + S", req(), now=N + 5,
         param_order=lambda p: dict(p, expires=N + 3))
    both("expires sooner than the window: expires + S + 1", req(), now=N + 6,
         param_order=lambda p: dict(p, expires=N + 3), expect="expired")
    both("created 0, now 5", req(), created=0, now=5)
    both("empty query '?'", req(target="/p?"))
    both("upper-case Host + port 80", req(headers=(("Host", "API.EXAMPLE.COM:80"),)))
    both("IPv6 Host", req(headers=(("Host", "[2001:DB8::1]:80"),)))
    both("absolute-form https default port", req(target="https://Example.com:443/x?y", headers=()))
    both("absolute-form + another Host refused", req(target="http://a.example/x", headers=()),
         mutate_headers=lambda r: r.add("Host", "b.example"), expect="malformed_signature")
    both("absolute-form + the same Host spelled otherwise", req(target="http://a.example/x", headers=()),
         mutate_headers=lambda r: r.add("Host", "A.Example:80"))
    both("absolute-form + two Host lines refused", req(target="http://a.example/x", headers=()),
         mutate_headers=lambda r: (r.add("Host", "a.example"), r.add("Host", "a.example")),
         expect="malformed_signature")

    # rotation
    for P, created in ((3600, 3600 * 472222 - 1), (3600, 3600 * 472222), (1, N), (365 * 86400, N), (7, 6)):
        kt = kr_text(rotation="%ds" % P)
        _, kr = h.keyring(kt)
        raw = resign(req(), kr, created=created)
        h.diff_verify("rotation P=%d created=%d verified 1s later" % (P, created), raw, kt, now=created + 1, expect="valid")
        h.diff_sign("rotation P=%d created=%d" % (P, created), req().to_bytes(), kt, created=created)
    kt = kr_text(rotation="1h")
    _, kr = h.keyring(kt)
    created = 3600 * 472222 - 1
    raw = resign(req(), kr, created=created)
    h.diff_verify("rotation: signed 1 s before boundary, verified 1 s after", raw, kt, now=created + 2, expect="valid")
    sec = kr.keys["k1"][0]
    for name, kid, want in (("epoch+1", "k1.%d" % (created // 3600 + 1), "unknown_key"),
                            ("leading zero epoch", "k1.0%d" % (created // 3600), "unknown_key"),
                            ("no epoch", "k1", "unknown_key"), ("empty epoch", "k1.", "unknown_key"),
                            ("signed epoch", "k1.+%d" % (created // 3600), "unknown_key")):
        key = hkdf_sha256(sec, SALT, kid.encode())
        si = ('("@method" "@authority" "@path" "@query" "content-digest");created=%d;nonce="%s";keyid="%s"'
              ';alg="hmac-sha256";tag="countersign"' % (created, NONCE, kid))
        h.diff_verify("rotation keyid %s" % name, manual(req(), kr, si, key=key), kt, now=created, expect=want)
    kt0 = kr_text(rotation="10s")
    _, kr0 = h.keyring(kt0)
    h.diff_verify("rotation epoch 0 (created 5)", resign(req(), kr0, created=5), kt0, now=5, expect="valid")
    # rotation-off keyring verifying a rotated keyid and vice versa
    h.diff_verify("rotation off keyring, keyid k1.N", resign(req(), kr, created=N), WORKED_KEYRING, expect="unknown_key")

    # per-key rotation (§5): a static key, one rotating hourly, one inheriting 10 s, side by side
    K2, K3 = b"\x22" * 32, b"\x33" * 32
    mixed_keys = (("k1", WORKED_SECRET, False, "off"), ("k2", K2, False, "1h"), ("k3", K3, False))
    for active in ("k1", "k2", "k3"):
        kt = kr_text(active=active, rotation="10s", keys=mixed_keys)
        _, kr = h.keyring(kt)
        raw = resign(req(), kr, created=N)
        for verifier_active in ("k1", "k2", "k3"):
            h.diff_verify("per-key rotation: %s signs, keyring active %s verifies" % (active, verifier_active),
                          raw, kr_text(active=verifier_active, rotation="10s", keys=mixed_keys), expect="valid")
        h.diff_sign("per-key rotation: %s signs" % active, req().to_bytes(), kt, created=N)
    kt = kr_text(rotation="10s", keys=mixed_keys)
    _, kr = h.keyring(kt)
    for name, kid, sec, want in (
            ("static key with an epoch", "k1.%d" % (N // 3600), WORKED_SECRET, "unknown_key"),
            ("rotating key without an epoch", "k2", K2, "unknown_key"),
            ("epoch of another key's period", "k2.%d" % (N // 10), K2, "unknown_key"),
            ("epoch of the key's own period", "k2.%d" % (N // 3600), K2, "valid"),
            ("inherited period", "k3.%d" % (N // 10), K3, "valid")):
        key = sec if "." not in kid else hkdf_sha256(sec, SALT, kid.encode())
        si = ('("@method" "@authority" "@path" "@query" "content-digest");created=%d;nonce="%s";keyid="%s"'
              ';alg="hmac-sha256";tag="countersign"' % (N, NONCE, kid))
        h.diff_verify("per-key rotation: %s" % name, manual(req(), kr, si, key=key), kt, now=N, expect=want)

    # odd key ids
    for kid in ["k!#$%&'()*+,-/:;<=>?@[]^_`{|}~", "a.b", "K1", "x" * 200]:
        kt = kr_text(active=kid, keys=((kid, WORKED_SECRET, False),))
        _, kr = h.keyring(kt)
        h.diff_verify("odd key id %r" % kid[:40], resign(req(), kr), kt, expect="valid")
        h.diff_sign("odd key id %r" % kid[:40], req().to_bytes(), kt)
    ktr = kr_text(keys=(("k1", WORKED_SECRET, False), ("old", b"\x07" * 32, True)))
    _, krr = h.keyring(ktr)
    si = '("@method" "@authority" "@path" "@query" "content-digest");created=%d;nonce="%s";keyid="old";tag="countersign"' % (N, NONCE)
    h.diff_verify("retired key", manual(req(), krr, si, key=b"\x07" * 32), ktr, expect="unknown_key")
    si = '("@method" "@authority" "@path" "@query" "content-digest");created=%d;nonce="%s";keyid="k 1";tag="countersign"' % (N, NONCE)
    h.diff_verify("keyid with space", manual(req(), K, si), expect="unknown_key")
    si = '("@method" "@authority" "@path" "@query" "content-digest");created=%d;nonce="%s";keyid="k\\"1";tag="countersign"' % (N, NONCE)
    h.diff_verify("keyid with escaped quote", manual(req(), K, si), expect="unknown_key")

    # --- 3. countersign-signed requests, tampered, verified by both ----------------------------
    krp = h.keyring(WORKED_KEYRING)[0]

    def cs_signed(r, user=None, roles=None, created=N, window=10):
        rc, out, err = h.cs_sign(r.to_bytes(), krp, created, NONCE, user, roles, window)
        assert rc == 0, err
        return parse_raw(out)

    def tamper(name, r, fn, expect, now=N, user=None, roles=None):
        s = cs_signed(r, user, roles)
        fn(s)
        h.diff_verify(name, s.to_bytes(), now=now, expect=expect)

    base_post = req(method="POST", target="/orders?id=42", body=b'{"a":1}')
    tamper("untouched", base_post, lambda r: None, "valid")
    tamper("body byte changed", base_post, lambda r: setattr(r, "body", b'{"a":2}'), "digest_mismatch")
    tamper("Host changed", base_post, lambda r: set_header(r, "Host", "evil.example"), "bad_signature")
    tamper("Host upper-cased (normalised)", base_post, lambda r: set_header(r, "Host", "API.EXAMPLE.COM:80"), "valid")
    tamper("query changed", base_post, lambda r: setattr(r, "target", "/orders?id=43"), "bad_signature")
    tamper("method lower-cased", base_post, lambda r: setattr(r, "method", "post"), "bad_signature")
    tamper("X-Auth-User added to anonymous", base_post, lambda r: r.add("X-Auth-User", "admin"), "insufficient_coverage")
    tamper("X-Auth-Roles added to user-only", base_post, lambda r: r.add("X-Auth-Roles", "admin"),
           "insufficient_coverage", user="bob")
    tamper("X-Auth-User split into two lines", base_post,
           lambda r: (r.remove("x-auth-user"), r.add("X-Auth-User", "bo"), r.add("X-Auth-User", "b")),
           "bad_signature", user="bob")
    tamper("Signature-Input removed", base_post, lambda r: r.remove("signature-input"), "missing_signature")
    tamper("Signature removed", base_post, lambda r: r.remove("signature"), "missing_signature")
    tamper("Signature label renamed", base_post,
           lambda r: set_header(r, "Signature", r.lines("signature")[0].replace(b"countersign=", b"other=")),
           "missing_signature")
    tamper("Signature not bytes", base_post, lambda r: set_header(r, "Signature", "countersign=abc"), "malformed_signature")
    tamper("Signature garbage", base_post, lambda r: set_header(r, "Signature", "countersign=:abc"), "malformed_signature")
    tamper("Signature 31 bytes", base_post,
           lambda r: set_header(r, "Signature", "countersign=:%s:" % base64.b64encode(b"a" * 31).decode()), "bad_signature")
    tamper("Signature unpadded base64", base_post,
           lambda r: set_header(r, "Signature", r.lines("signature")[0][:-2] + b":"), "valid")
    tamper("Content-Digest removed", base_post, lambda r: r.remove("content-digest"), "missing_digest")
    tamper("Content-Digest not a dictionary", base_post, lambda r: set_header(r, "Content-Digest", "((("), "malformed_signature")
    tamper("Content-Digest sha-256 not bytes", base_post, lambda r: set_header(r, "Content-Digest", "sha-256=abc"),
           "malformed_signature")
    tamper("Content-Digest only md5", base_post, lambda r: set_header(r, "Content-Digest", "md5=:AAAA:"), "missing_digest")
    tamper("second Signature-Input member, other tag", base_post,
           lambda r: r.add("Signature-Input", 'other=("@method");created=1;keyid="x";tag="foreign"'), "valid")
    tamper("second Signature-Input member, our tag", base_post,
           lambda r: r.add("Signature-Input", 'other=("@method");created=1;keyid="x";tag="countersign"'),
           "malformed_signature")
    tamper("second member with same label, other tag (overwrites)", base_post,
           lambda r: r.add("Signature-Input", 'countersign=("@method");tag="foreign"'), "missing_signature")
    tamper("Signature-Input with non-ASCII", base_post,
           lambda r: r.add("Signature-Input", "x=(\"é\")".encode("utf-8")), "malformed_signature")
    tamper("Signature-Input token tag", base_post,
           lambda r: set_header(r, "Signature-Input", r.lines("signature-input")[0].replace(b'tag="countersign"', b"tag=countersign")),
           "missing_signature")
    tamper("Signature-Input unparsable", base_post, lambda r: set_header(r, "Signature-Input", "countersign=(\"@method\""),
           "malformed_signature")
    tamper("Signature-Input empty value", base_post, lambda r: set_header(r, "Signature-Input", ""), "missing_signature")
    tamper("extra SP inside inner list (non-canonical)", base_post,
           lambda r: set_header(r, "Signature-Input", r.lines("signature-input")[0].replace(b'("@method" ', b'( "@method"  ')),
           "valid")
    tamper("extra SP after ';' (non-canonical)", base_post,
           lambda r: set_header(r, "Signature-Input", r.lines("signature-input")[0].replace(b';keyid', b'; keyid')),
           "valid")
    tamper("created with leading zeros (non-canonical)", base_post,
           lambda r: set_header(r, "Signature-Input", r.lines("signature-input")[0].replace(b'created=', b'created=000')),
           "valid")
    tamper("created 16 digits", base_post,
           lambda r: set_header(r, "Signature-Input", r.lines("signature-input")[0].replace(b'created=1700000000', b'created=1000000000000000')),
           "malformed_signature")

    # --- 4. hand-built Signature-Input members ---------------------------------------------------
    COMP = '("@method" "@authority" "@path" "@query" "content-digest")'
    STD = ';created=%d;expires=%d;nonce="%s";keyid="k1";alg="hmac-sha256";tag="countersign"' % (N, N + 10, NONCE)

    def hb(name, sig_input, expect, r=None, now=N, **kw):
        h.diff_verify(name, manual(r or req(), K, sig_input, **kw), now=now, expect=expect)

    hb("hand-built canonical", COMP + STD, "valid")
    hb("alg rsa", COMP + STD.replace("hmac-sha256", "rsa-pss-sha512"), "unsupported_algorithm")
    hb("alg token", COMP + STD.replace('alg="hmac-sha256"', "alg=hmac-sha256"), "malformed_signature")
    hb("created string, alg wrong (created first)", COMP + ';created="x";alg="rsa";keyid="k1";nonce="%s";tag="countersign"' % NONCE,
       "malformed_signature")
    hb("alg wrong, created string (alg first)", COMP + ';alg="rsa";created="x";keyid="k1";nonce="%s";tag="countersign"' % NONCE,
       "unsupported_algorithm")
    hb("alg wrong and keyid absent", COMP + ';created=%d;alg="rsa";nonce="%s";tag="countersign"' % (N, NONCE), "unsupported_algorithm")
    hb("keyid absent", COMP + ';created=%d;nonce="%s";tag="countersign"' % (N, NONCE), "malformed_signature")
    hb("created absent", COMP + ';keyid="k1";nonce="%s";tag="countersign"' % NONCE, "malformed_signature")
    hb("created negative", COMP + ';created=-1;keyid="k1";nonce="%s";tag="countersign"' % NONCE, "malformed_signature")
    hb("created decimal", COMP + ';created=1700000000.0;keyid="k1";nonce="%s";tag="countersign"' % NONCE, "malformed_signature")
    hb("expires string", COMP + ';created=%d;expires="x";keyid="k1";nonce="%s";tag="countersign"' % (N, NONCE), "malformed_signature")
    hb("nonce absent", COMP + ';created=%d;keyid="k1";tag="countersign"' % N, "malformed_signature")
    hb("nonce 21 chars", COMP + ';created=%d;keyid="k1";nonce="%s";tag="countersign"' % (N, "a" * 21), "malformed_signature")
    hb("nonce 22 chars", COMP + ';created=%d;keyid="k1";nonce="%s";tag="countersign"' % (N, "a" * 22), "valid")
    hb("nonce 256 chars", COMP + ';created=%d;keyid="k1";nonce="%s";tag="countersign"' % (N, "a" * 256), "valid")
    hb("nonce 257 chars", COMP + ';created=%d;keyid="k1";nonce="%s";tag="countersign"' % (N, "a" * 257), "malformed_signature")
    hb("nonce 22 chars with escapes", COMP + ';created=%d;keyid="k1";nonce="%s";tag="countersign"' % (N, '\\"' * 22), "valid")
    hb("nonce token", COMP + ';created=%d;keyid="k1";nonce=abcdefghijklmnopqrstuvwxyz;tag="countersign"' % N, "malformed_signature")
    hb("not yet valid beats nonce absent", COMP + ';created=%d;keyid="k1";tag="countersign"' % (N + 100), "not_yet_valid")
    hb("nonce absent beats bad component", '("@status")' + ';created=%d;keyid="k1";tag="countersign"' % N, "malformed_signature")
    hb("unknown derived @status", '("@status" "@method" "@authority" "@path" "@query" "content-digest")' + STD, "malformed_signature")
    hb("upper-case field name", '("@method" "@authority" "@path" "@query" "content-digest" "Host")' + STD, "malformed_signature")
    hb("token component", '("@method" "@authority" "@path" "@query" content-digest)' + STD, "malformed_signature")
    hb("duplicate component", '("@method" "@method" "@authority" "@path" "@query" "content-digest")' + STD, "malformed_signature")
    hb(";sf parameter", '("@method" "@authority" "@path" "@query" "content-digest" "host";sf)' + STD, "malformed_signature")
    hb(";req parameter", '("@method" "@authority" "@path" "@query" "content-digest";req)' + STD, "malformed_signature")
    hb(";name on field", '("@method" "@authority" "@path" "@query" "content-digest" "host";name="x")' + STD, "malformed_signature")
    hb(";key+;bs", '("@method" "@authority" "@path" "@query" "content-digest" "host";key="a";bs)' + STD, "malformed_signature")
    hb("@method;x", '("@method";x "@authority" "@path" "@query" "content-digest")' + STD, "malformed_signature")
    hb("missing @query", '("@method" "@authority" "@path" "content-digest")' + STD, "insufficient_coverage")
    hb("missing content-digest and @method", '("@authority" "@path" "@query")' + STD, "insufficient_coverage")
    hb("missing content-digest only", '("@method" "@authority" "@path" "@query")' + STD, "missing_digest")
    hb("content-digest only as ;bs", '("@method" "@authority" "@path" "@query" "content-digest";bs)' + STD, "missing_digest")
    hb("content-digest ;key", '("@method" "@authority" "@path" "@query" "content-digest";key="sha-256")' + STD, "missing_digest")
    hb("content-digest covered twice (plain+bs)", '("@method" "@authority" "@path" "@query" "content-digest" "content-digest";bs)' + STD, "valid")
    hb("all derived components", '("@method" "@authority" "@path" "@query" "content-digest" "@scheme" "@target-uri" "@request-target")' + STD,
       "valid", r=req(target="/a/b?c=d"))
    hb("@query-param", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="a%20b")' + STD,
       "valid", r=req(target="/p?x=%zz&a%20b=%C3%A9+x"))
    hb("@query-param repeated", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="a%20b")' + STD,
       "malformed_signature", r=req(target="/p?a+b=1&x=%zz&a%20b=%C3%A9+x&a%20b"))
    hb("@query-param name with *", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="a%2A")' + STD,
       "malformed_signature", r=req(target="/p?a*=1"))
    hb("@query-param *", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="a*")' + STD,
       "valid", r=req(target="/p?a%2A=2"))
    hb("@query-param * repeated, once encoded", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="a*")' + STD,
       "malformed_signature", r=req(target="/p?a*=1&a%2A=2"))
    hb("@query-param invalid utf-8", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="q")' + STD,
       "valid", r=req(target="/p?q=%FF%C3"))
    hb("@query-param ~", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="t")' + STD,
       "valid", r=req(target="/p?t=~!'()"))
    hb("@query-param absent", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param";name="zz")' + STD,
       "malformed_signature", r=req(target="/p?a=1"))
    hb("@query-param no name", '("@method" "@authority" "@path" "@query" "content-digest" "@query-param")' + STD,
       "malformed_signature", r=req(target="/p?a=1"))
    hb("field ;key", '("@method" "@authority" "@path" "@query" "content-digest" "x-dict";key="b")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-Dict", "a=1, b=(1 2.5 \"x\");p=?0;q"), ("x-dict", "c=:AAA=:"))))
    hb("field ;key member with decimal 2.50", '("@method" "@authority" "@path" "@query" "content-digest" "x-dict";key="b")' + STD,
       "valid", r=req(headers=(("Host", "h"), ("X-Dict", "b=2.50"))))
    hb("field ;key missing member", '("@method" "@authority" "@path" "@query" "content-digest" "x-dict";key="z")' + STD,
       "malformed_signature", r=req(headers=(("Host", "h"), ("X-Dict", "a=1"))))
    hb("field ;bs with obs-text", '("@method" "@authority" "@path" "@query" "content-digest" "x-bin";bs)' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-Bin", b"\xff\xfe  "), ("X-Bin", b"b"))))
    hb("plain field with obs-text", '("@method" "@authority" "@path" "@query" "content-digest" "x-bin")' + STD,
       "malformed_signature", r=req(headers=(("Host", "h"), ("X-Bin", b"\xff"))))
    hb("multi-line field", '("@method" "@authority" "@path" "@query" "content-digest" "x-trace")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-Trace", "a=1"), ("X-Trace", "  b=2\t"))))
    hb("empty field value", '("@method" "@authority" "@path" "@query" "content-digest" "x-empty")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-Empty", ""))))
    hb("covered field absent", '("@method" "@authority" "@path" "@query" "content-digest" "x-nope")' + STD, "malformed_signature")
    hb("65 components", "(" + " ".join('"x-h%d"' % i for i in range(65)) + ")" + STD, "malformed_signature")
    hb("64 components (59 absent fields)", '("@method" "@authority" "@path" "@query" "content-digest" ' +
       " ".join('"x-h%d"' % i for i in range(59)) + ")" + STD, "malformed_signature")
    hb("64 components, all present", '("@method" "@authority" "@path" "@query" "content-digest" ' +
       " ".join('"x-h%d"' % i for i in range(59)) + ")" + STD, "valid",
       r=req(headers=[("Host", "h")] + [("X-H%d" % i, "v") for i in range(59)]))
    hb("bool/decimal/token/bytes params", COMP + STD + ";a;b=?0;c=1.5;d=tok/x:y;e=:AQI=:;f=-0;g=1.0", "valid")
    # RFC 8941 §4.1.5 and PROTOCOL.md §3.2: `1.50` is serialised `1.5`, `-0.0` is `0.0`
    hb("decimal parameter 1.50 MACed as 1.5", COMP + STD + ";c=1.50", "valid")
    hb("decimal parameter -0.0 MACed as 0.0", COMP + STD + ";c=-0.0", "valid")
    hb("duplicate parameter (last wins)", COMP + STD + ';keyid="nope";keyid="k1"', "valid")
    hb("roles without user", COMP[:-1] + ' "x-auth-roles")' + STD, "malformed_signature",
       add=(("X-Auth-Roles", "admin"),))
    hb("empty user", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", ""),))
    hb("user lower-case hex escape", COMP[:-1] + ' "x-auth-user")' + STD, "valid", add=(("X-Auth-User", "Zo%c3%ab"),))
    hb("user escaped unreserved %41", COMP[:-1] + ' "x-auth-user")' + STD, "valid", add=(("X-Auth-User", "%41"),))
    hb("user invalid utf-8", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", "%FF"),))
    hb("user bad escape %G1", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", "%G1"),))
    hb("user trailing %", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", "a%"),))
    hb("user with space", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", "a b"),))
    hb("user with +", COMP[:-1] + ' "x-auth-user")' + STD, "malformed_signature", add=(("X-Auth-User", "a+b"),))
    hb("user with NUL escape", COMP[:-1] + ' "x-auth-user")' + STD, "valid", add=(("X-Auth-User", "a%00b"),))
    for roles, exp in (("", "valid"), ("a,,b", "malformed_signature"), (",a", "malformed_signature"),
                       ("a,", "malformed_signature"), (",", "malformed_signature"), ("a, b", "malformed_signature"),
                       ("a%2Cb", "valid"), ("a%2cb", "valid"), ("%F0%9F%A6%80", "valid")):
        hb("roles %r" % roles, COMP[:-1] + ' "x-auth-user" "x-auth-roles")' + STD, exp,
           add=(("X-Auth-User", "u"), ("X-Auth-Roles", roles)))
    hb("roles two lines a / b", COMP[:-1] + ' "x-auth-user" "x-auth-roles")' + STD, "malformed_signature",
       add=(("X-Auth-User", "u"), ("X-Auth-Roles", "a"), ("X-Auth-Roles", "b")))
    hb("roles covered as ;bs only", COMP[:-1] + ' "x-auth-user" "x-auth-roles";bs)' + STD, "insufficient_coverage",
       add=(("X-Auth-User", "u"), ("X-Auth-Roles", "a")))
    hb("user field name upper-case on wire", COMP[:-1] + ' "x-auth-user")' + STD, "valid", add=(("X-AUTH-USER", "u"),))
    # A raw non-ASCII target is not a URI (RFC 3986 §2): the CLI refuses to read it (exit 2) as
    # it refuses the DEL below; a server never hands the layer such a target.
    hb("non-ASCII path", COMP + STD, "cli-error", r=req(target="/caf\xc3\xa9"))
    hb("DEL in query (printable check)", COMP + STD, "cli-error", r=req(target="/p?a\x7f"))
    hb("Host with space inside", COMP + STD, "malformed_signature", r=req(headers=(("Host", "a b"),)))
    hb("Host with slash", COMP + STD, "malformed_signature", r=req(headers=(("Host", "a/b"),)))
    hb("Host absent", COMP + STD, "malformed_signature", r=req(headers=()))
    hb("two Host lines", COMP + STD, "malformed_signature", r=req(headers=(("Host", "a"), ("Host", "a"))))
    hb("Host empty after userinfo", COMP + STD, "malformed_signature", r=req(headers=(("Host", "user@"),)))
    hb("Host non-ASCII", COMP + STD, "malformed_signature", r=req(headers=(("Host", "caf\xe9".encode("latin-1")),)))
    hb("Host h::80 (two colons outside brackets)", COMP + STD, "malformed_signature", r=req(headers=(("Host", "h::80"),)))
    hb("Host a:80:80 (two ports)", COMP + STD, "malformed_signature", r=req(headers=(("Host", "h:80:80"),)))
    hb("Host unbracketed ipv6-ish ::1:80", COMP + STD, "malformed_signature", r=req(headers=(("Host", "::1:80"),)))
    hb("Host :80 (no host)", COMP + STD, "malformed_signature", r=req(headers=(("Host", ":80"),)))
    hb("Host u@:443 (no host after userinfo)", COMP + STD, "malformed_signature", r=req(headers=(("Host", "u@:443"),)))
    hb("Host [::1]:80 (bracketed, one port)", COMP + STD, "valid", r=req(headers=(("Host", "[::1]:80"),)))
    hb("Host [::1:80 (unbalanced '[')", COMP + STD, "malformed_signature", r=req(headers=(("Host", "[::1:80"),)))
    hb("Host ::1]:80 (unbalanced ']')", COMP + STD, "malformed_signature", r=req(headers=(("Host", "::1]:80"),)))
    hb("Host trailing dot", COMP + STD, "valid", r=req(headers=(("Host", "Example.COM.:80"),)))
    hb("absolute-form, no Host", COMP + STD, "valid", r=req(target="http://H.example:80/x?y", headers=()))
    hb("absolute-form, empty path", COMP + STD, "valid", r=req(target="http://h.example?y", headers=()))
    hb("absolute-form with userinfo", COMP + STD, "valid", r=req(target="http://u:p@h.example/x", headers=()))
    hb("absolute-form ws scheme", COMP[:-1] + ' "@scheme")' + STD, "valid", r=req(target="ws://h.example:80/x", headers=()))
    hb("OPTIONS *", COMP[:-1] + ' "@request-target")' + STD, "valid", r=req(method="OPTIONS", target="*"))
    hb("CONNECT authority-form", '("@method" "@authority" "@request-target" "@path" "@query" "content-digest")' + STD,
       "valid", r=req(method="CONNECT", target="h.example:443", headers=(("Host", "h.example:443"),)))
    hb("Content-Digest sha-512 wrong length", COMP + STD, "digest_mismatch",
       r=req(headers=(("Host", "h"), ("Content-Digest", "sha-512=:AAAA:"))))
    hb("Content-Digest sha-256 ok + sha-512 wrong", COMP + STD, "digest_mismatch",
       r=req(headers=(("Host", "h"), ("Content-Digest", "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:, sha-512=:AAAA:"))))
    hb("Content-Digest with unknown alg + sha-256", COMP + STD, "valid",
       r=req(headers=(("Host", "h"), ("Content-Digest", "unixsum=:AAAA:, sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"))))
    hb("Content-Digest member with params", COMP + STD, "valid",
       r=req(headers=(("Host", "h"), ("Content-Digest", "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:;x=1"))))
    hb("Content-Digest two lines", COMP + STD, "valid",
       r=req(headers=(("Host", "h"), ("Content-Digest", "md5=:AA==:"), ("Content-Digest", "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"))))
    hb("Content-Digest upper-case alg (not an sf-key)", COMP + STD, "malformed_signature",
       r=req(headers=(("Host", "h"), ("Content-Digest", "SHA-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"))))
    # step order and more edge cases
    hb("empty roles field without user", COMP[:-1] + ' "x-auth-roles")' + STD, "malformed_signature", add=(("X-Auth-Roles", ""),))
    hb("uncovered X-Auth-User beats unknown keyid", COMP + STD.replace('keyid="k1"', 'keyid="zz"'), "insufficient_coverage",
       add=(("X-Auth-User", "u"),))
    hb("bad component beats unknown keyid", '("@method" "@authority" "@path" "@query" "content-digest" "@signature-params")'
       + STD.replace('keyid="k1"', 'keyid="zz"'), "malformed_signature")
    hb("missing_digest (step 9) beats uncovered identity", '("@method" "@authority" "@path" "@query")' + STD,
       "missing_digest", add=(("X-Auth-User", "u"),))
    hb("expired beats bad component", '("@nope")' + STD, "expired", now=N + 100)
    hb("keyid token beats created absent", COMP + ';keyid=k1;nonce="%s";tag="countersign"' % NONCE, "malformed_signature")
    hb("tag repeated, last is ours", COMP + STD.replace('tag="countersign"', 'tag="x";tag="countersign"'), "valid")
    hb("tag repeated, last is other", COMP + STD + ';tag="x"', "missing_signature")
    hb("expires 16 digits", COMP + ';created=%d;expires=1000000000000000;nonce="%s";keyid="k1";tag="countersign"' % (N, NONCE),
       "malformed_signature")
    hb("created at MAX (no expires)", COMP + ';created=999999999999999;nonce="%s";keyid="k1";tag="countersign"' % NONCE,
       "valid", now=999999999999999)
    hb("userinfo with two @", COMP + STD, "valid", r=req(headers=(("Host", "a@b@H.example:80"),)))
    hb("Host with port 0080", COMP + STD, "valid", r=req(headers=(("Host", "h:0080"),)))
    hb("absolute-form IPv6", COMP + STD, "valid", r=req(target="http://[::1]:80/x", headers=()))
    hb("absolute-form query '?' only", COMP + STD, "valid", r=req(target="http://h?", headers=()))
    hb("field with HTAB inside", COMP[:-1] + ' "x-t")' + STD, "valid", r=req(headers=(("Host", "h"), ("X-T", "a\tb"))))
    hb(";bs with an empty line", COMP[:-1] + ' "x-b";bs)' + STD, "valid", r=req(headers=(("Host", "h"), ("X-B", ""), ("X-B", "z"))))
    hb(";key over two lines, member overwritten", COMP[:-1] + ' "x-d";key="a")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-D", "a=1;x"), ("X-D", "b, a=?0"))))
    hb(";key member bare boolean true", COMP[:-1] + ' "x-d";key="a")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-D", "a;p=1"),)))
    hb(";key member with string escapes", COMP[:-1] + ' "x-d";key="a")' + STD, "valid",
       r=req(headers=(("Host", "h"), ("X-D", 'a="q\\"x\\\\"'),)))
    hb("65 junk components, Signature absent", "(" + " ".join("%d" % i for i in range(65)) + ")" + STD, "malformed_signature",
       drop=("signature",))
    hb("Signature-Input with a leading empty line", COMP + STD, "malformed_signature",
       add=(("Signature-Input", ""),))
    h.diff_verify("Signature label repeated, last wins", manual(req(), K, COMP + STD).replace(
        b"Signature: countersign=", b"Signature: countersign=:AAAA:, countersign="), expect="valid")
    # RFC 8941 parsing: a foreign member next to ours must parse (or fail) alike
    for foreign in ['a=("x"\t"y")', 'a=1,\tb=2', '*a=1', 'a=1;B=2', 'a=1.1234', 'a=1234567890123.1', 'a=123456789012.1',
                    'a=(  )', 'a=()', 'a=(1);', 'a=?2', 'a=:A:', 'a=:A===:', 'a=:AB=C:', 'a=x;y', 'a', 'a=1 ,b=2', 'a=1,b',
                    'a=%x', 'a=-', 'a=1.', 'a="\\x"', 'a=tok:en/x', 'a=(1 2);x', 'a=((1))', 'a=-999999999999999',
                    'a=-1000000000000000', 'a=*', 'a=(1)(2)']:
        h.diff_verify("foreign member %r" % foreign, manual(req(), K, COMP + STD, add=(("Signature-Input", foreign),)))
    # derived components beyond the profile
    C5 = '("@method" "@authority" "@path" "@query" "content-digest"'
    for extra, r in [(' "@request-target")', req(target="http://H.example:80/x?y", headers=())),
                     (' "@target-uri")', req(target="HTTP://H.example:80/x?y", headers=())),
                     (' "@scheme")', req(target="HTTPS://H.example/x", headers=())),
                     (' "@request-target")', req(target="http://H.example?y", headers=())),
                     (' "@target-uri")', req(target="http://H.example?y", headers=())),
                     (' "@target-uri")', req(target="https://u@H.example:443", headers=())),
                     (' "@query-param";name="a%2Bb")', req(target="/p?a%2Bb=1%2b")),
                     (' "@query-param";name="")', req(target="/p?=1&&b=2")),
                     (' "@query-param";name="a")', req(target="/p?a")),
                     (' "@target-uri")', req(target="/p?q", headers=(("Host", "u@H:80"),))),
                     (' "@request-target")', req(method="OPTIONS", target="*")),
                     (' "@target-uri")', req(method="OPTIONS", target="*")),
                     (' "@request-target")', req(method="CONNECT", target="h.example:443", headers=(("Host", "h.example:443"),))),
                     (' "@request-target")', req(method="CONNECT", target="H.Example:80", headers=(("Host", "H.Example:80"),))),
                     (' "@target-uri")', req(method="CONNECT", target="h.example:443", headers=(("Host", "h.example:443"),)))]:
        hb("%s %s %s" % (extra.strip(' )'), r.method, r.target), C5 + extra + STD, "valid", r=r)
    h.diff_verify("Signature with params on member", manual(req(), K, COMP + STD).replace(b"=:\r\n\r\n", b"=:;x=1\r\n\r\n"),
                  expect="valid")
    h.diff_verify("Signature-Input member not an inner list (item) with our tag",
                  req(headers=(("Host", "h"), ("Signature-Input", 'countersign="x";tag="countersign"'),
                               ("Signature", "countersign=:AAAA:"))).to_bytes(), expect="missing_signature")
    h.diff_verify("Signature-Input present, Signature absent", manual(req(), K, COMP + STD, drop=("signature",)),
                  expect="missing_signature")
    h.diff_verify("Signature dictionary invalid", manual(req(), K, COMP + STD).replace(b"Signature: countersign=", b"Signature: countersign=,"),
                  expect="malformed_signature")
    h.diff_verify("Signature-Input 2 lines, Signature 2 lines", manual(req(), K, COMP + STD, label="b",
                                                                     add=(("Signature-Input", 'a=("@method");tag="x"'),
                                                                          ("Signature", "a=:AAAA:"))),
                  expect="valid")


def run_keyring_loader(h):
    """The keyring rules of PROTOCOL.md §5 (and the file format): countersign's loader and ours
    must accept and refuse the same files."""
    S32 = base64.b64encode(WORKED_SECRET).decode()
    cases = [
        ("plain", kr_text(), True),
        ("rotation 6h", kr_text(rotation="6h"), True),
        ("rotation 1s", kr_text(rotation="1s"), True),
        ("rotation 365d", kr_text(rotation="365d"), True),
        ("rotation 366d", kr_text(rotation="366d"), False),
        ("rotation 0s", kr_text(rotation="0s"), False),
        ("rotation 1500ms", kr_text(rotation="1500ms"), False),
        ("rotation 2000ms", kr_text(rotation="2000ms"), True),
        ("rotation ' 6h '", kr_text(rotation=" 6h "), True),
        ("id with '.' and rotation off", kr_text(active="a.b", keys=(("a.b", WORKED_SECRET, False),)), True),
        ("id with '.' and rotation on", kr_text(active="a.b", rotation="1h", keys=(("a.b", WORKED_SECRET, False),)), False),
        ("retired id with '.' and rotation on", kr_text(rotation="1h", keys=(("k1", WORKED_SECRET, False), ("o.ld", WORKED_SECRET, True))), False),
        ("id with space", kr_text(active="k 1", keys=(("k 1", WORKED_SECRET, False),)), False),
        ("id with non-ASCII", kr_text(active="k\u00e9", keys=(("k\u00e9", WORKED_SECRET, False),)), False),
        ("id empty", kr_text(active="", keys=(("", WORKED_SECRET, False),)), False),
        ("id with tab", 'active = "k\\t1"\n[[keys]]\nid = "k\\t1"\nsecret = "%s"\n' % S32, False),
        ("id with quote", 'active = \'k"1\'\n[[keys]]\nid = \'k"1\'\nsecret = "%s"\n' % S32, False),
        ("id with backslash", "active = 'k\\1'\n[[keys]]\nid = 'k\\1'\nsecret = \"%s\"\n" % S32, False),
        ("secret 31 bytes", kr_text(keys=(("k1", b"\x01" * 31, False),)), False),
        ("secret 64 bytes", kr_text(keys=(("k1", b"\x01" * 64, False),)), True),
        ("active not listed", kr_text(active="k2"), False),
        ("active retired", kr_text(keys=(("k1", WORKED_SECRET, True),)), False),
        ("rotation absent", 'active = "k1"\n[[keys]]\nid = "k1"\nsecret = "%s"\n' % S32, True),
        ("key rotation 6h", kr_text(keys=(("k1", WORKED_SECRET, False, "6h"),)), True),
        ("key rotation off under top-level 1h", kr_text(rotation="1h", keys=(("k1", WORKED_SECRET, False, "off"),)), True),
        ("key rotation 0s", kr_text(keys=(("k1", WORKED_SECRET, False, "0s"),)), False),
        ("key rotation 366d", kr_text(keys=(("k1", WORKED_SECRET, False, "366d"),)), False),
        ("key rotation 1500ms", kr_text(keys=(("k1", WORKED_SECRET, False, "1500ms"),)), False),
        ("id with '.' beside a key rotating by its own setting",
         kr_text(keys=(("k1", WORKED_SECRET, False, "1h"), ("a.b", WORKED_SECRET, False))), False),
        ("id with '.', every key's own rotation off under top-level 1h",
         kr_text(active="a.b", rotation="1h", keys=(("a.b", WORKED_SECRET, False, "off"), ("k1", WORKED_SECRET, False, "off"))), True),
    ]
    req_bytes = req().to_bytes()
    for name, text, want in cases:
        path = os.path.join(h.tmp, "loader.toml")
        with open(path, "w") as f:
            f.write(text)
        rc, out, err = h._run(["verify", "--keyring", path, "--now", "1700000000", "-"], req_bytes)
        cs_ok = rc != 2
        try:
            Keyring(text)
            py_ok = True
        except Exception as e:  # noqa: BLE001
            py_ok = False
        h.check("keyring loader: %s" % name, cs_ok == py_ok == want,
                "countersign %s (%s) python %s doc %s" % ("accepts" if cs_ok else "refuses",
                                                          err.decode(errors="replace").strip()[:160],
                                                          "accepts" if py_ok else "refuses",
                                                          "accepts" if want else "refuses"))


def run_demo_api(h):
    """Phase 2/3 and the HTTP form through `countersign demo-api` (the real VerifyLayer)."""
    import socket
    import time
    krpath, kr = h.keyring(WORKED_KEYRING)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([h.bin, "demo-api", "--listen", "127.0.0.1:%d" % port, "--keyring", krpath],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

        def send(raw):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                c.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                # The API may answer before the whole body is sent (413 for a body announced
                # over its limit) and close: its answer is read below, as a browser would.
                pass
            data = b""
            while True:
                try:
                    chunk = c.recv(65536)
                except socket.timeout:
                    break
                except ConnectionResetError:
                    # Closed with the rest of our body unread: what came before is the answer.
                    break
                if not chunk:
                    break
                data += chunk
            c.close()
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
            hdrs = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                hdrs[k.strip().lower().decode()] = v.strip().decode(errors="replace")
            return status, hdrs, body

        def reason_of(body):
            try:
                return json.loads(body.decode()).get("error")
            except Exception:  # noqa: BLE001
                return None

        hostport = "127.0.0.1:%d" % port
        base_headers = (("Host", hostport), ("Connection", "close"))

        def signed(method="GET", target="/api/whoami", headers=base_headers, body=b"", **kw):
            return sign(req(method, target, headers, body), kr, int(time.time()), base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("="), **kw)

        def api(name, r, want_status, want_reason=None, check_py=True):
            raw = r.to_bytes() if isinstance(r, Request) else r
            st, hd, body = send(raw)
            ok = st == want_status and (want_reason is None or reason_of(body) == want_reason)
            detail = "got %d %r" % (st, body[:200])
            if check_py and want_reason not in ("replayed",) and isinstance(r, Request):
                pv = verify(parse_raw(raw), kr, int(time.time()))
                pr = "valid" if pv["valid"] else pv["reason"]
                ok = ok and pr == (want_reason or "valid")
                detail += " python=%s" % pr
            h.check("demo-api: " + name, ok, detail)
            return st, hd, body

        r = signed(user="Zoë, 100% 🦀", roles=["a,b", "r&d"])
        st, _, body = api("whoami with odd identity", r, 200)
        try:
            j = json.loads(body.decode())
            h.check("demo-api: identity decoded", "Zoë, 100% 🦀" in json.dumps(j, ensure_ascii=False)
                    and "a,b" in json.dumps(j, ensure_ascii=False), repr(j))
        except Exception as e:  # noqa: BLE001
            h.check("demo-api: identity decoded", False, repr(e) + repr(body[:200]))
        api("same request again -> replayed", r, 401, "replayed", check_py=False)
        r = signed("POST", "/api/echo", body=b"\x00\xffbinary")
        r.body = b"\x01\xffbinary"
        api("body changed -> digest_mismatch", r, 401, "digest_mismatch")
        api("unsigned -> missing_signature", req("GET", "/api/whoami", base_headers), 401, "missing_signature")
        big = b"a" * (1024 * 1024 + 1)
        api("body 1 MiB + 1 -> body_too_large", signed("POST", "/api/echo", body=big), 413, "body_too_large", check_py=False)
        api("body exactly 1 MiB accepted", signed("POST", "/api/echo", body=b"a" * (1024 * 1024), user="u"), 200, check_py=False)
        r = signed("POST", "/api/echo", body=b"{}", digests=("sha-512",), user="u")
        api("sha-512 digest through the layer", r, 200)
        r = signed("GET", "http://%s/api/whoami" % hostport.upper(), headers=(("Connection", "close"), ("Host", hostport)), user="u")
        api("absolute-form target", r, 200)
        r = signed("POST", "/api/echo", body=b"x", user="u")
        r.headers = [(k, b"2097152" if k.lower() == "content-length" else v) for k, v in r.headers]
        r.body = b""
        api("Content-Length over the limit, no body sent -> 413 at once", r, 413, "body_too_large", check_py=False)
        r = signed("GET", "/api/whoami")
        r.remove("signature")
        r.add("Content-Type", "application/grpc+proto")
        st, hd, body = api("gRPC form of missing_signature", r, 200, check_py=False)
        h.check("demo-api: gRPC trailers-only", hd.get("grpc-status") == "16" and hd.get("grpc-message") == "missing_signature"
                and hd.get("content-type", "").startswith("application/grpc"), repr(hd))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--countersign", required=True, help="path to the countersign binary")
    ap.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    a = ap.parse_args()
    if tomllib is None:
        print("needs Python >= 3.11 (tomllib)")
        return 2
    h = Harness(os.path.abspath(a.countersign), a.verbose)
    try:
        run_all(h)
        run_keyring_loader(h)
        run_demo_api(h)
    finally:
        h.close()
    print("%d passed, %d failed" % (h.passed, len(h.failed)))
    return 1 if h.failed else 0


if __name__ == "__main__":
    sys.exit(main())
