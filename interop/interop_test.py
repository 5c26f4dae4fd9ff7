#!/usr/bin/env python3
"""Interoperability of countersign with an independent RFC 9421 implementation.

The peer is the PyPI package `http-message-signatures` (pinned in requirements.txt), used
through its public API wherever it can express our profile:

  A. `countersign sign` output  -> HTTPMessageVerifier (HMAC-SHA256, tag "countersign",
     required components, Content-Digest checked against the body).
  B. HTTPMessageSigner          -> `countersign verify --now ...` (exit 0, JSON valid:true,
     user decoded).
  C. Byte-exact profile: the peer builds the signature base with the countersign parameter
     order (see README.md for why this needs the library's internal base builder) and the
     result must equal, byte for byte, the Signature-Input and Signature that `countersign sign`
     writes for the same request, created and nonce.

Plus negative cases each way: a tampered request must be rejected.

Usage: interop_test.py --bin PATH/TO/countersign [--workdir DIR]
Prints one line per check and finally `N passed, M failed`; exits 1 on any failure.
"""

import argparse
import base64
import collections
import datetime
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    InvalidSignature,
    MappingKeyResolver,
    algorithms,
)
from http_sf.compat import Item

PROFILE_COMPONENTS = ("@method", "@authority", "@path", "@query", "content-digest")
TAG = "countersign"
LABEL = "countersign"
KEYID = "k1"


# ---------------------------------------------------------------------------------------------
# A raw HTTP/1.1 request, as the CLI reads and writes it.


class Headers:
    """Header field lines in wire order; the mutable mapping interface the library needs."""

    def __init__(self, lines=None):
        self.lines = list(lines or [])

    def items(self):
        return list(self.lines)

    def __iter__(self):
        return iter(dict.fromkeys(name for name, _ in self.lines))

    def __contains__(self, name):
        return any(n.lower() == name.lower() for n, _ in self.lines)

    def __getitem__(self, name):
        values = [v for n, v in self.lines if n.lower() == name.lower()]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __setitem__(self, name, value):
        if name in self:
            del self[name]
        self.lines.append((name, value))

    def __delitem__(self, name):
        self.lines = [(n, v) for n, v in self.lines if n.lower() != name.lower()]


class Request:
    """What the library's component resolver reads: method, absolute url, headers."""

    def __init__(self, method, target, headers, body, scheme="http"):
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.scheme = scheme

    @property
    def url(self):
        return f"{self.scheme}://{self.headers['Host']}{self.target}"

    def to_bytes(self):
        head = f"{self.method} {self.target} HTTP/1.1\r\n"
        head += "".join(f"{n}: {v}\r\n" for n, v in self.headers.lines)
        return head.encode("latin-1") + b"\r\n" + self.body

    @staticmethod
    def parse(raw):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("no end of headers")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ")
        headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.lines.append((name, value.strip(" \t")))
        length = int(headers["Content-Length"]) if "Content-Length" in headers else len(rest)
        return Request(method, target, headers, rest[:length])


def new_request(method, target, host, body=b"", extra=()):
    headers = Headers([("Host", host)] + list(extra))
    if body or method in ("POST", "PUT", "PATCH"):
        headers.lines.append(("Content-Length", str(len(body))))
    return Request(method, target, headers, body)


def pct(value):
    """The profile's identity encoding: every byte outside A-Z a-z 0-9 - . _ ~ encoded."""
    return urllib.parse.quote(value.encode("utf-8"), safe="-._~")


# ---------------------------------------------------------------------------------------------
# The countersign binary.


class Cli:
    def __init__(self, binary, keyring_path):
        self.binary = binary
        self.keyring = keyring_path

    def run(self, args, stdin):
        proc = subprocess.run(
            [self.binary] + args, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60
        )
        return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")

    def sign(self, request, *extra):
        code, out, err = self.run(["sign", "--keyring", self.keyring, *extra], request.to_bytes())
        if code != 0:
            raise AssertionError(f"countersign sign exited {code}: {err}")
        return Request.parse(out)

    def verify(self, request, now, *extra):
        code, out, err = self.run(
            ["verify", "--keyring", self.keyring, "--now", str(now), *extra], request.to_bytes()
        )
        lines = out.decode("utf-8").splitlines()
        if len(lines) != 1:
            raise AssertionError(f"expected one JSON line, got {out!r} (exit {code}, stderr {err})")
        return code, json.loads(lines[0])


# ---------------------------------------------------------------------------------------------
# The checks.


class Suite:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            fn()
        except Exception:  # a failing check must never stop the others
            self.failed += 1
            print(f"FAIL {name}")
            print("     " + traceback.format_exc().strip().replace("\n", "\n     "))
        else:
            self.passed += 1
            print(f"ok   {name}")


def py_verifier(secret, keyid=KEYID):
    return HTTPMessageVerifier(
        signature_algorithm=algorithms.HMAC_SHA256,
        key_resolver=MappingKeyResolver(public_keys={keyid: secret}, private_keys={}),
    )


def py_signer(secret, keyid=KEYID):
    return HTTPMessageSigner(
        signature_algorithm=algorithms.HMAC_SHA256,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={keyid: secret}),
    )


def sign_with_python(signer, req, keyid, created, covered, expires=None, nonce=None):
    """Signs `req` with the Python library as a countersign signer would: our label and tag,
    `created` (and `expires` when given) in unix seconds, a fresh nonce unless one is given."""
    extra = {}
    if expires is not None:
        extra["expires"] = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
    signer.sign(
        req,
        key_id=keyid,
        created=datetime.datetime.fromtimestamp(created, datetime.timezone.utc),
        nonce=nonce or secrets.token_urlsafe(16),
        label=LABEL,
        tag=TAG,
        covered_component_ids=covered,
        body=req.body,
        **extra,
    )


def required_components(request):
    names = list(PROFILE_COMPONENTS)
    for header in ("x-auth-user", "x-auth-roles"):
        if header in request.headers:
            names.append(header)
    return names


def py_verify(secret, request, keyid=KEYID):
    results = py_verifier(secret, keyid).verify(
        request,
        expect_tag=TAG,
        require_components=required_components(request),
        body=request.body,
    )
    if len(results) != 1:
        raise AssertionError(f"expected one verified signature, got {len(results)}")
    return results[0]


def expect_rejected_by_python(secret, request, keyid=KEYID):
    try:
        py_verify(secret, request, keyid)
    except InvalidSignature:
        return
    raise AssertionError("the Python verifier accepted a tampered request")


def replace_header(request, name, value):
    lines = [(n, value if n.lower() == name.lower() else v) for n, v in request.headers.lines]
    return Request(request.method, request.target, Headers(lines), request.body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="path to the countersign binary")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="countersign-interop-")
    os.makedirs(workdir, exist_ok=True)
    secret = secrets.token_bytes(32)
    other_secret = secrets.token_bytes(32)
    keyring = os.path.join(workdir, "keys.toml")
    with open(keyring, "w") as f:
        f.write(f'active = "{KEYID}"\n[[keys]]\nid = "{KEYID}"\nsecret = "{base64.b64encode(secret).decode()}"\n')
    cli = Cli(os.path.abspath(args.bin), keyring)
    suite = Suite()
    user = "Zoë 名前 🦀"
    roles = ["admin", "rôle"]

    # -- A: countersign signs, the Python library verifies ----------------------------------

    def a_post_with_identity():
        req = new_request(
            "POST",
            "/orders/42?expand=items&x=%20y",
            "API.Example.com:80",
            b'{"qty": 3}',
            [("Content-Type", "application/json")],
        )
        signed = cli.sign(req, "--user", user, "--roles", ",".join(roles))
        result = py_verify(secret, signed)
        assert result.label == LABEL, result.label
        assert result.parameters["tag"] == TAG and result.parameters["alg"] == "hmac-sha256", result.parameters
        assert result.parameters["keyid"] == KEYID
        assert result.body == b'{"qty": 3}', result.body
        assert result.covered_components['"@authority"'] == "api.example.com", result.covered_components
        assert result.covered_components['"@query"'] == "?expand=items&x=%20y"
        assert urllib.parse.unquote(signed.headers["X-Auth-User"], errors="strict") == user
        assert [urllib.parse.unquote(r) for r in signed.headers["X-Auth-Roles"].split(",")] == roles
        # The Python verifier enforces created/expires against its own clock.
        assert abs(result.parameters["created"] - int(time.time())) < 60
        assert result.parameters["expires"] == result.parameters["created"] + 10

    def a_get_without_identity_or_body():
        signed = cli.sign(new_request("GET", "/health", "localhost:8080"))
        result = py_verify(secret, signed)
        assert "x-auth-user" not in " ".join(result.covered_components), result.covered_components
        assert result.covered_components['"@query"'] == "?"
        assert result.covered_components['"@authority"'] == "localhost:8080"

    def a_tampered_body_rejected():
        signed = cli.sign(new_request("PUT", "/doc", "api.test", b"original"), "--user", "alice")
        signed.body = b"0riginal"
        expect_rejected_by_python(secret, signed)

    def a_tampered_user_rejected():
        signed = cli.sign(new_request("PUT", "/doc", "api.test", b"x"), "--user", "alice")
        expect_rejected_by_python(secret, replace_header(signed, "X-Auth-User", "mallory"))

    def a_tampered_path_rejected():
        signed = cli.sign(new_request("GET", "/a", "api.test"), "--user", "alice")
        signed.target = "/b"
        expect_rejected_by_python(secret, signed)

    def a_wrong_secret_rejected():
        signed = cli.sign(new_request("GET", "/a", "api.test"), "--user", "alice")
        expect_rejected_by_python(other_secret, signed)

    def a_unusual_targets():
        for target in ("/", "/?", "/a%2Fb%C3%A9/~x?q=%E2%9C%93&empty=&flag", "/p;matrix=1/q?a=1&a=2"):
            signed = cli.sign(new_request("GET", target, "[::1]:8443"), "--user", "u")
            result = py_verify(secret, signed)
            path, _, query = target.partition("?")
            assert result.covered_components['"@path"'] == path, (target, result.covered_components)
            assert result.covered_components['"@query"'] == "?" + query, (target, result.covered_components)
            assert result.covered_components['"@authority"'] == "[::1]:8443", result.covered_components

    suite.check("A1 countersign sign -> python verify: POST, Unicode user and roles, digest", a_post_with_identity)
    suite.check("A2 countersign sign -> python verify: GET, no identity, empty body", a_get_without_identity_or_body)
    suite.check("A3 countersign sign -> python verify: tampered body rejected", a_tampered_body_rejected)
    suite.check("A4 countersign sign -> python verify: tampered X-Auth-User rejected", a_tampered_user_rejected)
    suite.check("A5 countersign sign -> python verify: tampered path rejected", a_tampered_path_rejected)
    suite.check("A6 countersign sign -> python verify: wrong secret rejected", a_wrong_secret_rejected)
    suite.check("A7 countersign sign -> python verify: root, empty query, encoded path, IPv6 authority", a_unusual_targets)

    # -- B: the Python library signs (public API), countersign verifies ---------------------

    created = int(time.time())

    def py_sign(req, with_roles=False, nonce=None):
        covered = list(PROFILE_COMPONENTS) + ["x-auth-user"] + (["x-auth-roles"] if with_roles else [])
        req.headers["X-Auth-User"] = pct(user)
        if with_roles:
            req.headers["X-Auth-Roles"] = ",".join(pct(r) for r in roles)
        sign_with_python(py_signer(secret), req, KEYID, created, covered, expires=created + 10, nonce=nonce)
        return req

    def b_python_signed_accepted():
        req = py_sign(new_request("POST", "/v1/things?limit=5&q=a%2Fb", "Api.Test:443", b'{"a": [1, 2]}'))
        code, answer = cli.verify(req, created + 1)
        assert code == 0, answer
        assert answer == {"valid": True, "user": user, "roles": [], "keyid": KEYID}, answer

    def b_python_signed_with_roles_accepted():
        req = py_sign(new_request("DELETE", "/v1/things/7", "api.test", b""), with_roles=True)
        code, answer = cli.verify(req, created)
        assert code == 0, answer
        assert answer == {"valid": True, "user": user, "roles": roles, "keyid": KEYID}, answer

    def b_tampered_body_rejected():
        req = py_sign(new_request("POST", "/v1/things", "api.test", b"payload"))
        req.body = b"PAYLOAD"
        code, answer = cli.verify(req, created)
        assert (code, answer) == (1, {"valid": False, "reason": "digest_mismatch"}), (code, answer)

    def b_tampered_user_rejected():
        req = replace_header(py_sign(new_request("GET", "/x", "api.test")), "X-Auth-User", "mallory")
        code, answer = cli.verify(req, created)
        assert (code, answer) == (1, {"valid": False, "reason": "bad_signature"}), (code, answer)

    def b_expired_rejected():
        req = py_sign(new_request("GET", "/x", "api.test"))
        code, answer = cli.verify(req, created + 3600)
        assert (code, answer) == (1, {"valid": False, "reason": "expired"}), (code, answer)

    def b_uncovered_identity_rejected():
        # Signed without covering x-auth-user, then the header is added: a forgery.
        req = new_request("GET", "/x", "api.test")
        sign_with_python(py_signer(secret), req, KEYID, created, list(PROFILE_COMPONENTS))
        req.headers["X-Auth-User"] = "admin"
        code, answer = cli.verify(req, created)
        assert (code, answer) == (1, {"valid": False, "reason": "insufficient_coverage"}), (code, answer)

    class Sha512Digest(ContentDigest):
        algorithm = "sha-512"

    def b_sha512_content_digest():
        req = new_request("POST", "/upload", "api.test", b"x" * 1000)
        signer = py_signer(secret)
        signer.content_digest_class = Sha512Digest
        req.headers["X-Auth-User"] = pct(user)
        sign_with_python(signer, req, KEYID, created, list(PROFILE_COMPONENTS) + ["x-auth-user"])
        assert req.headers["Content-Digest"].startswith("sha-512=:"), req.headers["Content-Digest"]
        code, answer = cli.verify(req, created)
        assert code == 0 and answer["user"] == user, answer
        req.body = b"x" * 999 + b"y"
        code, answer = cli.verify(req, created)
        assert (code, answer) == (1, {"valid": False, "reason": "digest_mismatch"}), (code, answer)

    suite.check("B1 python sign (library parameter order) -> countersign verify: accepted, user decoded", b_python_signed_accepted)
    suite.check("B2 python sign with x-auth-roles -> countersign verify: roles decoded", b_python_signed_with_roles_accepted)
    suite.check("B3 python sign -> countersign verify: tampered body is digest_mismatch", b_tampered_body_rejected)
    suite.check("B4 python sign -> countersign verify: tampered X-Auth-User is bad_signature", b_tampered_user_rejected)
    suite.check("B5 python sign -> countersign verify --now +1h: expired", b_expired_rejected)
    suite.check("B6 python sign without identity coverage + added X-Auth-User: insufficient_coverage", b_uncovered_identity_rejected)
    suite.check("B7 python sign with a sha-512 Content-Digest -> countersign verify: accepted; tampered rejected", b_sha512_content_digest)

    # -- C: byte-exact profile (countersign parameter order) --------------------------------

    def c_profile_order_byte_exact():
        nonce = "aW50ZXJvcC1ub25jZS0xMjM0NQ"
        body = b'{"hello": "world"}'
        template = new_request("PATCH", "/profile/me?lang=fr", "api.example.com", body)
        # countersign's own output for this request, created and nonce.
        ours = cli.sign(template, "--user", user, "--roles", ",".join(roles), "--created", str(created), "--nonce", nonce)

        # The peer: same request, its own Content-Digest, its own signature base builder, the
        # profile's parameter order, HMAC-SHA256 from the library's algorithm class.
        theirs = new_request("PATCH", "/profile/me?lang=fr", "api.example.com", body)
        theirs.headers["Content-Digest"] = py_signer(secret).content_digest_class.create(body)
        theirs.headers["X-Auth-User"] = pct(user)
        theirs.headers["X-Auth-Roles"] = ",".join(pct(r) for r in roles)
        signer = py_signer(secret)
        covered = [Item(c) for c in PROFILE_COMPONENTS + ("x-auth-user", "x-auth-roles")]
        params = collections.OrderedDict(
            [
                ("created", created),
                ("expires", created + 10),
                ("nonce", nonce),
                ("keyid", KEYID),
                ("alg", "hmac-sha256"),
                ("tag", TAG),
            ]
        )
        base, params_node, _ = signer._build_signature_base(
            theirs, covered_component_ids=covered, signature_params=params
        )
        mac = algorithms.HMAC_SHA256(shared_secret=secret).sign(base.encode())
        their_input = f"{LABEL}={params_node}"
        their_signature = f"{LABEL}=:{base64.b64encode(mac).decode()}:"

        assert ours.headers["Content-Digest"] == theirs.headers["Content-Digest"], (
            ours.headers["Content-Digest"],
            theirs.headers["Content-Digest"],
        )
        assert ours.headers["Signature-Input"] == their_input, (ours.headers["Signature-Input"], their_input)
        assert ours.headers["Signature"] == their_signature, (ours.headers["Signature"], their_signature)

        # And countersign verify accepts the peer's message.
        theirs.headers["Signature-Input"] = their_input
        theirs.headers["Signature"] = their_signature
        code, answer = cli.verify(theirs, created)
        assert code == 0 and answer["user"] == user and answer["roles"] == roles, answer

    suite.check("C1 profile parameter order: python base + MAC == countersign sign, byte for byte", c_profile_order_byte_exact)

    # -- C2: automatic rotation, derived keys computed by the peer from docs/PROTOCOL.md -----

    period = 3600
    rotating_keyring = os.path.join(workdir, "rotating.toml")
    with open(rotating_keyring, "w") as f:
        f.write(
            f'active = "{KEYID}"\nrotation = "1h"\n[[keys]]\nid = "{KEYID}"\n'
            f'secret = "{base64.b64encode(secret).decode()}"\n'
        )
    rotating_cli = Cli(cli.binary, rotating_keyring)

    def derived_key(keyid):
        # HKDF-SHA256(ikm = secret, salt = "countersign/v1", info = keyid), 32 bytes.
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"countersign/v1", info=keyid.encode()).derive(secret)

    def c_rotation_both_ways():
        now = int(time.time())  # one clock reading for both sides: no race at an epoch boundary
        epoch_keyid = f"{KEYID}.{now // period}"
        signed = rotating_cli.sign(
            new_request("POST", "/r", "api.test", b"rotated"), "--user", user, "--created", str(now)
        )
        assert f'keyid="{epoch_keyid}"' in signed.headers["Signature-Input"], signed.headers["Signature-Input"]
        result = py_verify(derived_key(epoch_keyid), signed, keyid=epoch_keyid)
        assert result.parameters["keyid"] == epoch_keyid
        expect_rejected_by_python(secret, signed, keyid=epoch_keyid)  # the base secret itself must not verify

        req = new_request("GET", "/r", "api.test")
        req.headers["X-Auth-User"] = pct(user)
        keyid = f"{KEYID}.{created // period}"
        sign_with_python(
            py_signer(derived_key(keyid), keyid=keyid), req, keyid, created, list(PROFILE_COMPONENTS) + ["x-auth-user"]
        )
        code, answer = rotating_cli.verify(req, created)
        assert code == 0 and answer["keyid"] == keyid and answer["user"] == user, answer
        # A keyid naming another epoch than `created`'s is unknown.
        wrong = f"{KEYID}.{created // period + 1}"
        req2 = new_request("GET", "/r", "api.test")
        sign_with_python(py_signer(derived_key(wrong), keyid=wrong), req2, wrong, created, list(PROFILE_COMPONENTS))
        code, answer = rotating_cli.verify(req2, created)
        assert (code, answer) == (1, {"valid": False, "reason": "unknown_key"}), (code, answer)

    suite.check("C2 rotation: peer derives HKDF epoch keys; verifies countersign, signs for countersign", c_rotation_both_ways)

    print(f"{suite.passed} passed, {suite.failed} failed")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
