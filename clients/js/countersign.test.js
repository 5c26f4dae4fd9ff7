// Unit tests for countersign.js against an in-process fake of the proxy contract.
// Run: cd clients/js && npm test   (node --test, no dependencies)

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, CountersignClient, CountersignError } from './countersign.js';
import { startFakeProxy, fetchWithCookieJar, FAKE_EXPIRES_AT } from './support/fake-proxy.js';
import { listenLoopback } from './support/loopback.js';

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
const requests = (method, path) => proxy.state.log.filter((r) => r.method === method && r.path === path);

async function loggedIn(options) {
  const client = newClient(options);
  await client.login('demo', 'demo-password');
  return client;
}

test('login returns the session without exposing the CSRF token', async () => {
  const client = newClient();
  const session = await client.login('demo', 'demo-password');
  assert.deepEqual(session, { user: 'demo', roles: ['user'], expiresAt: FAKE_EXPIRES_AT });
  assert.deepEqual(client.currentSession, session);
  assert.equal(JSON.stringify(client).includes('csrf'), false);
  assert.equal(Object.values(client.currentSession).includes(proxy.state.sessions.values().next().value.csrf), false);
  const [login] = requests('POST', '/auth/login');
  assert.equal(login.contentType, 'application/json');
  assert.deepEqual(JSON.parse(login.body), { username: 'demo', password: 'demo-password' });
  assert.ok(client instanceof CountersignClient);
  assert.ok(client instanceof EventTarget);
});

test('login with a wrong password rejects with invalid_credentials and no unauthenticated event', async () => {
  let events = 0;
  const client = newClient({ onUnauthenticated: () => events++ });
  client.addEventListener('unauthenticated', () => events++);
  await assert.rejects(client.login('demo', 'wrong'), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'invalid_credentials');
    assert.equal(error.retryAfter, null);
    return true;
  });
  assert.equal(events, 0);
  assert.equal(client.currentSession, null);
  assert.equal(proxy.state.sessions.size, 0);
});

test('a throttled login rejects with too_many_attempts and Retry-After seconds', async () => {
  proxy.state.throttled = true;
  const client = newClient();
  await assert.rejects(client.login('demo', 'demo-password'), {
    name: 'CountersignError',
    status: 429,
    code: 'too_many_attempts',
    retryAfter: 7,
  });
});

test('session() is null without a session and restores the session after a reload', async () => {
  const before = newClient();
  assert.equal(await before.session(), null);

  await before.login('demo', 'demo-password');
  // A page reload: a new client, same browser cookie jar, no token in memory.
  const reloaded = newClient();
  assert.equal(reloaded.currentSession, null);
  assert.deepEqual(await reloaded.session(), {
    user: 'demo',
    roles: ['user'],
    expiresAt: FAKE_EXPIRES_AT,
  });
  const created = await reloaded.fetchJson('/api/notes', { method: 'POST', body: { text: 'after reload' } });
  assert.equal(created.text, 'after reload');
  assert.equal(requests('POST', '/api/notes').length, 1, 'the restored token was accepted first time');
});

test('session({touch:false}) asks the proxy not to extend the session', async () => {
  const client = await loggedIn();
  await client.session({ touch: false });
  assert.equal(requests('GET', '/auth/session?touch=false').length, 1);
  await client.session();
  assert.equal(requests('GET', '/auth/session').length, 1);
});

test('fetch adds X-CSRF-Token to unsafe methods only', async () => {
  const client = await loggedIn();
  const token = [...proxy.state.sessions.values()][0].csrf;

  const whoami = await client.fetch('/api/whoami');
  assert.equal(whoami.status, 200);
  assert.deepEqual(await whoami.json(), { user: 'demo', roles: ['user'] });
  await client.fetch('/api/notes', { method: 'HEAD' });
  await client.fetch('/api/notes', { method: 'OPTIONS' });
  for (const r of proxy.state.log.filter((r) => ['GET', 'HEAD', 'OPTIONS'].includes(r.method))) {
    assert.equal(r.csrfHeader, null, `${r.method} ${r.path} must not carry the token`);
  }

  const post = await client.fetch('/api/echo', { method: 'post', body: 'hello' });
  assert.equal(post.status, 200);
  const note = await client.fetchJson('/api/notes', { method: 'POST', body: { text: 'x' } });
  const del = await client.fetch(`/api/notes/${note.id}`, { method: 'DELETE' });
  assert.equal(del.status, 204);
  for (const method of ['POST', 'DELETE']) {
    for (const r of proxy.state.log.filter((r) => r.method === method && r.path !== '/auth/login')) {
      assert.equal(r.csrfHeader, token, `${method} ${r.path} carries the session's token`);
    }
  }
});

test('fetch keeps caller headers and sends the session cookie', async () => {
  const client = await loggedIn();
  const res = await client.fetch('/api/echo', {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain', 'X-Trace': 'abc' },
    body: 'payload',
  });
  assert.equal((await res.json()).body, 'payload');
  const [echo] = requests('POST', '/api/echo');
  assert.equal(echo.contentType, 'text/plain');
  assert.match(echo.cookie, /cs_session=/);
});

test('a 403 csrf refreshes the token once and retries once with the same body', async () => {
  const client = await loggedIn();
  proxy.rotateCsrf();
  const newToken = [...proxy.state.sessions.values()][0].csrf;

  const res = await client.fetch('/api/echo', { method: 'POST', body: 'same body' });
  assert.equal(res.status, 200);
  assert.equal((await res.json()).body, 'same body');

  const echoes = requests('POST', '/api/echo');
  assert.equal(echoes.length, 2, 'one refused attempt, one retry');
  assert.notEqual(echoes[0].csrfHeader, newToken);
  assert.equal(echoes[1].csrfHeader, newToken);
  assert.equal(echoes[1].body, 'same body');
  assert.equal(requests('GET', '/auth/session?touch=false').length, 1);
  assert.equal(proxy.state.upstream.filter((r) => r.path === '/api/echo').length, 1);
});

test('a request built from a Request object is replayed intact after a csrf refresh', async () => {
  const client = await loggedIn();
  proxy.rotateCsrf();
  const request = new Request(`${proxy.origin}/api/echo`, {
    method: 'POST',
    body: 'from a Request',
    headers: { 'Content-Type': 'text/plain' },
  });
  const res = await client.fetch(request);
  assert.equal(res.status, 200);
  assert.equal((await res.json()).body, 'from a Request');
  assert.equal(requests('POST', '/api/echo').length, 2);
});

test('a persistent 403 csrf is retried only once and then returned', async () => {
  await loggedIn(); // puts the session cookie in the shared jar
  // Every attempt gets a token the server no longer accepts.
  const realFetch = jarFetch;
  const rotatingFetch = async (input, init) => {
    const response = await realFetch(input, init);
    if (String(input).includes('/auth/session')) proxy.rotateCsrf();
    return response;
  };
  const stubborn = createClient({ baseUrl: proxy.origin, fetch: rotatingFetch });
  await stubborn.session();
  proxy.rotateCsrf();
  const res = await stubborn.fetch('/api/echo', { method: 'POST', body: 'x' });
  assert.equal(res.status, 403);
  assert.deepEqual(await res.json(), { error: 'csrf' }, 'the body is still readable by the caller');
  assert.equal(requests('POST', '/api/echo').length, 2);
  assert.equal(proxy.state.upstream.length, 0);
});

test('fetchJson rejects with csrf when the retry is refused too', async () => {
  const rotatingFetch = async (input, init) => {
    const response = await jarFetch(input, init);
    if (String(input).includes('/auth/session')) proxy.rotateCsrf();
    return response;
  };
  const client = createClient({ baseUrl: proxy.origin, fetch: rotatingFetch });
  await client.login('demo', 'demo-password');
  proxy.rotateCsrf();
  await assert.rejects(client.fetchJson('/api/notes', { method: 'POST', body: { text: 'no' } }), {
    status: 403,
    code: 'csrf',
  });
  assert.equal(proxy.state.notes.length, 0);
});

test('a 403 that is not csrf is returned as is, without a retry', async () => {
  const client = await loggedIn();
  const res = await client.fetch('/api/forbidden', { method: 'POST', body: 'x' });
  assert.equal(res.status, 403);
  assert.equal(requests('POST', '/api/forbidden').length, 1);
  assert.equal(requests('GET', '/auth/session?touch=false').length, 0);
});

test('a streamed body is not retried (it cannot be sent twice)', async () => {
  const client = await loggedIn();
  proxy.rotateCsrf();
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(new TextEncoder().encode('streamed'));
      controller.close();
    },
  });
  const res = await client.fetch('/api/echo', { method: 'POST', body, duplex: 'half' });
  assert.equal(res.status, 403);
  assert.equal(requests('POST', '/api/echo').length, 1);
});

test('concurrent csrf failures share one token refresh', async () => {
  const client = await loggedIn();
  proxy.rotateCsrf();
  const results = await Promise.all(
    [1, 2, 3].map((n) => client.fetchJson('/api/notes', { method: 'POST', body: { text: `n${n}` } })),
  );
  assert.deepEqual(results.map((n) => n.text).sort(), ['n1', 'n2', 'n3']);
  assert.equal(requests('GET', '/auth/session?touch=false').length, 1);
});

test('a 401 from the API dispatches unauthenticated, calls the callback and rejects', async () => {
  const seen = [];
  const client = await loggedIn({ onUnauthenticated: (detail) => seen.push(['callback', detail]) });
  client.addEventListener('unauthenticated', (event) => seen.push(['event', event.detail]));
  proxy.expireAll();

  await assert.rejects(client.fetch('/api/whoami'), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'unauthenticated');
    return true;
  });
  assert.deepEqual(
    seen.map(([kind]) => kind),
    ['event', 'callback'],
  );
  assert.equal(seen[0][1].code, 'unauthenticated');
  assert.equal(seen[0][1].url, `${proxy.origin}/api/whoami`);
  assert.equal(client.currentSession, null);
});

test('a 401 ambiguous_session_cookie ends the session like unauthenticated, and a login clears it', async () => {
  const seen = [];
  const client = await loggedIn({ onUnauthenticated: (detail) => seen.push(detail.code) });
  proxy.makeAmbiguous();
  await assert.rejects(client.fetch('/api/whoami'), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'unauthenticated');
    return true;
  });
  assert.deepEqual(seen, ['unauthenticated']);
  assert.equal(client.currentSession, null);
  await client.login('demo', 'demo-password');
  const res = await client.fetch('/api/whoami');
  assert.equal(res.status, 200);
  assert.deepEqual(seen, ['unauthenticated']);
});

test('an unsafe request after the session ended routes to login without a second refusal', async () => {
  let events = 0;
  const client = await loggedIn({ onUnauthenticated: () => events++ });
  proxy.expireAll();
  await assert.rejects(client.fetchJson('/api/notes', { method: 'POST', body: { text: 'late' } }), {
    code: 'unauthenticated',
  });
  assert.equal(events, 1);
  assert.equal(proxy.state.notes.length, 0);
});

test('logout sends the token, ends the session and forgets it', async () => {
  const client = await loggedIn();
  const token = [...proxy.state.sessions.values()][0].csrf;
  await client.logout();
  const [logout] = requests('POST', '/auth/logout');
  assert.equal(logout.csrfHeader, token);
  assert.equal(proxy.state.sessions.size, 0);
  assert.equal(client.currentSession, null);
  assert.equal(jarFetch.jar.size, 0, 'the cleared cookie left the jar');
  assert.equal(await client.session(), null);
});

test('logout({all:true}) ends the sessions of other browsers too', async () => {
  const other = createClient({ baseUrl: proxy.origin, fetch: fetchWithCookieJar() });
  await other.login('demo', 'demo-password');
  const client = await loggedIn();
  assert.equal(proxy.state.sessions.size, 2);
  await client.logout({ all: true });
  assert.equal(requests('POST', '/auth/logout?all=true').length, 1);
  assert.equal(proxy.state.sessions.size, 0);
  assert.equal(await other.session(), null);
});

test('logout resolves when the session had already expired, without an event', async () => {
  let events = 0;
  const client = await loggedIn({ onUnauthenticated: () => events++ });
  proxy.expireAll();
  await client.logout();
  assert.equal(events, 0);
  assert.equal(client.currentSession, null);
});

test('a logout that fails on the way keeps the session, so the user can retry', async () => {
  const client = await loggedIn();
  const failing = createClient({
    baseUrl: proxy.origin,
    fetch: async (input, init) => {
      if (String(input).includes('/auth/logout')) throw new TypeError('Failed to fetch');
      return jarFetch(input, init);
    },
  });
  await failing.session();
  await assert.rejects(failing.logout(), { code: 'network_error' });
  assert.equal(failing.currentSession?.user, 'demo');
  assert.equal(proxy.state.sessions.size, 1);
  await client.logout();
  assert.equal(proxy.state.sessions.size, 0);
});

test('fetchJson parses bodies, returns null for 204 and maps error codes', async () => {
  const client = await loggedIn();
  assert.deepEqual(await client.fetchJson('/api/notes'), []);
  const note = await client.fetchJson('/api/notes', { method: 'POST', body: { text: 'hi' } });
  assert.equal(requests('POST', '/api/notes')[0].contentType, 'application/json');
  assert.equal(await client.fetchJson(`/api/notes/${note.id}`, { method: 'DELETE' }), null);
  await assert.rejects(client.fetchJson('/api/missing'), { status: 404, code: 'not_found' });
  await assert.rejects(client.fetchJson('/api/not-json'), { status: 200, code: 'invalid_json' });
});

test('a network failure rejects with network_error and status 0', async () => {
  const client = newClient();
  await proxy.close();
  await assert.rejects(client.fetch('/api/whoami'), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 0);
    assert.equal(error.code, 'network_error');
    assert.ok(error.cause);
    return true;
  });
  await assert.rejects(client.login('demo', 'x'), { code: 'network_error' });
  proxy = await startFakeProxy(); // afterEach closes it
});

test('baseUrl prefixes relative paths and leaves absolute URLs alone', () => {
  const client = createClient({ baseUrl: 'https://app.example/bff/', fetch: async () => new Response() });
  assert.equal(client.url('/api/x'), 'https://app.example/bff/api/x');
  assert.equal(client.url('api/x'), 'https://app.example/bff/api/x');
  assert.equal(client.url('https://other.example/y'), 'https://other.example/y');
  assert.equal(createClient({ fetch: async () => new Response() }).url('/auth/login'), '/auth/login');
});

test('the client calls fetch with credentials same-origin by default', async () => {
  const seen = [];
  const spy = async (input, init) => {
    seen.push(init.credentials);
    // The /auth/ answers must be session JSON (anything else is invalid_json).
    const body = String(input).includes('/auth/') ? { user: 'a', roles: [], expires_at: 1, csrf_token: 't' } : {};
    return new Response(JSON.stringify(body), { status: 200, headers: { 'content-type': 'application/json' } });
  };
  const client = createClient({ fetch: spy });
  await client.fetch('/api/x');
  await client.fetch('/api/x', { method: 'POST', credentials: 'include' });
  await client.session();
  await client.login('a', 'b');
  // GET, the POST's token read and the POST itself, session, login.
  assert.deepEqual(seen, Array(5).fill('same-origin'));
});

// --- Which requests are the proxy's ------------------------------------------------------
// The token, the client's credentials mode and the session handling belong to the proxy's
// origin only (the origin of baseUrl resolved against the page: the page's own origin by
// default). Everything else goes to fetch as the caller wrote it.

const SESSION_BODY = { user: 'demo', roles: ['user'], expires_at: null, csrf_token: 'tok-1' };
const jsonResponse = (status, body) =>
  new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });

/**
 * A fetch that records each call ({url, method, token, credentials, init}) and answers the
 * /auth/ endpoints with a session whose token is tok-1; `respond(url)` answers the rest.
 */
function recordingFetch(respond = () => jsonResponse(200, {})) {
  const calls = [];
  const spy = async (input, init) => {
    const request = input instanceof Request ? input : null;
    const url = request ? request.url : String(input);
    const headers = new Headers(request?.headers);
    new Headers(init?.headers).forEach((value, name) => headers.set(name, value));
    calls.push({
      input,
      init,
      url,
      method: (init?.method ?? request?.method ?? 'GET').toUpperCase(),
      token: headers.get('x-csrf-token'),
      credentials: init?.credentials,
    });
    if (/\/auth\/(login|session)/.test(url)) return jsonResponse(200, SESSION_BODY);
    return respond(url);
  };
  spy.calls = calls;
  spy.to = (needle) => calls.filter((c) => c.url.includes(needle));
  return spy;
}

/** Runs `fn` as if in a page at `href` (and with `document.baseURI` when given). */
async function inPage(href, fn, baseURI) {
  const saved = { location: globalThis.location, document: globalThis.document };
  globalThis.location = { href, origin: new URL(href).origin };
  if (baseURI !== undefined) globalThis.document = { baseURI };
  try {
    return await fn();
  } finally {
    globalThis.location = saved.location;
    globalThis.document = saved.document;
  }
}

async function recordingClient(options = {}, respond) {
  const spy = recordingFetch(respond);
  const client = createClient({ fetch: spy, ...options });
  await client.login('demo', 'pw');
  return { client, spy };
}

test('the token goes to relative and same-origin absolute URLs of the page', async () => {
  await inPage('https://app.example/notes/list?x=1', async () => {
    const { client, spy } = await recordingClient();
    const inputs = [
      '/api/a',
      'api/b',
      'https://app.example/api/c',
      'HTTPS://APP.EXAMPLE:443/api/d',
      new URL('https://app.example/api/e'),
      new Request('https://app.example/api/f', { method: 'POST', body: 'x' }),
    ];
    for (const input of inputs) await client.fetch(input, input instanceof Request ? undefined : { method: 'POST' });
    const sent = spy.calls.filter((c) => c.url.includes('/api/'));
    assert.deepEqual(
      sent.map((c) => [c.url, c.token, c.credentials]),
      [
        ['/api/a', 'tok-1', 'same-origin'],
        ['/api/b', 'tok-1', 'same-origin'],
        ['https://app.example/api/c', 'tok-1', 'same-origin'],
        ['HTTPS://APP.EXAMPLE:443/api/d', 'tok-1', 'same-origin'],
        ['https://app.example/api/e', 'tok-1', 'same-origin'],
        ['https://app.example/api/f', 'tok-1', 'same-origin'],
      ],
    );
  });
});

test('the token goes to the baseUrl origin, absolute or resolved against the page', async () => {
  // An absolute baseUrl, no page (Node): relative paths are prefixed, same-origin URLs match.
  const { client, spy } = await recordingClient({ baseUrl: 'https://proxy.example/bff/' });
  await client.fetch('/api/x', { method: 'POST' });
  await client.fetch('https://proxy.example/elsewhere', { method: 'DELETE' });
  assert.deepEqual(
    spy.calls.slice(1).map((c) => [c.url, c.token]),
    [
      ['https://proxy.example/bff/api/x', 'tok-1'],
      ['https://proxy.example/elsewhere', 'tok-1'],
    ],
  );

  // A path baseUrl in a page: the page's origin.
  await inPage('https://app.example/', async () => {
    const { client: paged, spy: pagedSpy } = await recordingClient({ baseUrl: '/bff' });
    await paged.fetch('/api/x', { method: 'POST' });
    await paged.fetch('https://app.example/bff/api/y', { method: 'POST' });
    assert.deepEqual(
      pagedSpy.calls.slice(1).map((c) => [c.url, c.token]),
      [
        ['/bff/api/x', 'tok-1'],
        ['https://app.example/bff/api/y', 'tok-1'],
      ],
    );
  });

  // An absolute baseUrl on another origin than the page: that origin, not the page's.
  await inPage('https://app.example/', async () => {
    const { client: split, spy: splitSpy } = await recordingClient({ baseUrl: 'https://bff.example' });
    await split.fetch('/api/x', { method: 'POST' });
    await split.fetch('https://app.example/api/x', { method: 'POST' });
    assert.deepEqual(
      splitSpy.calls.slice(1).map((c) => [c.url, c.token]),
      [
        ['https://bff.example/api/x', 'tok-1'],
        ['https://app.example/api/x', null],
      ],
    );
  });
});

// URLs that look like, or start like, the proxy's but name another origin.
const LOOKALIKES = [
  'https://evil.example/collect',
  '//evil.example/x', // protocol-relative
  '/\\evil.example/x', // the URL parser reads \ as / in http(s) URLs
  '\\\\evil.example/x',
  '/\t//evil.example/x', // tab removed by the parser: ///evil.example/x
  'https://proxy.example.evil.com/x', // the proxy's host as a prefix of another
  'https://proxy.example@evil.example/x', // the proxy's host as user info
  'https://proxy.example:8443/x', // another port
  'http://proxy.example/x', // another scheme
  'https://proxy.example./x', // a trailing dot: another origin for the URL standard
  'http:evil.example/x',
  'data:text/plain,x', // an opaque origin
];

test('the token never goes to another origin, however its URL is spelled', async () => {
  const check = async (options) => {
    const { client, spy } = await recordingClient(options);
    // With a baseUrl, a path-like lookalike ('/\evil.example/x') is prefixed and so stays on
    // the proxy ('/bff/\evil.example/x' is the path /bff//evil.example/x): only the URLs the
    // prefixing leaves alone can name another origin.
    const urls = options.baseUrl ? LOOKALIKES.filter((url) => client.url(url) === url) : LOOKALIKES;
    assert.ok(urls.length >= 9);
    for (const url of urls) {
      const inputs = [url, new URL(url, 'https://proxy.example/')];
      // (fetch refuses a Request for a data: URL or one with user info in it)
      if (!/^data:|@/.test(url)) inputs.push(new Request(new URL(url, 'https://proxy.example/'), { method: 'POST' }));
      for (const input of inputs) {
        const init = input instanceof Request ? undefined : { method: 'POST', body: 'x' };
        await client.fetch(input, init);
        const call = spy.calls.at(-1);
        assert.equal(call.token, null, `${String(input.url ?? input)} must not carry the token`);
        assert.equal(call.input, input instanceof Request ? input : call.input, 'a Request is passed as is');
        assert.equal(call.init, init, `${String(input.url ?? input)}: init passed as given`);
      }
    }
    assert.equal(spy.to('/auth/session').length, 0, 'no session refresh for a foreign URL');
  };
  await inPage('https://proxy.example/app/', () => check({}));
  await inPage('https://proxy.example/app/', () => check({ baseUrl: '/bff' }));
  await check({ baseUrl: 'https://proxy.example' });
  // No page and no absolute baseUrl: only relative references are the proxy's; an absolute
  // URL is never trusted (not even the names the client uses internally to tell them apart).
  await check({});
  const { client, spy } = await recordingClient();
  await client.fetch('http://a.invalid/x', { method: 'POST' });
  await client.fetch('https://b.invalid/x', { method: 'POST' });
  assert.deepEqual(spy.calls.slice(1).map((c) => c.token), [null, null]);
});

test('a <base href> on another origin moves relative URLs off the proxy: no token', async () => {
  await inPage(
    'https://proxy.example/app/',
    async () => {
      const { client, spy } = await recordingClient();
      await client.fetch('/api/x', { method: 'POST' });
      assert.equal(spy.calls.at(-1).token, null);
    },
    'https://cdn.example/assets/',
  );
});

// The client's own /auth/ calls go to the proxy whatever a <base href> says: relative, fetch
// would resolve them against document.baseURI, and a <base> on another origin (one injected
// into the page's HTML is enough) would get the password, the logout's token, and the say on
// which session the client holds.
const FOREIGN_BASE = 'https://cdn.example/assets/';

test('login under a <base href> on another origin posts to the proxy', async () => {
  const cases = [
    // [page, document.baseURI, baseUrl, the login URL]
    ['https://proxy.example/app/', FOREIGN_BASE, undefined, 'https://proxy.example/auth/login'],
    ['https://proxy.example/app/', FOREIGN_BASE, '/bff', 'https://proxy.example/bff/auth/login'],
    ['https://proxy.example/app/', FOREIGN_BASE, 'bff', 'https://proxy.example/app/bff/auth/login'],
    ['https://proxy.example/app/', FOREIGN_BASE, '//bff.example', 'https://bff.example/auth/login'],
    ['https://proxy.example/app/', FOREIGN_BASE, 'https://bff.example', 'https://bff.example/auth/login'],
    // A <base> on the proxy's own origin still places a path-relative baseUrl, as fetch would.
    [
      'https://proxy.example/app/deep/route',
      'https://proxy.example/app/',
      'bff',
      'https://proxy.example/app/bff/auth/login',
    ],
  ];
  for (const [page, base, baseUrl, expected] of cases) {
    await inPage(
      page,
      async () => {
        const spy = recordingFetch();
        const client = createClient({ fetch: spy, ...(baseUrl === undefined ? {} : { baseUrl }) });
        assert.deepEqual(await client.login('demo', 'pw'), { user: 'demo', roles: ['user'], expiresAt: null });
        assert.deepEqual(
          spy.calls.map((c) => [c.method, c.url, c.token]),
          [['POST', expected, null]],
          `baseUrl ${baseUrl} under <base href="${base}">`,
        );
        assert.deepEqual(JSON.parse(spy.calls[0].init.body), { username: 'demo', password: 'pw' });
      },
      base,
    );
  }
});

test('session() and token reads under a <base href> on another origin ask the proxy', async () => {
  await inPage(
    'https://proxy.example/app/',
    async () => {
      const spy = recordingFetch();
      const client = createClient({ fetch: spy });
      assert.equal((await client.session()).user, 'demo');
      assert.equal((await client.session({ touch: false })).user, 'demo');
      // A fresh client (a page load): its first write reads the token, from the proxy too.
      const reloaded = createClient({ fetch: spy });
      await reloaded.fetch('https://proxy.example/api/x', { method: 'POST' });
      assert.deepEqual(
        spy.calls.map((c) => [c.method, c.url, c.token]),
        [
          ['GET', 'https://proxy.example/auth/session', null],
          ['GET', 'https://proxy.example/auth/session?touch=false', null],
          ['GET', 'https://proxy.example/auth/session?touch=false', null],
          ['POST', 'https://proxy.example/api/x', 'tok-1'],
        ],
      );
    },
    FOREIGN_BASE,
  );
});

test('logout under a <base href> on another origin sends its token to the proxy', async () => {
  await inPage(
    'https://proxy.example/app/',
    async () => {
      const { client, spy } = await recordingClient();
      await client.logout();
      await client.login('demo', 'pw');
      await client.logout({ all: true });
      assert.deepEqual(
        spy.to('/auth/logout').map((c) => [c.url, c.token]),
        [
          ['https://proxy.example/auth/logout', 'tok-1'],
          ['https://proxy.example/auth/logout?all=true', 'tok-1'],
        ],
      );
      assert.equal(client.currentSession, null);
    },
    FOREIGN_BASE,
  );
});

test('outside a page the client\'s own endpoints stay relative to baseUrl', async () => {
  const { client, spy } = await recordingClient();
  await client.session();
  await client.logout();
  assert.deepEqual(spy.calls.map((c) => c.url), ['/auth/login', '/auth/session', '/auth/logout']);
});

test('a 401 unauthenticated from another origin is returned as is, the session stays', async () => {
  const thirdParty = await startFakeProxy(); // same host, another port: another origin
  try {
    let events = 0;
    const client = await loggedIn({ onUnauthenticated: () => events++ });
    client.addEventListener('unauthenticated', () => events++);
    const before = client.currentSession;

    const res = await client.fetch(`${thirdParty.origin}/collect`, { method: 'POST', body: 'x' });
    assert.equal(res.status, 401);
    assert.deepEqual(await res.json(), { error: 'unauthenticated' });
    const get = await client.fetch(`${thirdParty.origin}/api/whoami`);
    assert.equal(get.status, 401);
    await assert.rejects(client.fetchJson(`${thirdParty.origin}/api/whoami`), { status: 401, code: 'unauthenticated' });

    assert.equal(events, 0, 'no unauthenticated event or callback');
    assert.deepEqual(client.currentSession, before);
    for (const r of thirdParty.state.log) {
      assert.equal(r.csrfHeader, null, `${r.method} ${r.path} at the third party has no token`);
      assert.equal(r.cookie, null, 'nor the session cookie');
    }
    // The token is still in memory: the next proxy write needs no refresh.
    const sessionReads = requests('GET', '/auth/session?touch=false').length;
    const ok = await client.fetch('/api/echo', { method: 'POST', body: 'still in' });
    assert.equal(ok.status, 200);
    assert.equal(requests('GET', '/auth/session?touch=false').length, sessionReads);
  } finally {
    await thirdParty.close();
  }
});

test('a 403 csrf from another origin is not retried and refreshes nothing', async () => {
  const { client, spy } = await recordingClient({ baseUrl: 'https://proxy.example' }, (url) =>
    url.startsWith('https://evil.example') ? jsonResponse(403, { error: 'csrf' }) : jsonResponse(200, {}),
  );
  const res = await client.fetch('https://evil.example/x', { method: 'POST', body: 'x' });
  assert.equal(res.status, 403);
  assert.deepEqual(await res.json(), { error: 'csrf' });
  await assert.rejects(client.fetchJson('https://evil.example/x', { method: 'POST', body: { a: 1 } }), {
    status: 403,
    code: 'csrf',
  });
  assert.equal(spy.to('evil.example').length, 2, 'one request each, no retry');
  assert.equal(spy.to('/auth/session').length, 0);
  assert.equal(client.currentSession.user, 'demo');
});

test('a foreign request keeps its own credentials mode and needs no token first', async () => {
  const spy = recordingFetch();
  const client = createClient({ fetch: spy, baseUrl: 'https://proxy.example', credentials: 'include' });
  // No token in memory yet: a proxy write would read the session first; a foreign one must not.
  await client.fetch('https://evil.example/a', { method: 'POST' });
  await client.fetch('https://evil.example/b', { method: 'POST', credentials: 'omit' });
  assert.deepEqual(
    spy.calls.map((c) => [c.url, c.credentials, c.token]),
    [
      ['https://evil.example/a', undefined, null],
      ['https://evil.example/b', 'omit', null],
    ],
  );
  await client.fetch('/api/x', { method: 'POST', credentials: 'omit' });
  assert.deepEqual(
    spy.calls.slice(2).map((c) => [c.url, c.credentials, c.token]),
    [
      ['https://proxy.example/auth/session?touch=false', 'include', null],
      ['https://proxy.example/api/x', 'include', 'tok-1'],
    ],
  );
});

test('a network failure on a foreign URL is a network_error and leaves the session alone', async () => {
  let events = 0;
  const client = createClient({
    baseUrl: 'https://proxy.example',
    onUnauthenticated: () => events++,
    fetch: async (input) => {
      if (String(input).includes('/auth/')) return jsonResponse(200, SESSION_BODY);
      throw new TypeError('Failed to fetch');
    },
  });
  await client.login('demo', 'pw');
  await assert.rejects(client.fetch('https://evil.example/x', { method: 'POST' }), { code: 'network_error' });
  assert.equal(events, 0);
  assert.equal(client.currentSession.user, 'demo');
});

// --- The token follows no redirect ----------------------------------------------------------
// fetch follows redirects by default and, on one to another origin, drops only Authorization
// (and in Node Cookie): the X-CSRF-Token of a write would reach wherever an API's 307 (to a
// storage bucket) or an open redirect points.

/**
 * A loopback server (another origin for each: its own port) that records each request
 * ({method, url, token, authorization, accept, trace}) and answers with `handler`.
 */
async function startRecordingServer(handler) {
  const seen = [];
  const server = await listenLoopback((req, res) => {
    seen.push({
      method: req.method,
      url: req.url,
      token: req.headers['x-csrf-token'] ?? null,
      authorization: req.headers.authorization ?? null,
      accept: req.headers.accept ?? null,
      trace: req.headers['x-trace'] ?? null,
    });
    req.resume().on('end', () => handler(req, res));
  });
  return { ...server, seen };
}

const answerJson = (res, status, body, headers = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
};

test('a request carrying the token follows no redirect: the token never reaches the target', async () => {
  const target = await startRecordingServer((req, res) => answerJson(res, 200, { target: true }));
  const api = await startRecordingServer((req, res) => {
    if (req.url === '/auth/login') return answerJson(res, 200, { ...SESSION_BODY, csrf_token: 'tok-secret' });
    if (req.url === '/api/upload') return answerJson(res, 307, {}, { location: `${target.origin}/bucket?sig=x` });
    if (req.url === '/api/moved') return answerJson(res, 308, {}, { location: '/api/landing' }); // same origin
    if (req.url === '/api/created') return answerJson(res, 303, {}, { location: `${target.origin}/note/1` });
    return answerJson(res, 200, { landed: true });
  });
  try {
    // The platform's fetch (the client builds the Request), and a `fetch` option.
    for (const fetchOption of [undefined, jarFetch]) {
      const client = createClient({ baseUrl: api.origin, ...(fetchOption && { fetch: fetchOption }) });
      await client.login('demo', 'pw');
      // The redirect itself is the answer (in a browser an opaque one, with status 0).
      assert.equal((await client.fetch('/api/upload', { method: 'PUT', body: 'data' })).status, 307);
      assert.equal((await client.fetch('/api/created', { method: 'POST', body: 'x' })).status, 303);
      const request = new Request(`${api.origin}/api/upload`, { method: 'POST', body: 'data' });
      assert.equal((await client.fetch(request)).status, 307, 'a Request with the default redirect mode too');
      // A redirect to the proxy's own origin is not followed either (a browser hides where to).
      assert.equal((await client.fetch('/api/moved', { method: 'DELETE' })).status, 308);
      await assert.rejects(client.fetchJson('/api/upload', { method: 'PUT', body: { a: 1 } }), {
        status: 307,
        code: 'http_307',
      });
    }
    assert.deepEqual(target.seen, [], 'nothing reached the redirect target');
    assert.equal(api.seen.filter((r) => r.url === '/api/landing').length, 0);
    assert.ok(api.seen.filter((r) => r.url === '/api/upload').every((r) => r.token === 'tok-secret'));

    const client = createClient({ baseUrl: api.origin });
    await client.login('demo', 'pw');
    // A request without the token (a GET) follows redirects as fetch does.
    assert.deepEqual(await (await client.fetch('/api/upload')).json(), { target: true });
    assert.deepEqual(target.seen.at(-1), {
      method: 'GET',
      url: '/bucket?sig=x',
      token: null,
      authorization: null,
      accept: '*/*',
      trace: null,
    });
    // The caller may ask for redirects to be followed: the token then goes along, by their choice.
    const followed = await client.fetch('/api/upload', { method: 'PUT', body: 'data', redirect: 'follow' });
    assert.equal(followed.status, 200);
    assert.equal(target.seen.at(-1).method, 'PUT');
    assert.equal(target.seen.at(-1).token, 'tok-secret');
    // Or to have them fail, as fetch does with 'error' (the Request's own mode is kept too).
    await assert.rejects(client.fetch('/api/upload', { method: 'PUT', body: 'data', redirect: 'error' }), {
      code: 'network_error',
    });
    const erroring = new Request(`${api.origin}/api/upload`, { method: 'PUT', body: 'data', redirect: 'error' });
    await assert.rejects(client.fetch(erroring), { code: 'network_error' });
    assert.equal(target.seen.length, 2);
  } finally {
    await target.close();
    await api.close();
  }
});

// --- fetchJson keeps a Request's headers --------------------------------------------------

test('fetchJson keeps the headers of a Request, to another origin as to the proxy', async () => {
  const elsewhere = await startRecordingServer((req, res) => answerJson(res, 200, { ok: true }));
  try {
    const client = await loggedIn();
    const headers = { authorization: 'Bearer third-party', 'x-trace': 'from-request' };
    assert.deepEqual(await client.fetchJson(new Request(`${elsewhere.origin}/other`, { headers })), { ok: true });
    // init's headers go over the Request's, name by name; a Request's Accept is the caller's.
    const versioned = { ...headers, accept: 'application/x.v2+json' };
    const request = new Request(`${elsewhere.origin}/other`, { headers: versioned });
    await client.fetchJson(request, { headers: { 'x-trace': 'from-init' } });
    assert.deepEqual(
      elsewhere.seen.map((r) => [r.authorization, r.trace, r.accept, r.token]),
      [
        ['Bearer third-party', 'from-request', 'application/json', null],
        ['Bearer third-party', 'from-init', 'application/x.v2+json', null],
      ],
    );
    // To the proxy (the client's own request path) the same.
    const proxied = await startRecordingServer((req, res) => answerJson(res, 200, { ok: true }));
    try {
      const own = createClient({ baseUrl: proxied.origin });
      await own.fetchJson(new Request(`${proxied.origin}/api/x`, { headers }), { headers: { 'x-trace': 'from-init' } });
      assert.deepEqual(
        proxied.seen.map((r) => [r.authorization, r.trace, r.accept]),
        [['Bearer third-party', 'from-init', 'application/json']],
      );
    } finally {
      await proxied.close();
    }
  } finally {
    await elsewhere.close();
  }
});
