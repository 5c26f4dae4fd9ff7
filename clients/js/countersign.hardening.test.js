// Edge cases of countersign.js: answers that arrive after a newer login or logout, one-shot
// bodies, aborts and caller bugs versus network failures, HEAD, a failing token read, the
// app's own callback throwing, and the agreement of the client with its types, its docs and
// the real proxy's answers.
// Run: cd clients/js && npm test   (node --test runs this file with countersign.test.js)

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createClient, CountersignError } from './countersign.js';
import { startFakeProxy, fetchWithCookieJar } from './support/fake-proxy.js';
import { listenLoopback } from './support/loopback.js';

const here = dirname(fileURLToPath(import.meta.url));

let proxy;
let jarFetch;

beforeEach(async () => {
  proxy = await startFakeProxy();
  jarFetch = fetchWithCookieJar();
});
afterEach(async () => {
  await proxy.close();
});

const newClient = (options = {}) => createClient({ baseUrl: proxy.origin, fetch: jarFetch, ...options });

async function loggedIn(options) {
  const client = newClient(options);
  await client.login('demo', 'demo-password');
  return client;
}

const jsonResponse = (status, body, headers = {}) =>
  new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } });
// The real proxy's login / session answer (src/proxy/auth.rs, session_response).
const sessionBody = (token) => ({ user: 'demo', roles: ['user'], expires_at: 1795980014, csrf_token: token });

/** A promise with its resolve function, to hold a stub response until the test releases it. */
function gate() {
  let open;
  const opened = new Promise((resolve) => {
    open = resolve;
  });
  return { opened, open };
}

// --- Aborts are reported as fetch reports them, not as network_error ---------------------

test('an aborted request rejects with the AbortError / TimeoutError fetch gives, not network_error', async () => {
  const client = await loggedIn();
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(client.fetch('/api/whoami', { signal: controller.signal }), (error) => {
    assert.equal(error.name, 'AbortError', `got ${error.name} ${error.code ?? ''}`);
    return true;
  });
  // fetchJson and a timeout signal: same, so `catch (e) { if (e.name === 'TimeoutError') ... }` works.
  await assert.rejects(client.fetchJson('/api/whoami', { signal: AbortSignal.timeout(0) }), (error) => {
    assert.notEqual(error.code, 'network_error', 'a timeout the caller asked for is not "offline"');
    assert.equal(error.name, 'TimeoutError');
    return true;
  });
  // The platform's fetch (the client builds the Request itself): same.
  const native = createClient({ baseUrl: proxy.origin });
  const aborted = new AbortController();
  aborted.abort();
  await assert.rejects(native.fetch('/api/whoami', { signal: aborted.signal }), { name: 'AbortError' });
  assert.equal(client.currentSession?.user, 'demo', 'an abort does not touch the session');
});

// --- Answers that arrive after a newer login or logout are outdated ----------------------

test('a 401 for a request sent before a re-login leaves the new session alone, with no event', async () => {
  // The real proxy ends the browser's previous session at login (src/proxy/auth.rs), so a
  // request still in flight under the old cookie is answered 401 after the new login.
  const slow = gate();
  const stub = async (input) => {
    const url = String(input);
    if (url.endsWith('/auth/login')) return jsonResponse(200, sessionBody('tok-new'));
    if (url.endsWith('/api/slow')) {
      await slow.opened;
      return jsonResponse(401, { error: 'unauthenticated' });
    }
    return jsonResponse(200, {});
  };
  let events = 0;
  const client = createClient({ fetch: stub, onUnauthenticated: () => events++ });
  client.addEventListener('unauthenticated', () => events++);

  const inFlight = client.fetch('/api/slow').catch((error) => error);
  const session = await client.login('demo', 'pw'); // the user signs in (again) meanwhile
  slow.open();
  const error = await inFlight;
  assert.ok(error instanceof CountersignError); // that request did fail: it still rejects
  assert.equal(error.code, 'unauthenticated');

  assert.deepEqual(client.currentSession, session, 'the new session survives the outdated 401');
  assert.equal(events, 0, 'no "session ended" after the user has just signed in');
});

test('a session read answered after logout does not bring the session back', async () => {
  const poll = gate();
  const stub = async (input) => {
    const url = String(input);
    if (url.includes('/auth/login')) return jsonResponse(200, sessionBody('tok-1'));
    if (url.includes('/auth/session')) {
      await poll.opened; // answered by the server before the logout, delivered after it
      return jsonResponse(200, sessionBody('tok-1'));
    }
    if (url.includes('/auth/logout')) return new Response(null, { status: 204 });
    return jsonResponse(200, {});
  };
  const client = createClient({ fetch: stub });
  await client.login('demo', 'pw');
  const polling = client.session({ touch: false }); // "am I still logged in?" poll (FRONTEND.md)
  await client.logout();
  assert.equal(client.currentSession, null);
  poll.open();
  assert.equal(await polling, null, 'the outdated read resolves with the state logout left');
  assert.equal(client.currentSession, null, 'logout resolved: currentSession stays null');
});

test('a session read that finds no session, answered after a re-login, keeps the new session', async () => {
  const poll = gate();
  const stub = async (input) => {
    const url = String(input);
    if (url.includes('/auth/login')) return jsonResponse(200, sessionBody('tok-new'));
    if (url.includes('/auth/session')) {
      await poll.opened;
      return jsonResponse(401, { error: 'unauthenticated' });
    }
    return jsonResponse(200, {});
  };
  const client = createClient({ fetch: stub });
  const polling = client.session({ touch: false });
  const session = await client.login('demo', 'pw');
  poll.open();
  assert.deepEqual(await polling, session);
  assert.deepEqual(client.currentSession, session);
});

test('concurrent requests meeting the same ended session fire unauthenticated once', async () => {
  const seen = { events: 0, callbacks: 0 };
  const client = await loggedIn({ onUnauthenticated: () => seen.callbacks++ });
  client.addEventListener('unauthenticated', () => seen.events++);
  proxy.expireAll();
  const outcomes = await Promise.all([1, 2, 3, 4].map(() => client.fetch('/api/whoami').catch((e) => e)));
  for (const outcome of outcomes) {
    assert.ok(outcome instanceof CountersignError, 'every one of them rejects');
    assert.equal(outcome.code, 'unauthenticated');
  }
  assert.deepEqual(seen, { events: 1, callbacks: 1 });
  assert.equal(client.currentSession, null);

  // A later request meeting the (still) missing session is told again: a new report.
  await assert.rejects(client.fetch('/api/whoami'), { code: 'unauthenticated' });
  assert.deepEqual(seen, { events: 2, callbacks: 2 });
});

// --- A session() read that finds another session makes earlier answers outdated ----------

/**
 * One browser, scripted: `browser.cookie` is the session its (shared) cookie names, `{user,
 * token}` or null, and `signIn(user)` is a login in another tab, which replaces it. Answers to
 * `/api/held` (401 unauthenticated: the session it was sent under has ended) and to
 * `/api/write` (checked against the cookie when sent) are held until `held.open()`.
 */
function scriptedBrowser() {
  let logins = 0;
  const browser = { cookie: null, held: gate() };
  browser.signIn = (user) => {
    browser.cookie = { user, token: `tok-${user}-${++logins}` };
  };
  const session = () => ({ ...sessionBody(browser.cookie.token), user: browser.cookie.user });
  browser.fetch = async (input, init = {}) => {
    const url = String(input);
    if (url.endsWith('/auth/login')) {
      browser.signIn(JSON.parse(init.body).username);
      return jsonResponse(200, session());
    }
    if (url.includes('/auth/session')) {
      return browser.cookie ? jsonResponse(200, session()) : jsonResponse(401, { error: 'unauthenticated' });
    }
    if (url.endsWith('/auth/logout')) {
      browser.cookie = null;
      return new Response(null, { status: 204 });
    }
    if (url.endsWith('/api/held')) {
      await browser.held.opened;
      return jsonResponse(401, { error: 'unauthenticated' });
    }
    if (url.endsWith('/api/write')) {
      const token = new Headers(init.headers).get('x-csrf-token');
      const answer =
        browser.cookie !== null && token === browser.cookie.token
          ? jsonResponse(200, { wroteAs: browser.cookie.user })
          : jsonResponse(403, { error: 'csrf' });
      await browser.held.opened;
      return answer;
    }
    return jsonResponse(404, { error: 'not_found' });
  };
  return browser;
}

/** A client of `scriptedBrowser()`; `ends()` counts its `onUnauthenticated` calls. */
function scriptedClient() {
  const browser = scriptedBrowser();
  let ends = 0;
  const client = createClient({
    baseUrl: 'http://proxy.test',
    fetch: browser.fetch,
    onUnauthenticated: () => ends++,
  });
  return { browser, client, ends: () => ends };
}

test('a late 401 or 403 for the session before the one session() found leaves it alone', async () => {
  const scenarios = {
    // The reviewer's repro: alice's write is refused 403 csrf (bob signed in in another tab);
    // the app calls session() (visibilitychange) and now shows bob; then the 403 arrives.
    'another user': async (client, browser) => {
      await client.login('alice', 'pw');
      browser.signIn('bob');
      return { request: client.fetch('/api/write', { method: 'POST', body: '{}' }) };
    },
    // No session the app knows of (after a logout): a read is in flight when bob signs in.
    'a user after none': async (client, browser) => {
      await client.login('alice', 'pw');
      await client.logout();
      const request = client.fetch('/api/held');
      browser.signIn('bob');
      return { request };
    },
    // The same user's new login in another tab ends the session this read was sent under.
    'the same user, newly signed in': async (client, browser) => {
      await client.login('bob', 'pw');
      const request = client.fetch('/api/held');
      browser.signIn('bob');
      return { request };
    },
  };
  for (const [name, start] of Object.entries(scenarios)) {
    const { browser, client, ends } = scriptedClient();
    let events = 0;
    client.addEventListener('unauthenticated', () => events++);
    const late = (await start(client, browser)).request.then(
      (response) => `resolved ${response.status}`,
      (error) => `rejected ${error.code}`,
    );
    await new Promise((resolve) => setTimeout(resolve, 10)); // sent, answer held
    const found = await client.session({ touch: false });
    assert.equal(found.user, 'bob', name);
    browser.held.open();
    // The request itself did fail (its session is over): it still rejects.
    assert.equal(await late, 'rejected unauthenticated', name);
    assert.deepEqual(client.currentSession, found, `${name}: the session session() found stays`);
    assert.equal(ends() + events, 0, `${name}: no "session ended" for the session the app just found`);
    const next = await client.fetchJson('/api/write', { method: 'POST', body: {} });
    assert.deepEqual(next, { wroteAs: 'bob' }, `${name}: the next write goes out with the new token`);
  }
});

test('a session() read that finds the session the client holds keeps later 401s reported', async () => {
  // No new session: a 401 to a request sent before the read is about this session, and ends it.
  const { browser, client, ends } = scriptedClient();
  await client.login('alice', 'pw');
  const read = client.fetch('/api/held').catch((error) => error.code);
  assert.equal((await client.session({ touch: false })).user, 'alice');
  browser.held.open();
  assert.equal(await read, 'unauthenticated');
  assert.equal(ends(), 1);
  assert.equal(client.currentSession, null);
});

// --- Error bodies are read for their code only up to a small size -------------------------

/**
 * A loopback server whose answers to `/api/endless` (401, or 403 to unsafe methods) are JSON
 * that never ends, sent chunked, a little every few milliseconds; `/api/big` a 401 JSON of
 * 5000 bytes with its Content-Length; `/api/chunked-401` and `/api/chunked-403` the proxy's
 * own small bodies without Content-Length, as a proxy in front that compresses them sends them.
 */
async function startErrorBodyServer() {
  const seen = [];
  let csrfRefused = false;
  const server = await listenLoopback((req, res) => {
    seen.push(`${req.method} ${req.url} ${req.headers['x-csrf-token'] ?? null}`);
    const json = { 'content-type': 'application/json' };
    if (req.url.startsWith('/auth/')) return res.writeHead(200, json).end(JSON.stringify(sessionBody('tok-1')));
    const status = req.method === 'GET' ? 401 : 403;
    if (req.url === '/api/endless') {
      res.writeHead(status, json);
      res.write(`{"error":"${status === 401 ? 'unauthenticated' : 'csrf'}"`);
      const timer = setInterval(() => res.write(' '.repeat(256)), 2);
      res.on('close', () => clearInterval(timer));
      return undefined;
    }
    if (req.url === '/api/stalled') {
      // Part of a small body, then nothing: no byte more, and no end.
      res.writeHead(status, json);
      res.write(`{"error":"${status === 401 ? 'unauthenticated' : 'csrf'}",`);
      return undefined;
    }
    if (req.url === '/api/big') {
      const body = JSON.stringify({ error: 'unauthenticated', detail: 'x'.repeat(4968) });
      return res.writeHead(401, { ...json, 'content-length': Buffer.byteLength(body) }).end(body);
    }
    if (req.url === '/api/chunked-401') {
      res.writeHead(401, json);
      res.write('{"error":');
      return res.end('"unauthenticated"}');
    }
    if (req.url === '/api/chunked-403') {
      // Refused once (a stale token), then accepted: the client's refresh and retry.
      csrfRefused = !csrfRefused;
      if (!csrfRefused) return res.writeHead(200, json).end('{}');
      res.writeHead(403, json);
      res.write('{"error":');
      return res.end('"csrf"}');
    }
    return res.writeHead(404, json).end('{"error":"not_found"}');
  });
  return { ...server, seen };
}

/**
 * `client.fetch(path)` by GET (answered 401) and by POST (403) each resolves within `ms` with
 * that status: the client gave up reading the error body for its code. The body is the
 * caller's, unread; cancelled here.
 */
async function assertResolvesWithoutCode(client, path, ms) {
  for (const init of [{}, { method: 'POST', body: 'x' }]) {
    const outcome = await within(client.fetch(path, init), ms);
    assert.notEqual(outcome, 'still pending', `${init.method ?? 'GET'} ${path}: the client waited for the body`);
    assert.equal(outcome.value?.status, init.method ? 403 : 401, `${outcome.error}`);
    await outcome.value.body.cancel();
  }
}

test('a 401 or 403 whose JSON body never ends, or is large, resolves without its code', async () => {
  const server = await startErrorBodyServer();
  try {
    let events = 0;
    const client = createClient({ baseUrl: server.origin, onUnauthenticated: () => events++ });
    await client.login('demo', 'pw');
    await assertResolvesWithoutCode(client, '/api/endless', 2000);
    const big = await client.fetch('/api/big');
    assert.equal(big.status, 401, 'a 401 body over 4 KiB is not read for its code');
    assert.equal((await big.json()).error, 'unauthenticated', 'and reaches the caller whole');
    assert.equal(events, 0);
    assert.equal(client.currentSession?.user, 'demo');
    assert.equal(server.seen.filter((r) => r.startsWith('POST /api/endless')).length, 1, 'no csrf retry');

    // Small bodies without Content-Length (chunked) are still read: the csrf retry and the
    // end of the session work behind a proxy that recompresses them.
    assert.equal((await client.fetch('/api/chunked-403', { method: 'PUT', body: 'x' })).status, 200);
    assert.deepEqual(
      server.seen.filter((r) => r.includes('chunked-403') || r.includes('/auth/session')),
      ['PUT /api/chunked-403 tok-1', 'GET /auth/session?touch=false null', 'PUT /api/chunked-403 tok-1'],
    );
    await assert.rejects(client.fetch('/api/chunked-401'), { status: 401, code: 'unauthenticated' });
    assert.equal(events, 1);
  } finally {
    await server.close();
  }
});

test('a 401 or 403 whose small body stalls resolves without its code, and an abort rejects', async () => {
  // The 4 KiB cap ends only a body that keeps sending: one that sent a few bytes and then
  // nothing held client.fetch until the proxy's body_idle_timeout, and an abort meanwhile
  // resolved with the broken Response instead of rejecting.
  const server = await startErrorBodyServer();
  try {
    let events = 0;
    const client = createClient({ baseUrl: server.origin, onUnauthenticated: () => events++ });
    await client.login('demo', 'pw');
    // Given up after about a second each.
    await assertResolvesWithoutCode(client, '/api/stalled', 4000);
    assert.equal(events, 0);
    for (const init of [{}, { method: 'POST', body: 'x' }]) {
      await assert.rejects(
        client.fetch('/api/stalled', { ...init, signal: AbortSignal.timeout(300) }),
        (error) => error.name === 'TimeoutError',
        `${init.method ?? 'GET'}: an abort while the error body was read rejects`,
      );
    }
  } finally {
    await server.close();
  }
});

test('a 403 csrf whose token refresh gets 503 resolves with the 403, as any other status', async () => {
  const sent = [];
  const stub = async (input, init) => {
    const url = String(input);
    sent.push(`${init?.method ?? 'GET'} ${url}`);
    if (url.includes('/auth/login')) return jsonResponse(200, sessionBody('tok-1'));
    if (url.includes('/auth/session')) return jsonResponse(503, { error: 'session_store_unavailable' });
    return jsonResponse(403, { error: 'csrf' });
  };
  const client = createClient({ fetch: stub });
  await client.login('demo', 'pw');
  // countersign.d.ts fetch(): "every other status resolves with the Response". It rejected
  // with CountersignError(503, 'session_store_unavailable') from the refresh.
  const outcome = await client.fetch('/api/notes', { method: 'POST', body: 'x' }).catch((e) => e);
  assert.ok(outcome instanceof Response, `rejected with ${outcome.code} (${outcome.status})`);
  assert.equal(outcome.status, 403);
  assert.deepEqual(sent, ['POST /auth/login', 'POST /api/notes', 'GET /auth/session?touch=false']);
  assert.equal(client.currentSession?.user, 'demo');
});

// --- One-shot bodies are never replayed ---------------------------------------------------

test('a one-shot async-iterable body is not retried after a csrf refresh (it would go empty)', async () => {
  const client = await loggedIn();
  async function* chunks() {
    yield new TextEncoder().encode('streamed-iter');
  }
  // With a valid token it goes through once, intact.
  const ok = await client.fetch('/api/echo', { method: 'POST', body: chunks(), duplex: 'half' });
  assert.equal((await ok.json()).body, 'streamed-iter');

  proxy.rotateCsrf();
  const res = await client.fetch('/api/echo', { method: 'POST', body: chunks(), duplex: 'half' });
  assert.equal(res.status, 403, 'the csrf refusal is returned, as for a ReadableStream');
  await res.text();
  const attempts = proxy.state.log.filter((r) => r.path === '/api/echo');
  assert.equal(attempts.length, 2, 'one request each, no retry');
  const delivered = proxy.state.upstream.filter((r) => r.path === '/api/echo').map((r) => r.body);
  assert.deepEqual(delivered, ['streamed-iter'], 'the API never received an exhausted iterator');
});

// --- fetchJson serialises every object fetch would stringify ------------------------------

test('fetchJson sends class instances as JSON and BodyInit objects as they are', async () => {
  class CreateNote {
    constructor(text) {
      this.text = text;
    }
  }
  const client = await loggedIn();
  const echoed = async (body) => {
    const answer = await client.fetchJson('/api/echo', { method: 'POST', body });
    const { contentType } = proxy.state.log.at(-1);
    return { body: answer.body, contentType };
  };
  assert.deepEqual(await echoed(new CreateNote('hi')), { body: '{"text":"hi"}', contentType: 'application/json' });
  assert.deepEqual(await echoed(Object.create(null)), { body: '{}', contentType: 'application/json' });
  assert.deepEqual(await echoed(['a', 1]), { body: '["a",1]', contentType: 'application/json' });
  // BodyInit objects are fetch's business: never JSON.
  assert.deepEqual(await echoed(new URLSearchParams({ a: '1' })), {
    body: 'a=1',
    contentType: 'application/x-www-form-urlencoded;charset=UTF-8',
  });
  assert.deepEqual(await echoed(new Blob(['raw'], { type: 'text/plain' })), { body: 'raw', contentType: 'text/plain' });
  assert.equal((await echoed(new TextEncoder().encode('bytes'))).body, 'bytes');
  assert.equal((await echoed('a string')).body, 'a string');
  for (const r of proxy.state.log) assert.notEqual(r.body, '[object Object]');
});

// --- fetchJson's type admits the null it resolves with ------------------------------------

test('the fetchJson type is Promise<T | null>: null for 204 / empty bodies', async () => {
  const tsc = join(here, 'node_modules', 'typescript', 'bin', 'tsc');
  // Never skipped: scripts/e2e.sh installs the dev dependencies before it runs these tests.
  assert.ok(existsSync(tsc), 'typescript is not installed: run `npm ci` in clients/js');
  // Runtime: DELETE answers 204 and fetchJson resolves with null ...
  const client = await loggedIn();
  const note = await client.fetchJson('/api/notes', { method: 'POST', body: { text: 'x' } });
  assert.equal(await client.fetchJson(`/api/notes/${note.id}`, { method: 'DELETE' }), null);
  // ... so the type must not let `result.length` compile without a null check.
  const dir = mkdtempSync(join(tmpdir(), 'countersign-types-'));
  try {
    const module = relative(dir, join(here, 'countersign.js')).split('\\').join('/');
    writeFileSync(
      join(dir, 'probe.mts'),
      `import { createClient } from '${module.startsWith('.') ? module : `./${module}`}';
const client = createClient();
export async function f(): Promise<number> {
  const notes = await client.fetchJson<{ id: string }[]>('/api/notes/1', { method: 'DELETE' });
  // @ts-expect-error fetchJson resolves with null for 204 or an empty body
  return notes.length;
}
`,
    );
    let output = '';
    try {
      execFileSync(
        process.execPath,
        [tsc, '--strict', '--noEmit', '--target', 'ES2022', '--module', 'NodeNext', '--moduleResolution',
          'NodeNext', '--lib', 'ES2022,DOM', join(dir, 'probe.mts')],
        { encoding: 'utf8' },
      );
    } catch (error) {
      output = String(error.stdout) + String(error.stderr);
    }
    assert.equal(output, '', `tsc: ${output}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// --- HEAD: a 401 without a body is checked against the session endpoint -------------------

test('a HEAD answered 401 after the session ended is handled as unauthenticated', async () => {
  let events = 0;
  const client = await loggedIn({ onUnauthenticated: () => events++ });
  proxy.expireAll();
  // The proxy's HEAD answers carry no body (FRONTEND.md "HEAD"), so the 401 cannot say
  // {"error":"unauthenticated"}: the client asks GET /auth/session, which finds none.
  const outcome = await client.fetch('/api/whoami', { method: 'HEAD' }).catch((error) => error);
  assert.ok(outcome instanceof CountersignError, `resolved with HTTP ${outcome.status}`);
  assert.equal(outcome.code, 'unauthenticated');
  assert.equal(events, 1);
  assert.equal(client.currentSession, null);
});

test('a HEAD answered 401 while the session is alive resolves with the 401 Response', async () => {
  // An upstream API's own 401 to HEAD looks the same; the session endpoint tells them apart.
  let events = 0;
  const stub = async (input) => {
    const url = String(input);
    if (url.includes('/auth/')) return jsonResponse(200, sessionBody('tok-1'));
    return new Response(null, { status: 401 });
  };
  const client = createClient({ fetch: stub, onUnauthenticated: () => events++ });
  await client.login('demo', 'pw');
  const res = await client.fetch('/api/protected-by-the-api', { method: 'HEAD' });
  assert.equal(res.status, 401);
  assert.equal(events, 0);
  assert.equal(client.currentSession?.user, 'demo');
});

// --- A failing token pre-read does not block the request ----------------------------------

test('an unsafe request still goes out, without a token, when the token pre-read gets 503', async () => {
  const sent = [];
  const stub = async (input, init) => {
    const url = String(input);
    sent.push({ line: `${init?.method ?? 'GET'} ${url}`, token: new Headers(init?.headers).get('x-csrf-token') });
    if (url.includes('/auth/session')) return jsonResponse(503, { error: 'session_store_unavailable' });
    return jsonResponse(200, { ok: true }); // e.g. a public route: needs no session store
  };
  const client = createClient({ fetch: stub });
  // countersign.d.ts fetch(): "every other status resolves with the Response".
  const outcome = await client.fetch('/api/public/contact', { method: 'POST', body: 'x' }).catch((e) => e);
  assert.ok(outcome instanceof Response, `rejected with ${outcome.code} (${outcome.status})`);
  assert.deepEqual(sent, [
    { line: 'GET /auth/session?touch=false', token: null },
    { line: 'POST /api/public/contact', token: null },
  ]);
});

// --- The app's callback throwing does not change what the caller gets --------------------

test('a throwing onUnauthenticated callback is reported, and the caller still gets the CountersignError', async () => {
  const thrown = new Error('navigation failed');
  const client = createClient({
    fetch: async () => jsonResponse(401, { error: 'unauthenticated' }),
    onUnauthenticated: () => {
      throw thrown;
    },
  });
  const reported = [];
  const saved = { reportError: globalThis.reportError, consoleError: console.error };
  globalThis.reportError = (error) => reported.push(error);
  try {
    // Components swallow `e.code === 'unauthenticated'` (FRONTEND.md, React example).
    await assert.rejects(client.fetch('/api/x'), { name: 'CountersignError', status: 401, code: 'unauthenticated' });
    assert.deepEqual(reported, [thrown], 'reported through reportError');

    // Without reportError (Node 20): console.error.
    delete globalThis.reportError;
    const logged = [];
    console.error = (...args) => logged.push(args);
    await assert.rejects(client.fetch('/api/x'), { code: 'unauthenticated' });
    assert.ok(logged.some((args) => args.includes(thrown)), 'reported through console.error');
  } finally {
    if (saved.reportError === undefined) delete globalThis.reportError;
    else globalThis.reportError = saved.reportError;
    console.error = saved.consoleError;
  }
});

// --- The unauthenticated detail names the URL ---------------------------------------------

test('the unauthenticated detail names the URL of a Request input', async () => {
  // A stub/mocked fetch (MSW, test doubles) answers with a Response whose `url` is ''.
  const client = createClient({
    baseUrl: 'https://app.example',
    fetch: async () => jsonResponse(401, { error: 'unauthenticated' }),
  });
  let detail;
  client.addEventListener('unauthenticated', (event) => {
    detail = event.detail;
  });
  await client.fetch(new Request('https://app.example/api/x')).catch(() => {});
  assert.equal(detail.url, 'https://app.example/api/x');
});

// --- A request that cannot be built is the caller's bug, not a network failure ------------

test('a request fetch refuses to build rejects with its TypeError, not network_error', async () => {
  const client = createClient({ baseUrl: proxy.origin }); // the platform's fetch, as in a page
  // d.ts: network_error = "The request was sent but never completed". A GET with a body is a
  // bug in the caller.
  await assert.rejects(client.fetch('/api/echo', { body: 'forgot the method' }), (error) => {
    assert.equal(error.name, 'TypeError', `got ${error.name} ${error.code ?? ''}`);
    assert.equal(error instanceof CountersignError, false);
    return true;
  });
  // So is a relative URL in Node (SSR) without an absolute baseUrl: there is no page to
  // resolve it against.
  const ssr = createClient(); // Node's own fetch, baseUrl '' (the default)
  await assert.rejects(ssr.fetch('/api/whoami'), { name: 'TypeError' });
  // A real network failure is still one.
  await proxy.close();
  await assert.rejects(client.fetch('/api/whoami'), { name: 'CountersignError', code: 'network_error' });
  proxy = await startFakeProxy(); // afterEach closes it
});

// --- Node: documented as needing a cookie-aware fetch -------------------------------------

test('Node use keeps the session with a cookie-aware fetch, as the docs say it must', async () => {
  // Node's own fetch has no cookie jar: the session cookie is dropped after login.
  const plain = createClient({ baseUrl: proxy.origin });
  await plain.login('demo', 'demo-password');
  await assert.rejects(plain.fetchJson('/api/whoami'), { code: 'unauthenticated' });
  // With one (support/fake-proxy.js's small jar here; fetch-cookie in the docs) it works.
  const jarred = await loggedIn();
  assert.deepEqual(await jarred.fetchJson('/api/whoami'), { user: 'demo', roles: ['user'] });
  // ... which README.md, countersign.d.ts and FRONTEND.md say, with one Node version.
  const docs = Object.fromEntries(
    ['README.md', 'countersign.d.ts', 'countersign.js', '../../docs/FRONTEND.md'].map((file) => [
      file,
      readFileSync(join(here, file), 'utf8'),
    ]),
  );
  for (const file of ['README.md', 'countersign.d.ts', '../../docs/FRONTEND.md']) {
    assert.match(docs[file], /node[^\n]*(cookie|jar)|(cookie|jar)[^\n]*node/i, `${file}: Node needs a cookie-aware fetch`);
  }
  const { engines } = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8'));
  const required = /^>=\s*(\d+)$/.exec(engines.node)?.[1];
  assert.ok(required, `package.json engines.node: ${engines.node}`);
  for (const [file, text] of Object.entries(docs)) {
    for (const [, version] of text.matchAll(/Node\s*(?:\(\s*)?>=\s*(\d+)/g)) {
      assert.equal(version, required, `${file} says Node >= ${version}, package.json >= ${required}`);
    }
  }
});

// --- The fake proxy answers as the real one does ------------------------------------------

test('expires_at is unix seconds, as the real proxy sends it (fake proxy and SessionInfo)', async () => {
  // Real proxy (src/proxy/auth.rs session_response): "expires_at": session.expires_at(), a u64
  // of unix seconds, e.g. {"user":"demo","roles":["user"],"expires_at":1795980014,"csrf_token":"..."}.
  const client = newClient();
  const session = await client.login('demo', 'demo-password');
  assert.equal(typeof session.expiresAt, 'number', `fake sent ${JSON.stringify(session.expiresAt)}`);
  assert.ok(Number.isInteger(session.expiresAt) && session.expiresAt > 1.7e9 && session.expiresAt < 1e10, 'seconds');
  assert.equal(typeof (await client.session()).expiresAt, 'number');
  const raw = await (await jarFetch(`${proxy.origin}/auth/session`)).json(); // the fake's own answer
  assert.deepEqual(Object.keys(raw).sort(), ['csrf_token', 'expires_at', 'roles', 'user']);
  assert.equal(raw.expires_at, session.expiresAt);
  const dts = readFileSync(join(here, 'countersign.d.ts'), 'utf8');
  assert.match(dts, /expiresAt: number \| null;/);
});

// --- The error code type lists every code the proxy sends ---------------------------------

test('CountersignErrorCode lists every error code of FRONTEND.md (and of the proxy source)', () => {
  const frontend = readFileSync(join(here, '../../docs/FRONTEND.md'), 'utf8');
  // The error tables: rows like "| 503 | `session_store_unavailable` | ...".
  const documented = [...frontend.matchAll(/^\s*\|\s*[\d/]+\s*\|\s*(`[a-z_]+`(?:\s*\/\s*`[a-z_]+`)*)/gm)].flatMap(
    ([, cell]) => [...cell.matchAll(/`([a-z_]+)`/g)].map(([, code]) => code),
  );
  assert.ok(documented.length >= 15, `found ${documented.join(', ')}`);
  const codes = new Set(documented);
  // The proxy's own list, when the repository is there (src/proxy/error.rs, ProxyError::code).
  const errorRs = join(here, '../../src/proxy/error.rs');
  if (existsSync(errorRs)) {
    for (const [, code] of readFileSync(errorRs, 'utf8').matchAll(/=> "([a-z_]+)",/g)) {
      assert.ok(documented.includes(code), `FRONTEND.md's tables miss the proxy's ${code}`);
    }
  }
  const dts = readFileSync(join(here, 'countersign.d.ts'), 'utf8');
  const union = /export type CountersignErrorCode =([\s\S]*?)\(string & \{\}\);/.exec(dts)[1];
  for (const code of [...codes, 'network_error', 'invalid_json']) {
    assert.ok(union.includes(`| '${code}'`), `CountersignErrorCode lacks '${code}'`);
  }
});

// --- The caller's signal also bounds the token read a write waits for ----------------------

/** Settles with `promise`'s outcome, or 'still pending' after `ms` (a hang fails, not stalls). */
const within = (promise, ms = 2000) =>
  Promise.race([
    promise.then((value) => ({ value }), (error) => ({ error })),
    new Promise((resolve) => setTimeout(() => resolve('still pending'), ms).unref()),
  ]);

test('a write waiting for a stalled token read rejects with its signal\'s TimeoutError / AbortError', async () => {
  const stalled = gate();
  const sent = [];
  const stub = async (input, init) => {
    const url = String(input);
    sent.push(`${init?.method ?? 'GET'} ${url} ${new Headers(init?.headers).get('x-csrf-token')}`);
    if (url.includes('/auth/session')) {
      await stalled.opened; // the session store hangs
      return jsonResponse(200, sessionBody('tok-1'));
    }
    return jsonResponse(200, { ok: true });
  };
  const client = createClient({ baseUrl: 'http://proxy.test', fetch: stub });
  const timedOut = within(client.fetch('/api/x', { method: 'POST', body: 'a', signal: AbortSignal.timeout(50) }));
  const controller = new AbortController();
  const aborted = within(
    client.fetch(new Request('http://proxy.test/api/y', { method: 'POST', body: 'b', signal: controller.signal })),
  );
  const patient = client.fetch('/api/z', { method: 'POST', body: 'c' }); // shares the read, no signal
  controller.abort();
  const outcome = await timedOut;
  assert.notEqual(outcome, 'still pending', 'the timeout did not end the wait for the token');
  assert.equal(outcome.error?.name, 'TimeoutError');
  assert.equal((await aborted).error?.name, 'AbortError');
  // The shared read was not aborted for the request that did not ask for it.
  stalled.open();
  assert.equal((await patient).status, 200);
  assert.deepEqual(sent, ['GET http://proxy.test/auth/session?touch=false null', 'POST http://proxy.test/api/z tok-1']);
});

test('an already aborted write sends nothing, not even the token read', async () => {
  const sent = [];
  const stub = async (input) => {
    sent.push(String(input));
    return jsonResponse(200, sessionBody('tok-1'));
  };
  const client = createClient({ fetch: stub });
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(client.fetch('/api/x', { method: 'POST', body: 'x', signal: controller.signal }), {
    name: 'AbortError',
  });
  await assert.rejects(client.fetchJson('/api/x', { method: 'DELETE', signal: AbortSignal.abort() }), {
    name: 'AbortError',
  });
  assert.deepEqual(sent, []);
});

test('a write whose csrf refresh stalls, and a HEAD whose 401 check stalls, reject on abort', async () => {
  const stalled = gate();
  let reads = 0;
  const stub = async (input) => {
    const url = String(input);
    if (url.includes('/auth/login')) return jsonResponse(200, sessionBody('tok-1'));
    if (url.includes('/auth/session')) {
      reads++;
      await stalled.opened;
      return jsonResponse(200, sessionBody('tok-2'));
    }
    if (url.includes('/api/head')) return new Response(null, { status: 401 });
    return jsonResponse(403, { error: 'csrf' });
  };
  const client = createClient({ fetch: stub });
  await client.login('demo', 'pw');
  const write = await within(client.fetch('/api/x', { method: 'PUT', body: 'x', signal: AbortSignal.timeout(50) }));
  assert.notEqual(write, 'still pending');
  assert.equal(write.error?.name, 'TimeoutError');
  const head = await within(client.fetch('/api/head', { method: 'HEAD', signal: AbortSignal.timeout(50) }));
  assert.notEqual(head, 'still pending');
  assert.equal(head.error?.name, 'TimeoutError');
  assert.equal(reads, 1, 'one shared read');
  stalled.open();
});

// --- login() and session() accept the proxy's session JSON only ---------------------------

test('login and session reject JSON that is not the proxy\'s session with invalid_json, keeping the state', async () => {
  let answer = sessionBody('tok-1');
  const writes = [];
  const stub = async (input, init) => {
    const url = String(input);
    if (url.includes('/auth/')) return jsonResponse(200, answer);
    writes.push(new Headers(init?.headers).get('x-csrf-token'));
    return jsonResponse(200, {});
  };
  const client = createClient({ fetch: stub });
  const session = await client.login('demo', 'pw');
  const notSessions = [
    { ok: true }, // another API's answer, reached through a wrong baseUrl
    { ...sessionBody('tok-2'), user: 42 },
    { ...sessionBody('tok-2'), roles: 'user' },
    { ...sessionBody('tok-2'), roles: ['user', 7] },
    { user: 'demo', roles: ['user'], expires_at: 1795980014 }, // no csrf_token
    { ...sessionBody(''), user: 'demo' },
    { ...sessionBody('tok-2'), expires_at: '2030-01-01' },
  ];
  for (const body of notSessions) {
    answer = body;
    for (const call of [() => client.login('demo', 'pw'), () => client.session()]) {
      await assert.rejects(call(), (error) => {
        assert.ok(error instanceof CountersignError, `${JSON.stringify(body)}: ${error}`);
        assert.equal(error.status, 200);
        assert.equal(error.code, 'invalid_json', JSON.stringify(body));
        return true;
      });
    }
  }
  assert.equal(client.currentSession, session, 'the session state is as the last real answer left it');
  await client.fetch('/api/x', { method: 'POST', body: 'x' });
  assert.deepEqual(writes, ['tok-1'], 'the previous token is kept');
});

// --- ambiguous_session_cookie reaches the callers of login() and logout() -----------------

test('a logout refused 403 csrf whose session read is ambiguous rejects with ambiguous_session_cookie', async () => {
  // Two live sessions in the cookies, this tab's token matching neither: the proxy answers the
  // logout 403 csrf and the session read 401 ambiguous_session_cookie. Nothing was ended.
  const stub = async (input) => {
    const url = String(input);
    if (url.includes('/auth/login')) return jsonResponse(200, sessionBody('tok-1'));
    if (url.includes('/auth/logout')) return jsonResponse(403, { error: 'csrf' });
    return jsonResponse(401, { error: 'ambiguous_session_cookie' });
  };
  let events = 0;
  const client = createClient({ fetch: stub, onUnauthenticated: () => events++ });
  await client.login('demo', 'pw');
  await assert.rejects(client.logout(), { name: 'CountersignError', status: 401, code: 'ambiguous_session_cookie' });
  assert.equal(events, 0);
});

test('a login refused for too many session cookies rejects with ambiguous_session_cookie', async () => {
  // More than session.max_session_cookies distinct ids: refused before the password is checked.
  const stub = async () => jsonResponse(401, { error: 'ambiguous_session_cookie' });
  const client = createClient({ fetch: stub });
  await assert.rejects(client.login('demo', 'pw'), { status: 401, code: 'ambiguous_session_cookie' });
  assert.equal(client.currentSession, null);
});

// --- The declarations compile as types-check.ts uses them ---------------------------------

test('types-check.ts compiles against countersign.d.ts (SessionInfo.roles is readonly)', () => {
  const tsc = join(here, 'node_modules', 'typescript', 'bin', 'tsc');
  assert.ok(existsSync(tsc), 'typescript is not installed: run `npm ci` in clients/js');
  const checks = readFileSync(join(here, 'types-check.ts'), 'utf8');
  assert.match(checks, /@ts-expect-error[^\n]*\n[^\n]*roles\.push/, 'types-check.ts proves roles.push is a type error');
  let output = '';
  try {
    execFileSync(process.execPath, [tsc, '-p', join(here, 'tsconfig.json')], { encoding: 'utf8' });
  } catch (error) {
    output = String(error.stdout) + String(error.stderr);
  }
  assert.equal(output, '', `tsc: ${output}`);
});
