// Unit tests for countersign.js against an in-process fake of the proxy contract.
// Run: cd clients/js && npm test   (node --test, no dependencies)

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, CountersignClient, CountersignError } from './countersign.js';
import { startFakeProxy, fetchWithCookieJar } from './support/fake-proxy.js';

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
  assert.deepEqual(session, { user: 'demo', roles: ['user'], expiresAt: '2030-01-01T00:00:00Z' });
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
    expiresAt: '2030-01-01T00:00:00Z',
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
    return new Response('{}', { status: 200, headers: { 'content-type': 'application/json' } });
  };
  const client = createClient({ fetch: spy });
  await client.fetch('/api/x');
  await client.session();
  await client.login('a', 'b');
  await client.fetch('/api/x', { method: 'POST', credentials: 'include' });
  // GET, session, login, then the POST's token refresh and the POST itself.
  assert.deepEqual(seen, Array(5).fill('same-origin'));
});
