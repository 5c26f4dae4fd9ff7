// Real-browser end-to-end tests: headless Debian Chromium (playwright-core) against
// `countersign dev` serving the React example (examples/react-spa/dist) and its demo API.
// Run everything with scripts/e2e.sh; see docs/FRONTEND.md.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { screenshot, withBrowser } from './support/browser.js';
import { mainDevServer, startDevServer, devSupports } from './support/dev-server.js';
import { startAttacker } from './support/attacker.js';
import { startTwoUsersServer } from './support/two-users-server.js';
import { createServer as createHttpServer } from 'node:http';

const TEST_TIMEOUT = 90_000;
let server;

before(async () => {
  server = await mainDevServer();
});
after(async () => {
  await server?.stop();
});

async function openApp(page, target = server) {
  await page.goto(`${target.url}/`);
  await page.getByTestId('login-view').or(page.getByTestId('home-view')).waitFor();
}

async function loginThroughUi(page, target = server) {
  await openApp(page, target);
  await page.getByTestId('login-view').waitFor();
  await page.getByLabel('Username').fill('demo');
  await page.getByLabel('Password').fill(target.password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByTestId('home-view').waitFor();
}

/** The notes as the signed-in page sees them through the proxy (same origin, GET). */
async function notesSeenBy(page) {
  return page.evaluate(async () => {
    const response = await fetch('/api/notes', { credentials: 'same-origin' });
    if (!response.ok) throw new Error(`GET /api/notes: ${response.status}`);
    const body = await response.json();
    return Array.isArray(body) ? body : body.notes;
  });
}

test('log in through the UI, see the user, create and delete a note, log out', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page) => {
    await openApp(page);
    await page.getByTestId('login-view').waitFor();
    await screenshot(page, '01-login');

    await loginThroughUi(page);
    assert.equal(await page.getByTestId('session-user').textContent(), 'demo');
    // The identity the demo API verified from the proxy's signature, not what the SPA claims.
    await page.getByTestId('whoami').filter({ hasText: 'demo' }).waitFor();
    await screenshot(page, '02-home');

    const text = `e2e note ${Date.now()}`;
    await page.getByLabel('New note').fill(text);
    await page.getByRole('button', { name: 'Add' }).click();
    await page.getByTestId('note').filter({ hasText: text }).waitFor();
    assert.ok((await notesSeenBy(page)).some((n) => n.text === text), 'the API stored the note');
    await screenshot(page, '03-note-created');

    await page.getByRole('button', { name: `Delete ${text}` }).click();
    await page.getByTestId('note').filter({ hasText: text }).waitFor({ state: 'detached' });
    assert.ok(!(await notesSeenBy(page)).some((n) => n.text === text), 'the API deleted the note');

    await page.getByTestId('logout').click();
    await page.getByTestId('login-view').waitFor();
    assert.equal(await page.getByTestId('login-notice').textContent(), 'You are signed out.');
    await screenshot(page, '04-signed-out');

    // The server-side session is gone, not just the view: a reload lands on the login form
    // and the API refuses the cookie-less (or dead-cookie) browser.
    await openApp(page);
    await page.getByTestId('login-view').waitFor();
    const status = await page.evaluate(async () => (await fetch('/api/whoami')).status);
    assert.equal(status, 401);
  }),
);

test('a wrong password shows an error and creates no session', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page, context) => {
    await openApp(page);
    await page.getByLabel('Password').fill('not-the-password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByTestId('login-error').waitFor();
    assert.equal(await page.getByTestId('login-error').textContent(), 'Wrong username or password.');
    await screenshot(page, '05-login-error');
    assert.deepEqual(await context.cookies(server.url), [], 'no cookie after a failed login');
  }),
);

test('document.cookie does not show the session cookie', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page, context) => {
    await loginThroughUi(page);
    const cookies = await context.cookies(server.url);
    assert.ok(cookies.length >= 1, 'the login set a session cookie');
    for (const cookie of cookies) {
      assert.equal(cookie.httpOnly, true, `${cookie.name} is HttpOnly`);
      assert.equal(cookie.sameSite, 'Strict', `${cookie.name} is SameSite=Strict`);
      assert.equal(cookie.path, '/');
    }
    const visible = await page.evaluate(() => document.cookie);
    for (const cookie of cookies) {
      assert.ok(!visible.includes(cookie.name), `document.cookie (${JSON.stringify(visible)}) hides ${cookie.name}`);
      assert.ok(!visible.includes(cookie.value), 'document.cookie hides the session id');
    }
    // Nor does the page keep the CSRF token (or anything else) in web storage.
    const stored = await page.evaluate(() => [localStorage.length, sessionStorage.length]);
    assert.deepEqual(stored, [0, 0]);
  }),
);

test(
  'a page on another origin that POSTs with fetch and with HTML forms is refused; the API receives nothing',
  { timeout: TEST_TIMEOUT },
  () =>
    withBrowser(async (page, context) => {
      await loginThroughUi(page);
      const notesBefore = await notesSeenBy(page);

      const attacker = await startAttacker(server.url);
      try {
        // Every POST the browser sends to the proxy, with the status the proxy answered.
        const posts = [];
        context.on('response', (response) => {
          const request = response.request();
          if (request.method() === 'POST' && response.url().startsWith(server.url)) {
            posts.push({ path: new URL(response.url()).pathname, status: response.status() });
          }
        });

        const evil = await context.newPage();
        await evil.goto(`${attacker.origin}/fetch.html`);
        await evil.waitForFunction(() => document.title === 'done');

        const formPost = evil.waitForResponse((r) => r.url() === `${server.url}/api/notes` && r.request().method() === 'POST');
        await evil.goto(`${attacker.origin}/form.html`);
        const formResponse = await formPost;
        await evil.waitForLoadState();
        assert.equal(formResponse.status(), 403);
        assert.deepEqual(JSON.parse(await evil.locator('body').innerText()), { error: 'csrf' });
        await screenshot(evil, '06-cross-origin-form-refused');

        await evil.goto(`${attacker.origin}/form-urlencoded.html`);
        await evil.waitForURL(`${server.url}/api/notes`);
        await evil.waitForLoadState();

        // The requests did reach the proxy (the test is not passing because the browser
        // never sent them) and each was refused as CSRF.
        await page.waitForTimeout(200);
        assert.deepEqual(
          posts.map((p) => p.path).sort(),
          ['/api/notes', '/api/notes', '/api/notes', '/auth/logout'],
          JSON.stringify(posts),
        );
        for (const post of posts) assert.equal(post.status, 403, `${post.path} refused: ${JSON.stringify(posts)}`);
      } finally {
        await attacker.close();
      }

      // Nothing reached the API: the notes are exactly as before. And the forged logout did
      // not end the session.
      assert.deepEqual(await notesSeenBy(page), notesBefore);
      const whoami = await page.evaluate(async () => (await fetch('/api/whoami')).status);
      assert.equal(whoami, 200);
    }),
);

test('after a reload the app restores its CSRF token from the session and can still write', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page) => {
    await loginThroughUi(page);
    await page.reload();
    await page.getByTestId('home-view').waitFor();
    const text = `after reload ${Date.now()}`;
    await page.getByLabel('New note').fill(text);
    await page.getByRole('button', { name: 'Add' }).click();
    await page.getByTestId('note').filter({ hasText: text }).waitFor();
    await page.getByRole('button', { name: `Delete ${text}` }).click();
    await page.getByTestId('note').filter({ hasText: text }).waitFor({ state: 'detached' });
  }),
);

test('a write after a new login in another tab refreshes the stale CSRF token and succeeds', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (tabA, context) => {
    await loginThroughUi(tabA);
    // A second tab of the same browser (already signed in: the cookie is shared) signs out and
    // in again: new session cookie, new CSRF token; tab A still holds the old token in memory.
    const tabB = await context.newPage();
    await openApp(tabB);
    await tabB.getByTestId('logout').click();
    await loginThroughUi(tabB);
    const csrfRefusals = [];
    tabA.on('response', (response) => {
      if (response.status() === 403) csrfRefusals.push(response.url());
    });
    const text = `after another tab ${Date.now()}`;
    await tabA.getByLabel('New note').fill(text);
    await tabA.getByRole('button', { name: 'Add' }).click();
    await tabA.getByTestId('note').filter({ hasText: text }).waitFor();
    // The real proxy refused the stale token once; the client refreshed it and retried.
    assert.equal(csrfRefusals.length, 1, `403s: ${csrfRefusals.join(', ')}`);
    assert.ok((await notesSeenBy(tabA)).some((n) => n.text === text));
    await tabA.getByRole('button', { name: `Delete ${text}` }).click();
    await tabA.getByTestId('note').filter({ hasText: text }).waitFor({ state: 'detached' });
  }),
);

test('a write from a tab whose user was replaced in another tab is not made as the new user', { timeout: TEST_TIMEOUT }, async () => {
  const twoUsers = await startTwoUsersServer();
  try {
    await withBrowser(async (tabA, context) => {
      const signIn = async (page, user) => {
        await page.getByLabel('Username').fill(user);
        await page.getByLabel('Password').fill(twoUsers.passwords[user]);
        await page.getByRole('button', { name: 'Sign in' }).click();
        await page.getByTestId('home-view').waitFor();
      };
      await openApp(tabA, twoUsers);
      await signIn(tabA, 'demo');
      // Another tab of the same browser signs out and in as bob: the shared cookie is bob's now.
      const tabB = await context.newPage();
      await openApp(tabB, twoUsers);
      await tabB.getByTestId('logout').click();
      await tabB.getByTestId('login-view').waitFor();
      await signIn(tabB, 'bob');

      // Tab A still shows demo and writes a note for demo.
      assert.equal(await tabA.getByTestId('session-user').textContent(), 'demo');
      const text = `meant for demo ${Date.now()}`;
      await tabA.getByLabel('New note').fill(text);
      await tabA.getByRole('button', { name: 'Add' }).click();
      // It goes back to the login view instead of writing in bob's name.
      await tabA.getByTestId('login-view').waitFor();
      assert.equal(await tabA.getByTestId('login-notice').textContent(), 'Your session has ended. Please sign in again.');
      const notes = await notesSeenBy(tabB);
      assert.ok(!notes.some((n) => n.text === text), `the note was written as bob: ${JSON.stringify(notes)}`);
      await screenshot(tabA, '10-user-replaced-in-another-tab');
    }, { servers: [twoUsers] });
  } finally {
    await twoUsers.stop();
  }
});

/** An API that streams `data: tick N` server-sent events; records each request's headers. */
async function startEventsApi() {
  const requests = [];
  const server = createHttpServer((req, res) => {
    requests.push(req.headers);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let n = 0;
    const timer = setInterval(() => res.write(`data: tick ${++n}\n\n`), 100);
    req.on('close', () => clearInterval(timer));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}

test('EventSource through the proxy: signed events while signed in, CLOSED (no reconnect) after logout', { timeout: TEST_TIMEOUT }, async () => {
  // docs/FRONTEND.md, "Server-sent events": the recipe that tells a refused reconnect
  // (readyState CLOSED) from a dropped stream relies on exactly this browser behaviour.
  const api = await startEventsApi();
  const proxy = await startTwoUsersServer({ upstreams: [{ name: 'events', prefix: '/events/', url: api.url }] });
  try {
    await withBrowser(async (page) => {
      await openApp(page, proxy);
      await page.getByLabel('Password').fill(proxy.passwords.demo);
      await page.getByRole('button', { name: 'Sign in' }).click();
      await page.getByTestId('home-view').waitFor();
      const ticks = await page.evaluate(
        () =>
          new Promise((resolve, reject) => {
            const got = [];
            const events = new EventSource('/events/stream');
            events.onmessage = (event) => {
              got.push(event.data);
              if (got.length === 2) {
                events.close();
                resolve(got);
              }
            };
            setTimeout(() => reject(new Error(`only ${JSON.stringify(got)}`)), 10_000);
          }),
      );
      assert.deepEqual(ticks, ['tick 1', 'tick 2']);
      assert.ok(api.requests[0]['signature-input'], 'the API got a signed request');

      await page.getByTestId('logout').click();
      await page.getByTestId('login-view').waitFor();
      const afterLogout = await page.evaluate(
        () =>
          new Promise((resolve) => {
            const events = new EventSource('/events/stream');
            events.onerror = async () => {
              const state = events.readyState;
              events.close();
              const session = await fetch('/auth/session?touch=false');
              resolve({ closed: state === EventSource.CLOSED, session: session.status });
            };
          }),
      );
      assert.deepEqual(afterLogout, { closed: true, session: 401 });
      assert.equal(api.requests.length, 1, 'the refused stream never reached the API');
    }, { servers: [proxy] });
  } finally {
    await proxy.stop();
    await api.close();
  }
});

test('a startup session check that cannot reach the proxy says so on the login view', { timeout: TEST_TIMEOUT }, () =>
  withBrowser(async (page) => {
    // The browser's network fails for that one request (as offline would); the page itself
    // and everything else come from the real proxy.
    await page.route('**/auth/session*', (route) => route.abort('internetdisconnected'));
    await openApp(page);
    await page.getByTestId('login-view').waitFor();
    const notice = page.getByTestId('login-notice');
    await notice.waitFor();
    assert.equal(await notice.textContent(), 'Cannot check your session: The server cannot be reached.');
    await screenshot(page, '09-session-check-failed');
  }),
);

/**
 * Logs in and waits until the home view's own first calls (whoami and the notes list, made on
 * mount) have been answered. A test that ends the session must wait for them: ended while
 * one is still in flight, that call meets the dead session itself and sends the UI back to
 * login before the test clicks anything.
 */
async function loginAndAwaitFirstLoads(page, target = server) {
  const isFirstLoad = (path) => (response) =>
    new URL(response.url()).pathname === path && response.request().method() === 'GET';
  const firstLoads = Promise.all([
    page.waitForResponse(isFirstLoad('/api/whoami')),
    page.waitForResponse(isFirstLoad('/api/notes')),
  ]);
  await loginThroughUi(page, target);
  const responses = await firstLoads;
  for (const response of responses) assert.equal(response.status(), 200, response.url());
}

/** The UI goes back to the login view with a notice once the server has ended the session. */
async function assertSentBackToLogin(page, screenshotName) {
  await page.getByTestId('whoami-refresh').click();
  await page.getByTestId('login-view').waitFor();
  assert.equal(
    await page.getByTestId('login-notice').textContent(),
    'Your session has ended. Please sign in again.',
  );
  await screenshot(page, screenshotName);
}

test('an idle-expired session sends the UI back to login', { timeout: TEST_TIMEOUT }, async () => {
  // Never skipped: `dev` has the option, and a binary without it fails here.
  assert.ok(devSupports('--idle-timeout'), 'countersign dev has no --idle-timeout option');
  const shortLived = await startDevServer({ extraArgs: ['--idle-timeout', '2s'] });
  try {
    await withBrowser(async (page) => {
      await loginAndAwaitFirstLoads(page, shortLived);
      await page.waitForTimeout(3_500);
      await assertSentBackToLogin(page, '07-session-expired');
    }, { servers: [shortLived] });
  } finally {
    await shortLived.stop();
  }
});

test('a session revoked by the admin endpoint sends the UI back to login', { timeout: TEST_TIMEOUT }, async () => {
  assert.ok(server.adminUrl, 'COUNTERSIGN_ADMIN_URL is set (scripts/e2e.sh sets it)');
  await withBrowser(async (page) => {
    await loginAndAwaitFirstLoads(page);
    const revoke = await fetch(`${server.adminUrl}/admin/users/demo/revoke`, { method: 'POST' });
    assert.ok(revoke.ok, `POST /admin/users/demo/revoke answered ${revoke.status}`);
    await assertSentBackToLogin(page, '08-session-revoked');
  });
});
