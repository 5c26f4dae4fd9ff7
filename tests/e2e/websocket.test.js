// WebSockets through the proxy in a real browser (headless Chromium): `countersign dev`'s
// `/api/` route carries WebSockets to the demo API's `GET /api/ws` (behind the real
// VerifyLayer). The browser sends its own Origin and session cookie on the handshake and checks
// the 101's Sec-WebSocket-Accept itself; the proxy signs the handshake with the user's identity,
// so the API's greeting names the user the proxy signed in. After a logout the proxy refuses
// the handshake (401), which the browser reports as `error` then `close`, never `open`.
// Run everything with scripts/e2e.sh; see docs/FRONTEND.md, "WebSockets".

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { screenshot, withBrowser } from './support/browser.js';
import { mainDevServer, startDevServer } from './support/dev-server.js';

const TEST_TIMEOUT = 90_000;
let server;

before(async () => {
  server = await mainDevServer();
});
after(async () => {
  await server?.stop();
});

/**
 * In the page: opens `new WebSocket(<page origin as ws:>/api/ws)`, sends `send` (if any) once
 * open, and resolves with what happened: the events in order, the messages received, and the
 * close code. Resolves once `want` messages arrived (then closes it) or it closed.
 */
function openWebSocketInPage(page, { send = null, want = 0 } = {}) {
  return page.evaluate(
    ({ send, want }) =>
      new Promise((resolve) => {
        const events = [];
        const messages = [];
        const socket = new WebSocket(location.origin.replace(/^http/, 'ws') + '/api/ws');
        const done = (closeCode) => resolve({ events, messages, closeCode, url: socket.url });
        const timer = setTimeout(() => {
          events.push('timeout');
          socket.close();
          done(null);
        }, 15_000);
        socket.onopen = () => events.push('open');
        socket.onerror = () => events.push('error');
        socket.onmessage = (event) => {
          events.push('message');
          messages.push(JSON.parse(event.data));
          if (messages.length === 1 && send !== null) socket.send(send);
          if (messages.length === want) {
            clearTimeout(timer);
            socket.close(1000);
            done(null);
          }
        };
        socket.onclose = (event) => {
          events.push('close');
          clearTimeout(timer);
          done(event.code);
        };
      }),
    { send, want },
  );
}

async function loginThroughSpa(page) {
  await page.goto(`${server.url}/`);
  await page.getByTestId('login-view').waitFor();
  await page.getByLabel('Username').fill('demo');
  await page.getByLabel('Password').fill(server.password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByTestId('home-view').waitFor();
}

test('a WebSocket from the page: greeting with the signed-in user, echo; refused (no open) after logout', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page) => {
    // What the browser itself saw of each WebSocket (DevTools protocol, via playwright).
    const sockets = [];
    page.on('websocket', (ws) => {
      const seen = { url: ws.url(), received: [], errors: [] };
      sockets.push(seen);
      ws.on('framereceived', (frame) => seen.received.push(frame.payload.toString()));
      ws.on('socketerror', (error) => seen.errors.push(String(error)));
    });

    await loginThroughSpa(page);
    const text = `hello from the browser ${Date.now()}`;
    const open = await openWebSocketInPage(page, { send: text, want: 2 });
    assert.deepEqual(open.events, ['open', 'message', 'message'], JSON.stringify(open));
    assert.equal(open.url, `${server.url.replace(/^http/, 'ws')}/api/ws`);
    // The user the demo API verified from the proxy's signature on the handshake.
    assert.deepEqual(open.messages, [{ hello: 'demo' }, { user: 'demo', echo: text }]);
    assert.equal(sockets.length, 1);
    assert.deepEqual(sockets[0].errors, []);
    assert.deepEqual(sockets[0].received.map((p) => JSON.parse(p)), open.messages);

    await page.getByTestId('logout').click();
    await page.getByTestId('login-view').waitFor();
    const refused = await openWebSocketInPage(page, { want: 1 });
    assert.deepEqual(refused.events, ['error', 'close'], JSON.stringify(refused));
    assert.equal(refused.closeCode, 1006);
    assert.deepEqual(refused.messages, []);
    // The browser names the proxy's answer (the page itself only ever sees 1006): Chromium's
    // words for a 401 to a WebSocket handshake (a 403 would be "Unexpected response code").
    assert.equal(sockets.length, 2);
    assert.match(
      sockets[1].errors.join(' '),
      /HTTP Authentication failed; no valid credentials available/,
      JSON.stringify(sockets[1]),
    );
    // And the session is really over.
    const session = await page.evaluate(async () => (await fetch('/auth/session?touch=false')).status);
    assert.equal(session, 401);
  }),
);

test("the built-in dev page's WebSocket button: greeting, echo, and a logout elsewhere closes it", { timeout: TEST_TIMEOUT }, async () => {
  // `countersign dev` without --static-dir: its own demo page (src/proxy/dev.rs).
  const builtin = await startDevServer({ staticDir: null });
  try {
    await withBrowser(async (page) => {
      await page.goto(`${builtin.url}/`);
      await page.locator('#password').fill(builtin.password);
      await page.getByRole('button', { name: 'Log in' }).click();
      await page.locator('#app').waitFor();
      assert.equal(await page.locator('#user').textContent(), 'demo');

      await page.getByRole('button', { name: 'Open WebSocket' }).click();
      await page.locator('#ws').filter({ hasText: /^open$/ }).waitFor();
      await page.locator('#ws-log').filter({ hasText: 'hello demo' }).waitFor();
      const text = `typed ${Date.now()}`;
      await page.locator('#ws-text').fill(text);
      await page.getByRole('button', { name: 'Send' }).click();
      await page.locator('#ws-log').filter({ hasText: `echo for demo: ${text}` }).waitFor();
      await screenshot(page, '11-dev-page-websocket');

      // The session ends behind the page's back (a logout from this very page's script, as
      // another tab would): the proxy's periodic session check closes the open WebSocket, and
      // the page, asking the proxy, goes back to its login form.
      const logout = await page.evaluate(
        async (token) =>
          (await fetch('/auth/logout', { method: 'POST', headers: { 'X-CSRF-Token': token } })).status,
        await page.evaluate(() => csrf), // eslint-disable-line no-undef
      );
      assert.ok(logout >= 200 && logout < 300, `logout answered ${logout}`);
      await page.locator('#login').waitFor({ timeout: 15_000 });
      assert.equal(await page.locator('#ws').textContent(), 'closed (1008)');
    }, { servers: [builtin] });
  } finally {
    await builtin.stop();
  }
});
