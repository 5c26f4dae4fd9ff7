// Findings of an SPA developer's QA pass over the client (round 15), against the in-process
// fake of the proxy contract. Run: cd clients/js && npm test

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, CountersignError } from './countersign.js';
import { startFakeProxy, fetchWithCookieJar } from './support/fake-proxy.js';

let proxy;
let jarFetch;

beforeEach(async () => {
  proxy = await startFakeProxy();
  proxy.state.users.bob = { password: 'bob-password', roles: ['user'] };
  jarFetch = fetchWithCookieJar();
});
afterEach(async () => {
  await proxy.close();
});

// Two clients on one cookie jar: two tabs of one browser.
const newTab = (options = {}) => createClient({ baseUrl: proxy.origin, fetch: jarFetch, ...options });

test('a write made for one user is not retried as another user who logged in in another tab', async () => {
  const events = [];
  const tabA = newTab({ onUnauthenticated: (detail) => events.push(['callback', detail.code]) });
  tabA.addEventListener('unauthenticated', (event) => events.push(['event', event.detail.code]));
  await tabA.login('demo', 'demo-password');
  // Another tab of the same browser signs in as bob: the cookie is now bob's, and so is the
  // CSRF token the proxy would hand out. Tab A still shows demo's data.
  await newTab().login('bob', 'bob-password');

  await assert.rejects(tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'for demo' } }), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'unauthenticated');
    return true;
  });
  // Nothing was written in bob's name, and tab A was told its session (demo's) is over.
  assert.deepEqual(proxy.state.upstream, []);
  assert.deepEqual(events, [
    ['event', 'unauthenticated'],
    ['callback', 'unauthenticated'],
  ]);
  assert.equal(tabA.currentSession, null);
});

test('concurrent writes for a user replaced in another tab all refuse, with one event', async () => {
  let events = 0;
  const tabA = newTab({ onUnauthenticated: () => events++ });
  await tabA.login('demo', 'demo-password');
  await newTab().login('bob', 'bob-password');

  const results = await Promise.allSettled(
    [1, 2, 3].map((n) => tabA.fetchJson('/api/notes', { method: 'POST', body: { text: `n${n}` } })),
  );
  assert.deepEqual(
    results.map((r) => r.status === 'rejected' && r.reason.code),
    ['unauthenticated', 'unauthenticated', 'unauthenticated'],
  );
  assert.deepEqual(proxy.state.upstream, []);
  assert.equal(events, 1);
  // The tab does not silently adopt bob's session either: the app decides (e.g. session()).
  assert.equal(tabA.currentSession, null);
});

test('a new login of the same user in another tab still refreshes the token and retries', async () => {
  let events = 0;
  const tabA = newTab({ onUnauthenticated: () => events++ });
  await tabA.login('demo', 'demo-password');
  await newTab().login('demo', 'demo-password');
  const note = await tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'same user' } });
  assert.equal(note.text, 'same user');
  assert.equal(events, 0);
  assert.equal(tabA.currentSession.user, 'demo');
});

test('the session objects the client hands out cannot change its own state', async () => {
  const client = newTab();
  const session = await client.login('demo', 'demo-password');
  // An app that sorts or extends the roles it was given (or stores the object in a state
  // library that mutates) must not rewrite what the client believes.
  assert.throws(() => session.roles.push('admin'), TypeError);
  assert.throws(() => {
    session.user = 'root';
  }, TypeError);
  assert.deepEqual(client.currentSession, { user: 'demo', roles: ['user'], expiresAt: session.expiresAt });
  const restored = await newTab().session();
  assert.ok(Object.isFrozen(restored) && Object.isFrozen(restored.roles));
});

test('logout in a tab whose user was replaced in another tab does not log the other user out', async () => {
  const tabA = newTab();
  await tabA.login('demo', 'demo-password');
  const tabB = newTab();
  await tabB.login('bob', 'bob-password');
  await tabA.logout();
  assert.equal(tabA.currentSession, null);
  // bob's session (tab B's) is still there.
  assert.deepEqual(await tabB.session(), { user: 'bob', roles: ['user'], expiresAt: tabB.currentSession.expiresAt });
  assert.equal(proxy.state.log.filter((r) => r.path === '/auth/logout' && r.csrfHeader !== null).length, 1);
  assert.equal([...proxy.state.sessions.values()].filter((s) => s.user === 'bob').length, 1);
});

/** A server that answers every GET with an index.html, as a static server's SPA fallback does. */
async function startHtmlFallback() {
  const { createServer } = await import('node:http');
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>app</title>');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

test('a session or login answer that is not the proxy\'s JSON rejects with invalid_json', async () => {
  // E.g. a wrong `baseUrl`: the SPA's own index.html comes back with 200.
  const html = await startHtmlFallback();
  try {
    const client = createClient({ baseUrl: `${html.origin}/wrong-prefix`, fetch: jarFetch });
    for (const call of [() => client.session(), () => client.login('demo', 'demo-password')]) {
      await assert.rejects(call(), (error) => {
        assert.ok(error instanceof CountersignError, `${error}`);
        assert.equal(error.status, 200);
        assert.equal(error.code, 'invalid_json');
        return true;
      });
    }
    assert.equal(client.currentSession, null);
  } finally {
    await html.close();
  }
});

// --- A token read of the client's own never adopts another user's session -----------------

test('after a write refused for a user replaced in another tab, the next write is not sent as the new user', async () => {
  const events = [];
  const tabA = newTab({ onUnauthenticated: (detail) => events.push(detail.code) });
  await tabA.login('demo', 'demo-password');
  await newTab().login('bob', 'bob-password');
  // Tab A's save is refused (its user's session is over in this browser) ...
  await assert.rejects(tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'save' } }), {
    code: 'unauthenticated',
  });
  // ... and an autosave a moment later, before the app has done anything, needs a token: the
  // read finds bob's session, which tab A must not take over.
  const before = proxy.state.log.length;
  await assert.rejects(tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'autosave' } }), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'unauthenticated');
    return true;
  });
  assert.deepEqual(
    proxy.state.log.slice(before).map((r) => `${r.method} ${r.path}`),
    ['GET /auth/session?touch=false'],
    'only the token read went out',
  );
  assert.deepEqual(proxy.state.upstream, [], 'nothing was written in bob\'s name');
  assert.equal(tabA.currentSession, null, 'tab A did not silently become bob');
  assert.deepEqual(events, ['unauthenticated', 'unauthenticated']);

  // The app decides: its own session() call moves tab A to bob, whose writes then work.
  assert.equal((await tabA.session()).user, 'bob');
  const note = await tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'as bob, knowingly' } });
  assert.equal(note.text, 'as bob, knowingly');
});

test('concurrent writes whose token read finds another user are all refused unsent, with one event', async () => {
  let events = 0;
  const tabA = newTab({ onUnauthenticated: () => events++ });
  await tabA.login('demo', 'demo-password');
  await newTab().login('bob', 'bob-password');
  await tabA.fetch('/api/notes', { method: 'POST', body: '{}' }).catch(() => null); // refused: demo's session is over
  events = 0;
  const results = await Promise.allSettled(
    [1, 2, 3].map((n) => tabA.fetchJson('/api/notes', { method: 'POST', body: { text: `n${n}` } })),
  );
  assert.deepEqual(
    results.map((r) => r.status === 'rejected' && r.reason.code),
    ['unauthenticated', 'unauthenticated', 'unauthenticated'],
  );
  assert.equal(proxy.state.log.filter((r) => r.method === 'POST' && r.path === '/api/notes').length, 1);
  assert.deepEqual(proxy.state.upstream, []);
  assert.equal(events, 1);
});

test('after logout, a write does not adopt a user who signed in in another tab', async () => {
  const tabA = newTab();
  await tabA.login('demo', 'demo-password');
  await tabA.logout();
  await newTab().login('bob', 'bob-password');
  // The app shows nobody; the cookie is bob's. The write goes without a token (the route
  // may be public), the proxy refuses it, and it is not retried as bob.
  await assert.rejects(tabA.fetchJson('/api/notes', { method: 'POST', body: { text: 'signed out' } }), {
    code: 'unauthenticated',
  });
  assert.deepEqual(proxy.state.upstream, []);
  assert.equal(tabA.currentSession, null);
  const writes = proxy.state.log.filter((r) => r.method === 'POST' && r.path === '/api/notes');
  assert.deepEqual(writes.map((r) => r.csrfHeader), [null], 'sent once, without bob\'s token');
});

test('on a page load the first token read still adopts the browser\'s session', async () => {
  await newTab().login('demo', 'demo-password');
  // A reloaded tab whose app writes before it ever calls session(): nothing is known yet.
  const reloaded = newTab();
  const note = await reloaded.fetchJson('/api/notes', { method: 'POST', body: { text: 'first' } });
  assert.equal(note.text, 'first');
  assert.equal(reloaded.currentSession.user, 'demo');
});

// --- ambiguous_session_cookie: a logout that ends nothing does not resolve ----------------

test('logout rejects with ambiguous_session_cookie when the proxy cannot tell which session to end', async () => {
  let events = 0;
  const client = newTab({ onUnauthenticated: () => events++ });
  await client.login('demo', 'demo-password');
  proxy.makeAmbiguous(); // e.g. more than 4 distinct session ids in the browser's cookies
  await assert.rejects(client.logout(), (error) => {
    assert.ok(error instanceof CountersignError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'ambiguous_session_cookie');
    return true;
  });
  assert.equal(proxy.state.sessions.size, 1, 'nothing was ended');
  assert.equal(events, 0, 'logout never fires unauthenticated');
  assert.equal(client.currentSession, null, 'no request can use the session any more');
});
