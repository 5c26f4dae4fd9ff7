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
