// Interoperability of countersign with the npm package `http-message-signatures` (dhensby),
// an independent RFC 9421 implementation in JavaScript, pinned in package.json/package-lock.json.
//
//   A. `countersign sign`            -> the JS library's verifyMessage (HMAC-SHA256, tag
//                                       selected in keyLookup, profile components required),
//                                       Content-Digest recomputed in JS.
//   B. the JS library's signMessage  -> `countersign verify --now` (CLI): byte-exact with
//                                       `countersign sign`, the docs/PROTOCOL.md §8 worked
//                                       example, the library's own parameter order, reason codes.
//   C. the JS library's signMessage  -> `countersign demo-api` (the real VerifyLayer with its
//                                       replay cache) over HTTP/1.1 on loopback.
//   E. the real proxy (`countersign run`): a logged-in session's requests, signed by the proxy,
//      reach a node upstream that verifies them with the library (identity, body, anonymous route).
//   D. where the library derives a component differently from countersign (see README.md):
//      each divergence is shown to exist and the workaround (a componentParser) to fix it.
//
// Every negative case first checks that the same request, untampered, is accepted, so a
// rejection cannot come from a broken harness. Run by scripts/interop.sh:
//   COUNTERSIGN_BIN=path/to/countersign node --test interop/node/interop.test.mjs

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  ExpiredError,
  MalformedSignatureError,
  UnacceptableSignatureError,
  UnknownKeyError,
  UnsupportedAlgorithmError,
  createSigner,
  createVerifier,
  httpbis,
} from 'http-message-signatures';
import { parseDictionary } from 'structured-headers';

const BIN = process.env.COUNTERSIGN_BIN;
if (!BIN) throw new Error('set COUNTERSIGN_BIN to the countersign binary');

const PROFILE = ['@method', '@authority', '@path', '@query', 'content-digest'];
const PROFILE_PARAMS = ['created', 'expires', 'nonce', 'keyid', 'alg', 'tag'];
const TAG = 'countersign';
const LABEL = 'countersign';
const KEYID = 'k1';
const WINDOW = 10;
const SKEW = 2;
const USER = 'Zoë 名前 🦀';
const ROLES = ['admin', 'rôle', 'r&d', 'a,b'];

const SECRET = randomBytes(32);
const OTHER_SECRET = randomBytes(32);
const workdir = mkdtempSync(path.join(process.env.INTEROP_WORKDIR || os.tmpdir(), 'cs-node-'));
const KEYRING = path.join(workdir, 'keys.toml');
writeFileSync(
  KEYRING,
  `active = "${KEYID}"\n[[keys]]\nid = "${KEYID}"\nsecret = "${SECRET.toString('base64')}"\n`,
);
after(() => rmSync(workdir, { recursive: true, force: true }));

const nowSecs = () => Math.floor(Date.now() / 1000);
const freshNonce = () => randomBytes(16).toString('base64url'); // 22 characters

// ---------------------------------------------------------------------------------------------
// The profile's identity encoding (docs/PROTOCOL.md §4): UTF-8, every byte outside
// A-Z a-z 0-9 - . _ ~ as %XX, upper-case hex. (encodeURIComponent is NOT this: it leaves
// ! ' ( ) * alone, which countersign refuses; test B "encodeURIComponent" shows it.)

function pct(s) {
  let out = '';
  for (const byte of Buffer.from(s, 'utf8')) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9\-._~]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

function unpct(s) {
  assert.match(s, /^(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})+$/, `not identity-encoded: ${s}`);
  return new TextDecoder('utf-8', { fatal: true }).decode(
    Buffer.from(s.replace(/%([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16))), 'latin1'),
  );
}

const sha256 = (body) => createHash('sha256').update(body).digest();
const contentDigest = (body) => `sha-256=:${sha256(body).toString('base64')}:`;

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 request, as the CLI reads and writes it: header lines in wire order.

class Raw {
  constructor(method, target, headers, body = Buffer.alloc(0)) {
    this.method = method;
    this.target = target;
    this.headers = headers.map(([n, v]) => [n, v]);
    this.body = Buffer.from(body);
  }

  clone() {
    return new Raw(this.method, this.target, this.headers, this.body);
  }

  get(name) {
    const values = this.headers.filter(([n]) => n.toLowerCase() === name.toLowerCase()).map(([, v]) => v);
    return values.length ? values.join(', ') : undefined;
  }

  set(name, value) {
    const i = this.headers.findIndex(([n]) => n.toLowerCase() === name.toLowerCase());
    this.remove(name);
    if (i >= 0) this.headers.splice(i, 0, [name, value]);
    else this.headers.push([name, value]);
    return this;
  }

  remove(name) {
    this.headers = this.headers.filter(([n]) => n.toLowerCase() !== name.toLowerCase());
    return this;
  }

  withBody(body) {
    this.body = Buffer.from(body);
    if (this.get('Content-Length') !== undefined) this.set('Content-Length', String(this.body.length));
    return this;
  }

  toBuffer() {
    const head =
      `${this.method} ${this.target} HTTP/1.1\r\n` + this.headers.map(([n, v]) => `${n}: ${v}\r\n`).join('') + '\r\n';
    return Buffer.concat([Buffer.from(head, 'latin1'), this.body]);
  }

  static parse(buf) {
    const end = buf.indexOf('\r\n\r\n');
    assert.ok(end >= 0, 'no end of headers');
    const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
    const [method, target] = lines[0].split(' ');
    const headers = lines.slice(1).map((line) => {
      const i = line.indexOf(':');
      return [line.slice(0, i), line.slice(i + 1).trim()];
    });
    return new Raw(method, target, headers, buf.subarray(end + 4));
  }

  // What the library's component derivation reads: method, an absolute URL (built from Host
  // for an origin-form target: the library takes @authority/@path/@query from the URL only),
  // headers as a record (several lines of one name as an array, in wire order).
  toLib() {
    const headers = {};
    for (const [n, v] of this.headers) {
      const key = Object.keys(headers).find((k) => k.toLowerCase() === n.toLowerCase()) ?? n;
      headers[key] = key in headers ? [].concat(headers[key], v) : v;
    }
    const url = /^https?:\/\//i.test(this.target) ? this.target : `http://${this.get('Host')}${this.target}`;
    return { method: this.method, url, headers };
  }
}

function request(method, target, host, body = '', extra = []) {
  const headers = [['Host', host], ...extra];
  const bytes = Buffer.from(body);
  if (bytes.length || ['POST', 'PUT', 'PATCH'].includes(method.toUpperCase())) {
    headers.push(['Content-Length', String(bytes.length)]);
  }
  return new Raw(method, target, headers, bytes);
}

// ---------------------------------------------------------------------------------------------
// The countersign binary.

function run(args, input) {
  const p = spawnSync(BIN, args, { input, maxBuffer: 16 << 20, timeout: 60_000 });
  if (p.error) throw p.error;
  return { code: p.status, stdout: p.stdout, stderr: p.stderr.toString() };
}

function csSign(req, ...args) {
  const p = run(['sign', '--keyring', KEYRING, ...args], req.toBuffer());
  assert.equal(p.code, 0, `countersign sign exited ${p.code}: ${p.stderr}`);
  return Raw.parse(p.stdout);
}

function csVerify(req, now, keyring = KEYRING) {
  const p = run(['verify', '--keyring', keyring, '--now', String(now)], req.toBuffer());
  const lines = p.stdout.toString('utf8').split('\n').filter(Boolean);
  assert.equal(lines.length, 1, `expected one JSON line, got ${p.stdout} (exit ${p.code}, stderr ${p.stderr})`);
  const answer = JSON.parse(lines[0]);
  // Exit code and verdict agree: 0 with valid:true, 1 with a reason.
  assert.equal(p.code, answer.valid ? 0 : 1, `exit ${p.code} with ${lines[0]}`);
  return answer;
}

// ---------------------------------------------------------------------------------------------
// The JS library.

const errorReason = [
  [ExpiredError, 'expired'],
  [UnknownKeyError, 'unknown_key'],
  [UnsupportedAlgorithmError, 'unsupported_algorithm'],
  [UnacceptableSignatureError, 'insufficient_coverage'],
  [MalformedSignatureError, 'malformed_signature'],
];

function requiredFields(req) {
  return [...PROFILE, ...['x-auth-user', 'x-auth-roles'].filter((h) => req.get(h) !== undefined)];
}

/**
 * Verifies `req` with httpbis.verifyMessage the way a countersign verifier would: select the
 * signature by tag (the library does not: it tries every member whose keyLookup gives a key, so
 * the tag check lives in keyLookup), HMAC-SHA256 with `secret` for `keyid` only, every profile
 * component and present identity field required, every profile parameter required, window 10 s
 * and skew 2 s; then the Content-Digest recomputed here over the body (the library has no
 * digest support). Returns { verdict: 'valid' | a countersign-like reason, params, covered }.
 */
async function jsVerify(req, { secret = SECRET, keyid = KEYID, componentParser } = {}) {
  // The library verifies every member its keyLookup accepts and reports the last verdict
  // (test D6), so a second member with our tag is refused here, as countersign does.
  const members = req.get('Signature-Input') === undefined ? new Map() : parseDictionary(req.get('Signature-Input'));
  if ([...members.values()].filter((m) => m[1].get('tag') === TAG).length > 1) return { verdict: 'malformed_signature' };
  let seen = null;
  let result;
  try {
    result = await httpbis.verifyMessage(
      {
        keyLookup: async (params) => {
          if (params.tag !== TAG || params.keyid !== keyid) return null;
          seen = params;
          return { id: keyid, algs: ['hmac-sha256'], verify: createVerifier(secret, 'hmac-sha256') };
        },
        requiredFields: requiredFields(req),
        requiredParams: PROFILE_PARAMS,
        tolerance: SKEW,
        // The library subtracts `tolerance` from `created` before the maxAge test too, so
        // maxAge = window + 2 * skew accepts created >= now - window - skew, as countersign.
        maxAge: WINDOW + 2 * SKEW,
        componentParser,
      },
      req.toLib(),
    );
  } catch (e) {
    const hit = errorReason.find(([cls]) => e instanceof cls);
    if (hit) return { verdict: hit[1], error: e };
    return { verdict: 'malformed_signature', error: e };
  }
  if (result === null) return { verdict: 'unknown_key' }; // no member with our tag and keyid
  if (result !== true) return { verdict: 'bad_signature' };
  const digest = req.get('Content-Digest');
  if (digest === undefined) return { verdict: 'missing_digest' };
  const member = parseDictionary(digest).get('sha-256');
  if (!member || !(member[0] instanceof ArrayBuffer)) return { verdict: 'missing_digest' };
  if (!Buffer.from(member[0]).equals(sha256(req.body))) return { verdict: 'digest_mismatch' };
  const input = parseDictionary(req.get('Signature-Input'));
  const label = [...input.keys()].find((k) => input.get(k)[1].get('tag') === TAG);
  const covered = input.get(label)[0].map(([name]) => name);
  return { verdict: 'valid', params: seen, covered, label, paramOrder: [...input.get(label)[1].keys()] };
}

/**
 * Signs `req` (in place) with httpbis.signMessage per the countersign profile: Content-Digest
 * computed here, identity headers identity-encoded, components in profile order, parameters in
 * profile order (`params`), label and tag `countersign`. Returns `req`.
 */
async function jsSign(
  req,
  {
    secret = SECRET,
    keyid = KEYID,
    created = nowSecs(),
    nonce = freshNonce(),
    user,
    roles = [],
    encode = pct,
    fields,
    params = PROFILE_PARAMS,
    alg,
    tag = TAG,
    name = LABEL,
    digest = true,
    componentParser,
  } = {},
) {
  req.remove('X-Auth-User').remove('X-Auth-Roles');
  if (digest) req.set('Content-Digest', contentDigest(req.body));
  if (user !== undefined) req.set('X-Auth-User', encode(user));
  if (user !== undefined && roles.length) req.set('X-Auth-Roles', roles.map(encode).join(','));
  const covered = fields ?? requiredFields(req);
  const signed = await httpbis.signMessage(
    {
      key: createSigner(secret, 'hmac-sha256', keyid),
      name,
      params,
      fields: covered,
      paramValues: {
        created: new Date(created * 1000),
        expires: new Date((created + WINDOW) * 1000),
        nonce,
        tag,
        ...(alg ? { alg } : {}),
      },
      componentParser,
    },
    req.toLib(),
  );
  for (const [name, value] of Object.entries(signed.headers)) {
    if (['signature', 'signature-input'].includes(name.toLowerCase())) req.set(name, value);
  }
  return req;
}

// A componentParser deriving the four request components from the raw request as countersign
// does (docs/PROTOCOL.md §3.1): the workaround for the divergences of part D.
function profileParser(raw) {
  const target = raw.target;
  const q = target.indexOf('?');
  const p = q < 0 ? target : target.slice(0, q);
  return (name, params) => {
    if (params.size) return null;
    switch (name) {
      case '@method':
        return [raw.method];
      case '@path':
        return [p || '/'];
      case '@query':
        return [q < 0 ? '?' : target.slice(q)];
      case '@authority': {
        // Lower-cased; exactly `:80` removed (http) unless the `:` is inside IPv6 brackets.
        const a = raw.get('Host').trim().toLowerCase();
        const m = /^(.+):80$/.exec(a);
        return [m && !(m[1].startsWith('[') && !m[1].endsWith(']')) ? m[1] : a];
      }
      default:
        return null;
    }
  };
}

// ---------------------------------------------------------------------------------------------
// A. countersign signs, the JS library verifies.

describe('A: countersign sign -> http-message-signatures verifyMessage', () => {
  test('A1 POST with query, body, Unicode user and roles; Host API.Example.com:80', async () => {
    const req = request('POST', '/orders/42?expand=items&x=%20y', 'API.Example.com:80', '{"qty": 3}', [
      ['Content-Type', 'application/json'],
    ]);
    const signed = csSign(req, '--user', USER, '--roles', ROLES.join(','));
    // countersign splits --roles at commas, so the role `a,b` arrives as `a` and `b`.
    const roles = ROLES.flatMap((r) => r.split(','));
    const r = await jsVerify(signed);
    assert.equal(r.verdict, 'valid', String(r.error ?? ''));
    assert.equal(r.label, LABEL);
    assert.deepEqual(r.covered, [...PROFILE, 'x-auth-user', 'x-auth-roles']);
    assert.deepEqual(r.paramOrder, PROFILE_PARAMS);
    assert.equal(r.params.alg, 'hmac-sha256');
    assert.equal(r.params.keyid, KEYID);
    assert.equal(r.params.nonce.length, 22);
    const created = r.params.created.getTime() / 1000; // the library turns `created` into a Date
    assert.ok(Math.abs(created - nowSecs()) < 60, `created ${created}`);
    assert.equal(r.params.expires, created + WINDOW); // ... but not `expires` (it checks "expired")
    assert.equal(signed.get('Content-Digest'), contentDigest('{"qty": 3}'));
    assert.equal(unpct(signed.get('X-Auth-User')), USER);
    assert.deepEqual(signed.get('X-Auth-Roles').split(',').map(unpct), roles);
  });

  test('A2 GET, no identity, empty body, non-default port', async () => {
    const signed = csSign(request('GET', '/health', 'localhost:8080'));
    const r = await jsVerify(signed);
    assert.equal(r.verdict, 'valid', String(r.error ?? ''));
    assert.deepEqual(r.covered, PROFILE);
    assert.equal(signed.get('Content-Digest'), contentDigest(''));
    assert.equal(signed.get('X-Auth-User'), undefined);
  });

  test('A3 root, empty query, encoded path and query, matrix params, repeated names, IPv6 authority', async () => {
    const targets = ['/', '/?', '/a%2Fb%C3%A9/~x?q=%E2%9C%93&empty=&flag', '/p;matrix=1/q?a=1&a=2'];
    for (const host of ['[::1]:8443', '[::1]:80', '127.0.0.1:3000']) {
      for (const target of targets) {
        const r = await jsVerify(csSign(request('GET', target, host), '--user', 'u'));
        assert.equal(r.verdict, 'valid', `${host} ${target}: ${r.error ?? ''}`);
      }
    }
  });

  const tampers = [
    ['method', (s) => { s.method = 'PUT'; }, 'bad_signature'],
    ['path', (s) => { s.target = s.target.replace('/orders/', '/orderz/'); }, 'bad_signature'],
    ['query', (s) => { s.target = s.target.replace('id=42', 'id=43'); }, 'bad_signature'],
    ['Host', (s) => { s.set('Host', 'evil.example'); }, 'bad_signature'],
    ['body (same length)', (s) => { s.withBody('{"qty": 9}'); }, 'digest_mismatch'],
    ['Content-Digest recomputed for a new body', (s) => { s.withBody('{"qty": 9}').set('Content-Digest', contentDigest('{"qty": 9}')); }, 'bad_signature'],
    ['X-Auth-User', (s) => { s.set('X-Auth-User', 'mallory'); }, 'bad_signature'],
    ['X-Auth-Roles', (s) => { s.set('X-Auth-Roles', 'admin,root'); }, 'bad_signature'],
    // A covered field that is absent: the library throws a plain Error building the base.
    ['X-Auth-Roles removed', (s) => { s.remove('X-Auth-Roles'); }, 'malformed_signature'],
  ];
  for (const [what, tamper, reason] of tampers) {
    test(`A4 tampered ${what}: rejected (${reason})`, async () => {
      const signed = csSign(request('POST', '/orders/7?id=42', 'api.test', '{"qty": 3}'), '--user', 'alice', '--roles', 'admin');
      assert.equal((await jsVerify(signed)).verdict, 'valid', 'control: the untampered request');
      const bad = signed.clone();
      tamper(bad);
      assert.equal((await jsVerify(bad)).verdict, reason);
    });
  }

  test('A5 wrong secret: bad_signature; unknown keyid: no key; expired: ExpiredError', async () => {
    const signed = csSign(request('GET', '/a', 'api.test'), '--user', 'alice');
    assert.equal((await jsVerify(signed)).verdict, 'valid', 'control');
    assert.equal((await jsVerify(signed, { secret: OTHER_SECRET })).verdict, 'bad_signature');
    assert.equal((await jsVerify(signed, { keyid: 'k2' })).verdict, 'unknown_key');
    const old = csSign(request('GET', '/a', 'api.test'), '--user', 'alice', '--created', String(nowSecs() - 3600));
    const r = await jsVerify(old);
    assert.equal(r.verdict, 'expired', String(r.error ?? ''));
  });

  test('A6 window edges: created = now - 10 accepted, now - 14 expired (window 10 s + skew 2 s)', async () => {
    // Whole seconds of margin (the library reads its own clock): accepted up to now - 12.
    const ok = csSign(request('GET', '/a', 'api.test'), '--created', String(nowSecs() - 10), '--window', '30');
    assert.equal((await jsVerify(ok)).verdict, 'valid');
    const late = csSign(request('GET', '/a', 'api.test'), '--created', String(nowSecs() - 14), '--window', '30');
    assert.equal((await jsVerify(late)).verdict, 'expired');
  });
});

// ---------------------------------------------------------------------------------------------
// B. the JS library signs, `countersign verify` (CLI) checks.

describe('B: http-message-signatures signMessage -> countersign verify', () => {
  test('B1 byte-exact: JS Content-Digest, Signature-Input, Signature == countersign sign', async () => {
    const created = nowSecs();
    const nonce = 'aW50ZXJvcC1ub25jZS0xMjM0NQ';
    const body = '{"hello": "wörld"}';
    const roles = ['admin', 'rôle', 'r&d'];
    const ours = csSign(request('PATCH', '/profile/me?lang=fr&x=%2F', 'API.Example.com:80', body), '--user', USER,
      '--roles', roles.join(','), '--created', String(created), '--nonce', nonce);
    const theirs = await jsSign(request('PATCH', '/profile/me?lang=fr&x=%2F', 'API.Example.com:80', body),
      { created, nonce, user: USER, roles });
    for (const h of ['Content-Digest', 'X-Auth-User', 'X-Auth-Roles', 'Signature-Input', 'Signature']) {
      assert.equal(theirs.get(h), ours.get(h), h);
    }
    const answer = csVerify(theirs, created + 1);
    assert.deepEqual(answer, { valid: true, user: USER, roles, keyid: KEYID });
  });

  test('B2 docs/PROTOCOL.md §8 worked example reproduced by the JS library', async () => {
    const secret = Buffer.from([...Array(32).keys()]);
    const req = request('POST', '/orders?id=42&note=caf%C3%A9', 'API.Example.com', '{"item":"book","qty":1}', [
      ['Content-Type', 'application/json'],
    ]);
    req.remove('Content-Length'); // the example has none; no header covers it anyway
    await jsSign(req, { secret, created: 1700000000, nonce: 'dGhpcyBpcyBhIG5vbmNlIQ', user: 'Zoë Smith', roles: ['admin', 'r&d'] });
    assert.equal(req.get('Content-Digest'), 'sha-256=:SqTsJBvyNh+ArgZhJK4lNXo+XGqb5zDvy9gHJLvgICE=:');
    assert.equal(req.get('X-Auth-User'), 'Zo%C3%AB%20Smith');
    assert.equal(req.get('X-Auth-Roles'), 'admin,r%26d');
    assert.equal(
      req.get('Signature-Input'),
      'countersign=("@method" "@authority" "@path" "@query" "content-digest" "x-auth-user" "x-auth-roles");' +
        'created=1700000000;expires=1700000010;nonce="dGhpcyBpcyBhIG5vbmNlIQ";keyid="k1";alg="hmac-sha256";tag="countersign"',
    );
    assert.equal(req.get('Signature'), 'countersign=:w5inAMU+tfmDROq96fWRhHPjU2bBtWVYC1xs+TjQFtE=:');
  });

  test("B3 the library's default parameter order (keyid;alg;created;expires) + nonce, tag: accepted", async () => {
    const created = nowSecs();
    const req = await jsSign(request('DELETE', '/v1/things/7', 'api.test'), {
      created, user: USER, roles: ['admin', 'rôle'], params: ['keyid', 'alg', 'created', 'expires', 'nonce', 'tag'],
    });
    assert.match(req.get('Signature-Input'), /\);keyid="k1";alg="hmac-sha256";created=\d+;expires=\d+;nonce="[^"]+";tag="countersign"$/);
    assert.deepEqual(csVerify(req, created), { valid: true, user: USER, roles: ['admin', 'rôle'], keyid: KEYID });
  });

  test('B5 selection by tag, not label: label sig1 + tag countersign accepted; tag other is missing_signature on both sides', async () => {
    const created = nowSecs();
    const relabelled = await jsSign(request('GET', '/t', 'api.test'), { created, user: 'u', name: 'sig1' });
    assert.match(relabelled.get('Signature-Input'), /^sig1=\(/);
    assert.equal(csVerify(relabelled, created).valid, true);
    assert.equal((await jsVerify(relabelled)).verdict, 'valid');
    const other = await jsSign(request('GET', '/t', 'api.test'), { created, user: 'u', tag: 'other' });
    assert.deepEqual(csVerify(other, created), { valid: false, reason: 'missing_signature' });
    assert.equal((await jsVerify(other)).verdict, 'unknown_key'); // keyLookup found no member with our tag
  });

  test('B6 two members with our tag: malformed_signature on both sides', async () => {
    const created = nowSecs();
    const req = await jsSign(request('GET', '/t', 'api.test'), { created, user: 'u' });
    assert.equal(csVerify(req, created).valid, true, 'control');
    await jsSign(req, { created, user: 'u', name: 'second' }); // the library appends a member
    assert.match(req.get('Signature-Input'), /^countersign=\(.*, second=\(/);
    assert.deepEqual(csVerify(req, created), { valid: false, reason: 'malformed_signature' });
    assert.equal((await jsVerify(req)).verdict, 'malformed_signature');
  });

  // Each case: [name, how to sign (jsSign options), tamper after signing, --now offset, reason].
  const cases = [
    ['method', {}, (r) => { r.method = 'PUT'; }, 0, 'bad_signature'],
    ['path', {}, (r) => { r.target = '/v1/thingz?limit=5'; }, 0, 'bad_signature'],
    ['query', {}, (r) => { r.target = '/v1/things?limit=6'; }, 0, 'bad_signature'],
    ['Host', {}, (r) => { r.set('Host', 'evil.test'); }, 0, 'bad_signature'],
    ['body', {}, (r) => { r.withBody('PAYLOAD'); }, 0, 'digest_mismatch'],
    ['X-Auth-User', {}, (r) => { r.set('X-Auth-User', 'mallory'); }, 0, 'bad_signature'],
    ['X-Auth-Roles', {}, (r) => { r.set('X-Auth-Roles', 'root'); }, 0, 'bad_signature'],
    ['wrong secret', { secret: OTHER_SECRET }, null, 0, 'bad_signature'],
    ['unknown keyid', { keyid: 'k2' }, null, 0, 'unknown_key'],
    ['expired (--now +1h)', {}, null, 3600, 'expired'],
    ['created in the future (--now -1h)', {}, null, -3600, 'not_yet_valid'],
    ['alg other than hmac-sha256', { alg: 'hmac-sha512' }, null, 0, 'unsupported_algorithm'],
    ['identity added but not covered', { fields: PROFILE }, null, 0, 'insufficient_coverage'],
    ['@query not covered', { fields: ['@method', '@authority', '@path', 'content-digest', 'x-auth-user', 'x-auth-roles'] }, null, 0, 'insufficient_coverage'],
    ['content-digest not covered', { fields: ['@method', '@authority', '@path', '@query', 'x-auth-user', 'x-auth-roles'] }, null, 0, 'missing_digest'],
    ['nonce omitted', { params: ['created', 'expires', 'keyid', 'alg', 'tag'] }, null, 0, 'malformed_signature'],
    ['user encoded with encodeURIComponent', { user: "it's (me)!", encode: encodeURIComponent }, null, 0, 'malformed_signature'],
  ];
  for (const [what, opts, tamper, offset, reason] of cases) {
    test(`B4 ${what}: countersign verify says ${reason}`, async () => {
      const created = nowSecs();
      const make = (o) =>
        jsSign(request('POST', '/v1/things?limit=5', 'api.test', 'payload'), { created, user: "it's (me)!", roles: ['admin'], ...o });
      const control = await make({});
      assert.equal(csVerify(control, created).valid, true, 'control: the untampered request');
      const bad = await make(opts);
      if (tamper) tamper(bad);
      assert.deepEqual(csVerify(bad, created + offset), { valid: false, reason });
    });
  }
});

// ---------------------------------------------------------------------------------------------
// C. the JS library signs, `countersign demo-api` (the VerifyLayer, replay cache) checks.

describe('C: http-message-signatures signMessage -> countersign demo-api (VerifyLayer) over HTTP', () => {
  let api;
  let host;

  before(async () => {
    api = spawn(BIN, ['demo-api', '--listen', '127.0.0.1:0', '--keyring', KEYRING], { stdio: ['ignore', 'pipe', 'pipe'] });
    process.on('exit', () => api.kill('SIGKILL')); // also when the runner dies mid-suite
    let stderr = '';
    api.stderr.on('data', (d) => { stderr += d; });
    host = await new Promise((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`demo-api did not start: ${stderr}`)), 20_000);
      api.stdout.on('data', (d) => {
        out += d;
        const m = /listening on http:\/\/(\S+)/.exec(out);
        if (m) { clearTimeout(timer); resolve(m[1]); }
      });
      api.on('exit', (code) => { clearTimeout(timer); reject(new Error(`demo-api exited ${code}: ${stderr}`)); });
    });
  });

  after(() => { api?.kill('SIGTERM'); });

  function send(raw) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      const sock = net.connect({ host: host.split(':')[0], port: Number(host.split(':')[1]) }, () => sock.end(raw.toBuffer()));
      sock.setTimeout(10_000, () => sock.destroy(new Error('timeout')));
      sock.on('data', (c) => chunks.push(c));
      sock.on('error', reject);
      sock.on('close', () => {
        const res = Buffer.concat(chunks);
        const end = res.indexOf('\r\n\r\n');
        const status = Number(res.subarray(0, res.indexOf('\r\n')).toString().split(' ')[1]);
        const text = res.subarray(end + 4).toString('utf8');
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status, json, text });
      });
    });
  }

  const apiRequest = (method, target, body = '') =>
    request(method, target, host, body, [['Connection', 'close'], ...(body ? [['Content-Type', 'application/json']] : [])]);

  test('C1 GET /api/whoami with a Unicode user and roles: 200, identity decoded', async () => {
    const res = await send(await jsSign(apiRequest('GET', '/api/whoami'), { user: USER, roles: ROLES }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.json, { user: USER, roles: ROLES, keyid: KEYID });
  });

  test('C2 POST /api/echo with a body and a query: 200, body echoed', async () => {
    const body = '{"note": "naïve ☕"}';
    const res = await send(await jsSign(apiRequest('POST', '/api/echo?v=1&w=%2F', body), { user: 'bob' }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.json, { identity: { user: 'bob', roles: [], keyid: KEYID }, body });
  });

  test('C3 the same signed request twice: 200, then 401 replayed', async () => {
    const req = await jsSign(apiRequest('POST', '/api/echo', '{}'), { user: 'carol' });
    assert.equal((await send(req)).status, 200);
    const again = await send(req);
    assert.deepEqual([again.status, again.json], [401, { error: 'replayed' }]);
  });

  const cases = [
    ['body', {}, (r) => { r.withBody('{"x":2}'); }, 'digest_mismatch'],
    ['method', {}, (r) => { r.method = 'PUT'; }, 'bad_signature'],
    ['path', {}, (r) => { r.target = '/api/notes'; }, 'bad_signature'],
    ['query', {}, (r) => { r.target = '/api/echo?x=1'; }, 'bad_signature'],
    ['X-Auth-User', {}, (r) => { r.set('X-Auth-User', 'admin'); }, 'bad_signature'],
    ['X-Auth-Roles added', {}, (r) => { r.set('X-Auth-Roles', 'admin'); }, 'insufficient_coverage'],
    ['wrong secret', { secret: OTHER_SECRET }, null, 'bad_signature'],
    ['unknown keyid', { keyid: 'k9' }, null, 'unknown_key'],
    ['expired (created 1 h ago)', { created: nowSecs() - 3600 }, null, 'expired'],
    ['identity not covered', { fields: PROFILE }, null, 'insufficient_coverage'],
    ['content-digest not covered', { fields: ['@method', '@authority', '@path', '@query', 'x-auth-user'] }, null, 'missing_digest'],
  ];
  for (const [what, opts, tamper, reason] of cases) {
    test(`C4 ${what}: 401 ${reason}`, async () => {
      const make = (o) => jsSign(apiRequest('POST', '/api/echo', '{"x":1}'), { user: 'dave', ...o });
      const control = await send(await make({}));
      assert.equal(control.status, 200, `control: ${control.text}`);
      const bad = await make(opts);
      if (tamper) tamper(bad);
      const res = await send(bad);
      assert.deepEqual([res.status, res.json], [401, { error: reason }]);
    });
  }
});

// ---------------------------------------------------------------------------------------------
// D. Divergences of http-message-signatures 1.0.6 from RFC 9421 / the countersign profile.
// Each test shows the divergence (so an upgrade that fixes it fails here and README.md gets
// updated) and that the documented workaround, a componentParser deriving the component from
// the raw request as countersign does, makes both directions agree.

describe('D: library divergences and their workaround', () => {
  async function bothWays(raw, { jsValue, csValue, component }) {
    // countersign -> JS: the library's own derivation rejects, the workaround accepts.
    const signed = csSign(raw.clone(), '--user', 'u');
    assert.equal((await jsVerify(signed)).verdict, 'bad_signature', `library derivation of ${component} should differ`);
    assert.equal((await jsVerify(signed, { componentParser: profileParser(signed) })).verdict, 'valid');
    // JS -> countersign: the same, the other way.
    const created = nowSecs();
    const plain = await jsSign(raw.clone(), { created, user: 'u' });
    assert.deepEqual(csVerify(plain, created), { valid: false, reason: 'bad_signature' });
    const fixed = raw.clone();
    await jsSign(fixed, { created, user: 'u', componentParser: profileParser(fixed) });
    assert.deepEqual(csVerify(fixed, created), { valid: true, user: 'u', roles: [], keyid: KEYID });
    // And the values themselves.
    const lib = httpbis.createSignatureBase({ fields: [component] }, raw.toLib());
    assert.deepEqual(lib[0][1], [jsValue]);
    const ours = httpbis.createSignatureBase({ fields: [component], componentParser: profileParser(raw) }, raw.toLib());
    assert.deepEqual(ours[0][1], [csValue]);
  }

  test('D1 @method is upper-cased by the library (RFC 9421 §2.2.1: no case change)', async () => {
    await bothWays(request('patch', '/x', 'api.test', 'b'), { component: '@method', jsValue: 'PATCH', csValue: 'patch' });
  });

  test('D2 @path: the library resolves dot segments (WHATWG URL), countersign signs the path as received', async () => {
    await bothWays(request('GET', '/a/../b/./c', 'api.test'), { component: '@path', jsValue: '/b/c', csValue: '/a/../b/./c' });
  });

  test('D3 @path: the library percent-encodes { } " and turns \\ into / (WHATWG URL parsing)', async () => {
    // All three bytes are accepted in a request target by countersign (and hyper).
    await bothWays(request('GET', '/a{b}/"c"\\d', 'api.test'), {
      component: '@path', jsValue: '/a%7Bb%7D/%22c%22/d', csValue: '/a{b}/"c"\\d',
    });
  });

  test("D4 @query: the library percent-encodes ' (WHATWG special-query percent-encode set)", async () => {
    await bothWays(request('GET', "/s?q='x'", 'api.test'), { component: '@query', jsValue: '?q=%27x%27', csValue: "?q='x'" });
  });

  test('D5 verifyMessage with several members reports the last verdict: a bad member before a good one passes', async () => {
    const created = nowSecs();
    const req = await jsSign(request('GET', '/t', 'api.test'), { created, user: 'u', name: 'bad', secret: OTHER_SECRET });
    await jsSign(req, { created, user: 'u' }); // appended after the bad one, label countersign
    const verdict = await httpbis.verifyMessage(
      { keyLookup: async () => ({ id: KEYID, algs: ['hmac-sha256'], verify: createVerifier(SECRET, 'hmac-sha256') }) },
      req.toLib(),
    );
    assert.equal(verdict, true, 'the library should report only the last member');
    // countersign refuses two members with its tag; jsVerify does the same before calling the library.
    assert.deepEqual(csVerify(req, created), { valid: false, reason: 'malformed_signature' });
    assert.equal((await jsVerify(req)).verdict, 'malformed_signature');
  });

  test('D6 @authority: the library parses the port (h:080 -> h), countersign keeps other spellings', async () => {
    await bothWays(request('GET', '/', 'h.test:080'), { component: '@authority', jsValue: 'h.test', csValue: 'h.test:080' });
  });
});

// ---------------------------------------------------------------------------------------------
// E. the real proxy signs: `countersign run` forwards a session's requests to a node upstream,
// which verifies exactly what it received (method, origin-form target, header lines in wire
// order, body) with the library.

describe('E: countersign run (the proxy) signs -> http-message-signatures verifies at the upstream', () => {
  const PASSWORD = 'interop-pässword-1';
  let proxy;
  let upstream;
  let origin;
  const received = [];

  const freePort = () =>
    new Promise((resolve, reject) => {
      const srv = net.createServer();
      srv.on('error', reject);
      srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
    });

  before(async () => {
    // The upstream: records each request as a Raw and answers 200 with what it verified.
    upstream = http.createServer((req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', async () => {
        const headers = [];
        for (let i = 0; i < req.rawHeaders.length; i += 2) headers.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
        const raw = new Raw(req.method, req.url, headers, Buffer.concat(chunks));
        received.push(raw);
        const r = await jsVerify(raw);
        const user = raw.get('X-Auth-User');
        const roles = raw.get('X-Auth-Roles');
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({
          verdict: r.verdict,
          covered: r.covered ?? null,
          user: user === undefined ? null : unpct(user),
          roles: roles === undefined ? [] : roles.split(',').map(unpct),
        }));
      });
    });
    await new Promise((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    const upstreamPort = upstream.address().port;

    const hash = run(['hash-password'], `${PASSWORD}\n`);
    assert.equal(hash.code, 0, hash.stderr);
    const usersFile = path.join(workdir, 'users.toml');
    writeFileSync(usersFile, `[[users]]\nname = ${JSON.stringify(USER)}\npassword = ${JSON.stringify(hash.stdout.toString().trim())}\n` +
      `roles = ${JSON.stringify(ROLES)}\n`);
    const port = await freePort();
    origin = `http://127.0.0.1:${port}`;
    const config = path.join(workdir, 'proxy.toml');
    writeFileSync(config, [
      '[server]', `listen = "127.0.0.1:${port}"`, `public_origin = "${origin}"`,
      '[session]', 'store = "memory"',
      '[auth]', `users_file = ${JSON.stringify(usersFile)}`,
      '[signing]', `keyring = ${JSON.stringify(KEYRING)}`, 'window = "10s"',
      '[[upstream]]', 'name = "api"', 'prefix = "/api/"', `url = "http://127.0.0.1:${upstreamPort}"`,
      '[[upstream]]', 'name = "public"', 'prefix = "/pub/"', `url = "http://127.0.0.1:${upstreamPort}"`, 'auth = "none"',
      '',
    ].join('\n'));
    proxy = spawn(BIN, ['run', '--config', config, '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'] });
    process.on('exit', () => proxy.kill('SIGKILL'));
    let stderr = '';
    proxy.stderr.on('data', (d) => { stderr += d; });
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (proxy.exitCode !== null) throw new Error(`countersign run exited ${proxy.exitCode}: ${stderr}`);
      const up = await new Promise((resolve) => {
        const c = net.connect(port, '127.0.0.1', () => { c.destroy(); resolve(true); });
        c.on('error', () => resolve(false));
      });
      if (up) break;
      if (Date.now() > deadline) throw new Error(`countersign run did not listen: ${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  after(async () => {
    proxy?.kill('SIGTERM');
    await new Promise((resolve) => (upstream ? upstream.close(resolve) : resolve()));
  });

  let session; // one login for the suite: argon2 in a debug build takes seconds
  async function login() {
    session ??= await loginOnce();
    return session;
  }

  async function loginOnce() {
    const res = await fetch(`${origin}/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', origin },
      body: JSON.stringify({ username: USER, password: PASSWORD }),
    });
    assert.equal(res.status, 200, await res.clone().text());
    const { csrf_token: csrf } = await res.json();
    const cookie = res.headers.get('set-cookie').split(';')[0];
    return { cookie, csrf };
  }

  test('E1 GET with a query through the proxy: the upstream verifies; Unicode user and roles decoded', async () => {
    const { cookie } = await login();
    const res = await fetch(`${origin}/api/whoami?a=1&b=%C3%A9`, { headers: { cookie } });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { verdict: 'valid', covered: [...PROFILE, 'x-auth-user', 'x-auth-roles'], user: USER, roles: ROLES });
    const seen = received.at(-1);
    assert.equal(seen.target, '/api/whoami?a=1&b=%C3%A9');
    assert.equal(seen.get('Content-Digest'), contentDigest(''));
  });

  test('E2 POST with a body, CSRF token: verified, digest recomputed; the captured request tampered is rejected', async () => {
    const { cookie, csrf } = await login();
    const body = JSON.stringify({ note: 'naïve ☕', n: 1 });
    const res = await fetch(`${origin}/api/notes`, {
      method: 'POST', headers: { cookie, origin, 'x-csrf-token': csrf, 'content-type': 'application/json' }, body,
    });
    assert.equal(res.status, 200);
    assert.equal((await res.json()).verdict, 'valid');
    const seen = received.at(-1);
    assert.equal(seen.body.toString(), body);
    assert.equal(seen.get('Content-Digest'), contentDigest(body));
    assert.equal(seen.get('Cookie'), undefined, 'the session cookie never reaches the upstream');
    assert.equal((await jsVerify(seen.clone().withBody(body.replace('1', '2')))).verdict, 'digest_mismatch');
    assert.equal((await jsVerify(seen.clone().set('X-Auth-User', 'admin'))).verdict, 'bad_signature');
    assert.equal((await jsVerify(seen, { secret: OTHER_SECRET })).verdict, 'bad_signature');
  });

  test('E3 anonymous route (auth = "none"): signed without identity, verified', async () => {
    const res = await fetch(`${origin}/pub/status`, { headers: { 'X-Auth-User': 'forged' } });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { verdict: 'valid', covered: PROFILE, user: null, roles: [] });
  });
});
