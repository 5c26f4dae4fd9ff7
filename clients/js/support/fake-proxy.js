// A small in-process stand-in for the countersign proxy's HTTP contract (issue 3), good enough
// for the client's unit tests: login/session/logout, the session cookie, CSRF on unsafe
// methods, and the `countersign dev` demo API. The real proxy is exercised by tests/e2e.

import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';

const SAFE = new Set(['GET', 'HEAD', 'OPTIONS']);

function json(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

let nextPortOffset = 0;

/** The `expires_at` the fake reports for every session: 2030-01-01T00:00:00Z in unix seconds. */
export const FAKE_EXPIRES_AT = 1893456000;

/**
 * Listens on 127.0.0.1: on a free port the OS picks, or, with FAKE_PROXY_PORTS=LOW-HIGH in the
 * environment, on a free port of that range, taken in turn (for machines where tests must keep
 * to agreed ports).
 */
async function listen(server) {
  const listenOn = (port) =>
    new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
  const range = process.env.FAKE_PROXY_PORTS;
  if (!range) return listenOn(0);
  const [low, high] = range.split('-').map(Number);
  if (!(low > 0 && high >= low && high < 65536)) throw new Error(`FAKE_PROXY_PORTS=${range}: use LOW-HIGH`);
  // Round robin, not always the lowest free port: a port just closed may still have a pooled
  // keep-alive connection in Node's fetch, which a new server on it would see fail.
  for (let tried = 0; tried <= high - low; tried++) {
    const port = low + (nextPortOffset++ % (high - low + 1));
    try {
      return await listenOn(port);
    } catch (error) {
      if (error.code !== 'EADDRINUSE') throw error;
    }
  }
  throw new Error(`FAKE_PROXY_PORTS=${range}: no free port`);
}

export async function startFakeProxy() {
  const state = {
    users: { demo: { password: 'demo-password', roles: ['user'] } },
    sessions: new Map(), // id -> { user, csrf }
    notes: [],
    nextNoteId: 1,
    throttled: false,
    // The browser's cookies name two live sessions (a sibling subdomain's beside its own):
    // every request that needs one answers 401 ambiguous_session_cookie until a login.
    ambiguous: false,
    // Every request, in order: { method, path, csrfHeader, cookie, body }.
    log: [],
    // What reached the "upstream" (the demo API) after the CSRF and session checks.
    upstream: [],
  };

  const sessionOf = (req) => {
    const match = /(?:^|;\s*)cs_session=([^;]+)/.exec(req.headers.cookie || '');
    return match ? state.sessions.get(match[1]) ?? null : null;
  };
  // The body of the real proxy's login and session answers (src/proxy/auth.rs,
  // session_response): `expires_at` is a number of unix seconds, the earlier of the idle and
  // absolute expiry. A fixed time here keeps the tests' expectations exact.
  const describe = (s) => ({
    user: s.user,
    roles: state.users[s.user].roles,
    expires_at: FAKE_EXPIRES_AT,
    csrf_token: s.csrf,
  });

  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://fake');
    const body = await readBody(req);
    state.log.push({
      method: req.method,
      path: url.pathname + url.search,
      csrfHeader: req.headers['x-csrf-token'] ?? null,
      cookie: req.headers.cookie ?? null,
      contentType: req.headers['content-type'] ?? null,
      body,
    });
    const session = sessionOf(req);

    if (url.pathname === '/auth/login' && req.method === 'POST') {
      if (state.throttled) return json(res, 429, { error: 'too_many_attempts' }, { 'retry-after': '7' });
      if (!(req.headers['content-type'] || '').startsWith('application/json')) {
        return json(res, 415, { error: 'unsupported_media_type' });
      }
      let creds;
      try {
        creds = JSON.parse(body);
      } catch {
        return json(res, 400, { error: 'bad_request' });
      }
      const user = state.users[creds.username];
      if (!user || user.password !== creds.password) return json(res, 401, { error: 'invalid_credentials' });
      // A login ends every session the cookies name (the proxy's rule).
      state.ambiguous = false;
      const id = randomBytes(16).toString('hex');
      const s = { user: creds.username, csrf: randomBytes(16).toString('hex') };
      state.sessions.set(id, s);
      return json(res, 200, describe(s), {
        'set-cookie': `cs_session=${id}; HttpOnly; SameSite=Strict; Path=/`,
      });
    }

    if (state.ambiguous) return json(res, 401, { error: 'ambiguous_session_cookie' });
    if (url.pathname === '/auth/session' && req.method === 'GET') {
      if (!session) return json(res, 401, { error: 'unauthenticated' });
      return json(res, 200, describe(session));
    }

    // Everything else: session first, then CSRF (as the proxy does), then the demo API.
    if (!session) return json(res, 401, { error: 'unauthenticated' });
    if (!SAFE.has(req.method) && req.headers['x-csrf-token'] !== session.csrf) {
      return json(res, 403, { error: 'csrf' });
    }

    if (url.pathname === '/auth/logout' && req.method === 'POST') {
      for (const [id, s] of state.sessions) {
        if (s === session || (url.searchParams.get('all') === 'true' && s.user === session.user)) {
          state.sessions.delete(id);
        }
      }
      res.writeHead(204, { 'set-cookie': 'cs_session=; Max-Age=0; Path=/' });
      return res.end();
    }

    if (url.pathname.startsWith('/api/')) {
      state.upstream.push({ method: req.method, path: url.pathname, body });
      const identity = { user: session.user, roles: state.users[session.user].roles };
      if (url.pathname === '/api/whoami' && req.method === 'GET') return json(res, 200, identity);
      if (url.pathname === '/api/echo' && req.method === 'POST') return json(res, 200, { body, identity });
      if (url.pathname === '/api/forbidden') return json(res, 403, { error: 'forbidden' });
      if (url.pathname === '/api/notes' && req.method === 'GET') return json(res, 200, state.notes);
      if (url.pathname === '/api/notes' && req.method === 'POST') {
        const note = { id: String(state.nextNoteId++), text: JSON.parse(body).text };
        state.notes.push(note);
        return json(res, 201, note);
      }
      const del = /^\/api\/notes\/([^/]+)$/.exec(url.pathname);
      if (del && req.method === 'DELETE') {
        state.notes = state.notes.filter((n) => n.id !== del[1]);
        res.writeHead(204);
        return res.end();
      }
      if (url.pathname === '/api/not-json') {
        res.writeHead(200, { 'content-type': 'text/plain' });
        return res.end('plain words');
      }
    }
    return json(res, 404, { error: 'not_found' });
  });

  await listen(server);
  const { port } = server.address();
  return {
    origin: `http://127.0.0.1:${port}`,
    state,
    /** Rotates every session's CSRF token, as a login in another tab would. */
    rotateCsrf() {
      for (const s of state.sessions.values()) s.csrf = randomBytes(16).toString('hex');
    },
    /** Makes the browser's cookies ambiguous (two live sessions) until the next login. */
    makeAmbiguous() {
      state.ambiguous = true;
    },
    /** Ends every session server-side (idle timeout, admin revoke). */
    expireAll() {
      state.sessions.clear();
    },
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}

/**
 * Node's fetch has no cookie jar; browsers do. This wraps fetch with a small jar so the fake
 * proxy's session cookie round-trips as it would in a browser: a cookie goes back only to the
 * origin that set it (a fake third party on another port never sees it), and not at all with
 * `credentials: 'omit'`.
 */
export function fetchWithCookieJar() {
  const jar = new Map(); // name -> { origin, value }
  const jarFetch = async (input, init = {}) => {
    const origin = new URL(input instanceof Request ? input.url : String(input)).origin;
    const headers = new Headers(init.headers);
    const cookies = [...jar].filter(([, c]) => c.origin === origin).map(([k, c]) => `${k}=${c.value}`);
    if (cookies.length > 0 && init.credentials !== 'omit') headers.set('cookie', cookies.join('; '));
    const response = await fetch(input, { ...init, headers });
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      if (value === '' || /max-age=0/i.test(line)) jar.delete(name);
      else jar.set(name, { origin, value });
    }
    return response;
  };
  jarFetch.jar = jar;
  return jarFetch;
}
