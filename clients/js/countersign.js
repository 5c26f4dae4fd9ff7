// countersign browser client: talks to the countersign backend-for-frontend proxy.
//
// The proxy keeps the session server-side behind an HttpOnly cookie, so this module never
// sees or stores a credential the browser could leak: it only holds the CSRF token in memory
// (not localStorage / sessionStorage, which any injected script could read and which would
// outlive the session). Zero dependencies; works in browsers and in Node >= 20. Node's fetch has
// no cookie jar, so there the session cookie only survives with a cookie-aware `fetch` option
// (see README.md, "Node").

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);
const CSRF_HEADER = 'X-CSRF-Token';
// The proxy's 401 codes after which the app must log in again (docs/FRONTEND.md).
const SESSION_END_CODES = new Set(['unauthenticated', 'ambiguous_session_cookie']);

/**
 * Error for every failed call. `status` is the HTTP status (0 when no response arrived),
 * `code` the proxy's stable error code from `{"error":"<code>"}` (or `http_<status>` when
 * the body carried none, `network_error` when the request never completed).
 */
export class CountersignError extends Error {
  constructor(status, code, options = {}) {
    super(`${code} (HTTP ${status})`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CountersignError';
    this.status = status;
    this.code = code;
    // Seconds, from Retry-After on 429 too_many_attempts; null otherwise.
    this.retryAfter = options.retryAfter ?? null;
  }
}

// The most of an error body read for its code. The proxy's own are `{"error":"<code>"}`, under
// 40 bytes; the 401s and 403s the client reads may also be an upstream API's, of any size, or a
// stream that never ends, which an unbounded read would wait for (and buffer) forever.
const ERROR_BODY_LIMIT = 4096;
// The longest the client waits for an error body to end when reading its code. The proxy's
// own come whole with their head; an upstream's 401 or 403 that sends part of a body and then
// stalls would otherwise hold `client.fetch` until the proxy's `body_idle_timeout` (60 s).
const ERROR_BODY_WAIT_MS = 1000;

/**
 * The text of `response`'s body if it is at most `limit` bytes, else null; read from a clone, so
 * the caller's body is untouched. A declared Content-Length over the limit is not read at all;
 * without one (a chunked or recompressed answer from a proxy in front) at most `limit` bytes
 * are, and the rest of the clone is cancelled.
 */
async function boundedText(response, limit, signal) {
  const declared = Number(response.headers.get('content-length') ?? Number.NaN);
  if (declared > limit) return null;
  const { body } = response.clone();
  if (body === null) return '';
  const reader = body.getReader();
  const chunks = [];
  let size = 0;
  // A body that has not ended within ERROR_BODY_WAIT_MS counts as one without a code; the
  // caller's abort ends the wait with the signal's reason.
  const gaveUp = Symbol('gave up');
  let timer;
  let onAbort;
  const stop = new Promise((resolve, reject) => {
    timer = setTimeout(() => resolve(gaveUp), ERROR_BODY_WAIT_MS);
    if (signal) {
      onAbort = () => reject(signal.reason);
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
  });
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), stop]);
      if (next === gaveUp) return null;
      const { done, value } = next;
      if (done) break;
      size += value.byteLength;
      if (size > limit) return null;
      chunks.push(value);
    }
  } finally {
    clearTimeout(timer);
    if (onAbort) signal.removeEventListener('abort', onAbort);
    // Stops the clone's branch (a no-op once it ended); the caller's branch reads on.
    reader.cancel().catch(() => {});
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return new TextDecoder().decode(bytes);
}

/**
 * Reads the stable `{"error":"…"}` code from a response without consuming the caller's body:
 * `http_<status>` when there is none, the body is not JSON, or it is over ERROR_BODY_LIMIT.
 */
async function errorCodeOf(response, signal) {
  const type = response.headers.get('content-type') || '';
  if (type.includes('json')) {
    try {
      const text = await boundedText(response, ERROR_BODY_LIMIT, signal);
      const body = text === null ? null : JSON.parse(text);
      if (body && typeof body.error === 'string') return body.error;
    } catch (error) {
      // The caller aborted while the body was read: the request rejects, as fetch's would.
      if (signal?.aborted) throw signal.reason;
      // A malformed (or broken-off) error body is reported by status alone.
    }
  }
  return `http_${response.status}`;
}

function retryAfterOf(response) {
  const value = response.headers.get('retry-after');
  if (value === null) return null;
  const seconds = Number.parseInt(value, 10);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds : null;
}

async function errorFrom(response) {
  return new CountersignError(response.status, await errorCodeOf(response), {
    retryAfter: retryAfterOf(response),
  });
}

/** The session fields an app may show; the CSRF token stays inside the client. */
function publicSession(body) {
  // Frozen (roles too): the same object is `currentSession`, so an app that sorted or extended
  // what it was given would otherwise rewrite the client's own state.
  return Object.freeze({
    user: body.user,
    roles: Object.freeze([...body.roles]),
    expiresAt: body.expires_at ?? null,
  });
}

/**
 * Whether `body` is the proxy's session JSON (docs/FRONTEND.md, "Session answers"):
 * `{"user": "<string>", "roles": ["<string>", ...], "expires_at": <unix seconds>,
 * "csrf_token": "<non-empty string>"}`. `expires_at` may be absent or null (`expiresAt: null`);
 * other fields are ignored.
 */
function isSessionBody(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return false;
  const expires = body.expires_at;
  return (
    typeof body.user === 'string' &&
    Array.isArray(body.roles) &&
    body.roles.every((role) => typeof role === 'string') &&
    typeof body.csrf_token === 'string' &&
    body.csrf_token !== '' &&
    (expires === undefined || expires === null || (Number.isSafeInteger(expires) && expires >= 0))
  );
}

/**
 * The body of a 200 login or session answer. Anything that is not the proxy's session JSON
 * there (typically the SPA's index.html, which a static server's fallback answers for a
 * `baseUrl` that misses the proxy's `/auth/` routes, or another API's own JSON such as
 * `{"ok":true}`) rejects with CountersignError `invalid_json`, as `fetchJson` does for a body
 * that is not JSON, rather than with the parser's SyntaxError or a session of no one.
 */
async function sessionBodyOf(response) {
  let body;
  try {
    body = JSON.parse(await response.text());
  } catch (cause) {
    throw new CountersignError(response.status, 'invalid_json', { cause });
  }
  if (!isSessionBody(body)) throw new CountersignError(response.status, 'invalid_json');
  return body;
}

/**
 * `promise`, or the caller's `signal` aborting first: then its reason (AbortError,
 * TimeoutError), as fetch rejects. The promise itself goes on (it may be shared with other
 * callers) and its outcome is then ignored here.
 */
function untilAborted(promise, signal) {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

function makeEvent(type, detail) {
  if (typeof CustomEvent === 'function') return new CustomEvent(type, { detail });
  const event = new Event(type);
  event.detail = detail;
  return event;
}

/** The origin of `url` resolved against `base`; null if it does not parse or is opaque. */
function originOf(url, base) {
  try {
    const { origin } = new URL(url, base);
    return origin === 'null' ? null : origin;
  } catch {
    return null;
  }
}

/**
 * The page's URL and the base URL fetch resolves relative URLs against (`document.baseURI`,
 * which a `<base href>` changes), or null outside a page (Node, tests).
 */
function pageUrls() {
  const href = globalThis.location?.href;
  if (typeof href !== 'string' || href === '') return null;
  const base = globalThis.document?.baseURI;
  return { page: href, base: typeof base === 'string' && base !== '' ? base : href };
}

/**
 * True for a reference that keeps the origin of whatever it is resolved against ('/api/x',
 * 'api/x', '?q'), false for one that names an origin of its own ('https://host/', '//host/',
 * '/\host/' and the other spellings the URL parser reads as a host). Decided by resolving it
 * against two different origins rather than by pattern, so it agrees with fetch.
 */
function isPathReference(url) {
  return (
    originOf(url, 'http://a.invalid/') === 'http://a.invalid' &&
    originOf(url, 'https://b.invalid/') === 'https://b.invalid'
  );
}

/**
 * A body can be sent a second time (for the CSRF retry) unless it is a one-shot stream: a
 * ReadableStream, or any async iterable (Node's fetch streams those: an async generator, a Node
 * Readable), which a second attempt would find exhausted and send empty. Request objects are
 * cloned before the first attempt instead.
 */
function isReplayableBody(body) {
  if (body === null || typeof body !== 'object') return true;
  if (typeof ReadableStream === 'function' && body instanceof ReadableStream) return false;
  return typeof body[Symbol.asyncIterator] !== 'function';
}

/**
 * Whether `value` is an object fetch sends as a body of its own (a BodyInit): Blob (and File),
 * ArrayBuffer or a view of one, FormData, URLSearchParams, ReadableStream, or an async iterable
 * (Node). Strings are BodyInit too but are not objects; fetch turns any other object into a
 * string with String(), which for a class instance is "[object Object]".
 */
function isBodyInitObject(value) {
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) return true;
  const types = [globalThis.Blob, globalThis.FormData, globalThis.URLSearchParams, globalThis.ReadableStream];
  if (types.some((type) => typeof type === 'function' && value instanceof type)) return true;
  return typeof value[Symbol.asyncIterator] === 'function';
}

/** The URL of a fetch input: a Request's `url`, anything else as fetch would stringify it. */
function urlOf(input) {
  return isRequest(input) ? input.url : String(input);
}

/**
 * Reports an exception from the app's own callback the way the platform reports one from an
 * event listener (window `error` event / console), without letting it change what the client's
 * caller sees.
 */
function reportCallbackError(error) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
  else console.error('countersign: the onUnauthenticated callback threw', error);
}

export class CountersignClient extends EventTarget {
  #baseUrl;
  #fetch;
  #buildsRequests;
  #onUnauthenticated;
  #credentials;
  #csrfToken = null;
  #refreshing = null;
  #session = null;
  // Which session the state above (token, session) describes. Incremented whenever that state
  // is replaced or ended by something that may be newer than a request in flight: a login, a
  // logout, a session() read that finds another session than the one held, or a 401 reported
  // as the end of the session. An answer to a request sent under an older generation is about
  // a session the client no longer holds: it never changes the state or fires
  // `unauthenticated` (so a slow 401 cannot log out a newer login, a slow session read cannot
  // undo a logout, and N concurrent 401s fire one event).
  #generation = 0;
  // The user the app was last told about: by login(), by a session() call of its own (null when
  // that found none) or by logout() (null); undefined until the first of those, or until a
  // token read of the client's finds a session. The client's own token reads (#refreshToken)
  // adopt what they find only while it is undefined (a page load: the first read adopts the
  // session) or when it is this user's session: the browser's cookie is shared by its tabs, and
  // a session of another user (signed in from another tab) is never taken over silently. Only
  // the app's own login() or session() moves the client to another user.
  #appUser = undefined;

  constructor(options = {}) {
    super();
    this.#baseUrl = (options.baseUrl ?? '').replace(/\/+$/, '');
    const fetchImpl = options.fetch ?? globalThis.fetch;
    if (typeof fetchImpl !== 'function') {
      throw new TypeError('countersign: no fetch implementation available');
    }
    // Bound so that `window.fetch` is not called with the client as `this` (Illegal invocation).
    this.#fetch = (input, init) => fetchImpl.call(globalThis, input, init);
    // With the platform's fetch (no `fetch` option, or the global one passed as it), #send
    // builds the Request itself; any other fetch gets input and init as they are (see #send).
    this.#buildsRequests = fetchImpl === globalThis.fetch;
    this.#onUnauthenticated = options.onUnauthenticated ?? null;
    this.#credentials = options.credentials ?? 'same-origin';
  }

  /** The last session the proxy reported (`{user, roles, expiresAt}`), or null. */
  get currentSession() {
    return this.#session;
  }

  /** Resolves a path against `baseUrl`; absolute URLs pass through. */
  url(path) {
    if (typeof path !== 'string') return path;
    if (/^[a-z][a-z0-9+.-]*:/i.test(path) || path.startsWith('//')) return path;
    return this.#baseUrl + (path.startsWith('/') ? path : `/${path}`);
  }

  /**
   * Whether `target` (a URL as fetch will receive it) goes to the proxy. The proxy's origin is
   * that of `baseUrl` resolved against the page: the page's own origin when `baseUrl` is '' or
   * a path. Only requests to it get the CSRF token, the client's `credentials` and the session
   * handling; scheme, host and port must all match, as for any origin. Both sides are parsed
   * with the URL parser fetch uses, so '//host/x', '/\host/x', 'https://proxy.example.evil.com'
   * or 'https://proxy.example@evil.example' are read as the host they really name.
   */
  #isProxyUrl(target) {
    const page = pageUrls();
    if (page === null) {
      // No page (Node, tests): a relative reference is the proxy's by construction; an
      // absolute one only when `baseUrl` is absolute and names the same origin.
      if (isPathReference(target)) return true;
      const proxy = originOf(this.#baseUrl);
      return proxy !== null && originOf(target, this.#baseUrl) === proxy;
    }
    const proxy = this.#proxyOrigin(page);
    return proxy !== null && originOf(target, page.base) === proxy;
  }

  /** The proxy's origin in a page (see #isProxyUrl): `baseUrl` resolved against the page. */
  #proxyOrigin(page) {
    return originOf(this.#baseUrl || '/', page.page);
  }

  /**
   * The URL of the client's own endpoint `path` ('/auth/login', '/auth/session',
   * '/auth/logout'). In a page it is absolute, on the proxy's origin: fetch resolves a relative
   * URL against `document.baseURI`, and a `<base href>` on another origin (which HTML injection
   * can insert, no script needed) would otherwise receive the password, the logout's CSRF token,
   * and the say on which session the client holds. It is resolved the way fetch would resolve
   * it when that reaches the proxy (so a `<base>` on the proxy's own origin still places a
   * path-relative `baseUrl`), against the page itself otherwise. Outside a page (Node) it is
   * `url(path)`: a relative one there is resolved, if at all, by the `fetch` option.
   */
  #endpoint(path) {
    const target = this.url(path);
    const page = pageUrls();
    if (page === null) return target;
    const proxy = this.#proxyOrigin(page);
    if (proxy === null) return target;
    for (const base of [page.base, page.page]) {
      try {
        const resolved = new URL(target, base);
        if (resolved.origin === proxy) return resolved.href;
      } catch {
        // Does not parse against this base: try the next.
      }
    }
    return target;
  }

  /**
   * Calls fetch. Only a request that was sent and did not complete (offline, DNS, connection
   * refused or reset) becomes CountersignError `network_error`; two other failures reach the
   * caller exactly as fetch reports them, because they are not the network's:
   * - a request that cannot be built (a GET with a body, a relative URL in Node where there is
   *   no page to resolve it against, a stream body without `duplex`): the TypeError the
   *   Request constructor throws. With the platform's fetch the client builds that Request
   *   itself, outside the network error mapping, and sends it: fetch(input, init) starts with
   *   the very same `new Request(input, init)`, so what goes out is unchanged. A `fetch` option
   *   gets the caller's input and init untouched instead (it may accept inputs the constructor
   *   refuses, such as a relative URL in a Node test double), so its errors all count as
   *   `network_error`;
   * - an aborted request (AbortController, AbortSignal.timeout): the signal's reason, an
   *   AbortError or TimeoutError, so that `error.name` checks written for fetch still work.
   */
  async #send(input, init) {
    const request = this.#buildsRequests ? new Request(input, init) : null;
    const signal = request ? request.signal : (init?.signal ?? (isRequest(input) ? input.signal : null));
    try {
      return await (request ? this.#fetch(request) : this.#fetch(input, init));
    } catch (cause) {
      if (signal?.aborted) throw cause;
      throw new CountersignError(0, 'network_error', { cause });
    }
  }

  #remember(body) {
    this.#csrfToken = body.csrf_token;
    this.#session = publicSession(body);
    return this.#session;
  }

  /** Drops the session state without starting a new generation. */
  #forget() {
    this.#csrfToken = null;
    this.#session = null;
  }

  /** Drops the session state and starts a new generation (see #generation). */
  #reset() {
    this.#generation++;
    this.#forget();
  }

  /**
   * The proxy answered 401 `unauthenticated` to a request sent under `generation`. If the
   * client still holds that generation, the session has ended: forget it and, when `report`,
   * tell the app (event, then callback). Otherwise a login, a logout or another request's 401
   * came first and this answer is about a session already replaced or reported: nothing to do.
   */
  #sessionEnded(generation, url, { report }) {
    if (generation !== this.#generation) return;
    this.#reset();
    if (!report) return;
    const detail = { status: 401, code: 'unauthenticated', url };
    this.dispatchEvent(makeEvent('unauthenticated', detail));
    if (this.#onUnauthenticated) {
      try {
        this.#onUnauthenticated(detail);
      } catch (error) {
        // The caller must still get CountersignError 401 (components swallow exactly that).
        reportCallbackError(error);
      }
    }
  }

  /**
   * POST /auth/login. Resolves with `{user, roles, expiresAt}`; rejects with
   * CountersignError `invalid_credentials` (401), `too_many_attempts` (429, see retryAfter), ...
   */
  async login(username, password) {
    const response = await this.#send(this.#endpoint('/auth/login'), {
      method: 'POST',
      credentials: this.#credentials,
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ username, password }),
    });
    if (!response.ok) throw await errorFrom(response);
    const body = await sessionBodyOf(response);
    // A new session: answers still in flight for the previous one no longer apply to it.
    this.#generation++;
    this.#appUser = body.user;
    return this.#remember(body);
  }

  /**
   * GET /auth/session: the current session, or null when there is none (a 401: also
   * `ambiguous_session_cookie`, which only a login, or clearing the site's cookies, ends).
   * Also refreshes the in-memory CSRF token, which is how an app recovers it after a page
   * reload. `touch: false` reads the session without extending its idle timeout. The app's own
   * read: the session it finds, whoever's, is the one the client holds from then on.
   *
   * If a login or logout completes while the read is in flight, the answer describes the
   * session before it: the state stays as that login or logout left it, and the read resolves
   * with that state (`currentSession`).
   */
  async session({ touch = true } = {}) {
    const generation = this.#generation;
    const { body } = await this.#readSession(touch);
    if (generation !== this.#generation) return this.#session;
    // Another session than the one the client holds (each session has its own token): another
    // user's, one after none (a logout, a read that found none, a page load), or the same
    // user's new login in another tab. Answers still in flight were for the state before it,
    // so it starts a new generation, as login() does: a late 401 or 403 must not end it.
    if (body !== null && body.csrf_token !== this.#csrfToken) this.#generation++;
    this.#appUser = body === null ? null : body.user;
    if (body === null) {
      // No session: clear the state without starting a new generation. This read only
      // observes the end of the current session, whose requests' own 401s must still be
      // reported as that end.
      this.#forget();
      return null;
    }
    return this.#remember(body);
  }

  /**
   * Reads GET /auth/session without changing any state: `{body}` with the session JSON, or
   * `{body: null, code}` for a 401 (`unauthenticated`, `ambiguous_session_cookie`). Rejects
   * with CountersignError for other answers (503, `invalid_json`) and network failures.
   */
  async #readSession(touch) {
    const response = await this.#send(this.#endpoint(touch ? '/auth/session' : '/auth/session?touch=false'), {
      method: 'GET',
      credentials: this.#credentials,
      headers: { Accept: 'application/json' },
    });
    if (response.status === 401) return { body: null, code: await errorCodeOf(response) };
    if (!response.ok) throw await errorFrom(response);
    return { body: await sessionBodyOf(response), code: null };
  }

  /**
   * POST /auth/logout (`all: true` ends every session of the user). Resolves once the server
   * has no session for this browser, including when it had already expired. Rejects with
   * CountersignError 401 `ambiguous_session_cookie` when the proxy could not tell which session
   * to end (more than `session.max_session_cookies` session cookies, or several live ones and
   * none whose token the client holds): nothing was ended, and only clearing the site's
   * cookies (or a login, which ends them all, below that cap) gets the browser out of it; the
   * client forgets the session, which no request can use any more. On any other failure
   * (network, 5xx) it rejects and keeps the session state, so the user can retry: the server
   * may still hold the session.
   */
  async logout({ all = false } = {}) {
    const path = all ? '/auth/logout?all=true' : '/auth/logout';
    try {
      const url = this.#endpoint(path);
      const response = await this.#csrfProtected(
        () => url,
        { method: 'POST', headers: { Accept: 'application/json' } },
        { reportUnauthenticated: false, keepAmbiguous: true },
      );
      if (!response.ok) throw await errorFrom(response);
    } catch (error) {
      // No session on the server is exactly the state logout asks for.
      if (!(error instanceof CountersignError && error.code === 'unauthenticated')) throw error;
    }
    this.#reset();
    this.#appUser = null;
  }

  /**
   * The client's own token read (GET /auth/session?touch=false), shared by concurrent callers:
   * many requests failing at once cost one GET. It adopts the session it finds only as
   * #appUser allows; resolves with `{generation, session, foreign, code}`:
   * - `session`: the state after the read (`currentSession`): the session adopted, or null;
   *   or, when a login or logout completed meanwhile, the state that left;
   * - `foreign`: the read found a session of another user than the app's, and did not adopt
   *   it (the state is cleared, as for no session); after a logout (#appUser null) a session
   *   found is not adopted either, but is not `foreign`: the request goes without a token;
   * - `code`: the 401's code when it found no session;
   * - `generation`: the generation it was made under.
   * Rejects as #readSession does, changing nothing. Callers wait with their own signal
   * (`untilAborted`), which never aborts the read the others share.
   */
  #refreshToken() {
    if (!this.#refreshing) {
      const generation = this.#generation;
      this.#refreshing = this.#readSession(false)
        .then(({ body, code }) => {
          const outcome = { generation, session: null, foreign: false, code };
          if (generation !== this.#generation) return { ...outcome, session: this.#session, code: null };
          if (body !== null && (this.#appUser === undefined || this.#appUser === body.user)) {
            this.#appUser = body.user;
            return { ...outcome, session: this.#remember(body) };
          }
          this.#forget();
          return { ...outcome, foreign: body !== null && typeof this.#appUser === 'string' };
        })
        .finally(() => {
          this.#refreshing = null;
        });
    }
    return this.#refreshing;
  }

  /**
   * A token read (#refreshToken) within the caller's `signal`: its outcome, or null when the
   * read failed (503 while the session store is down, a network error); an abort rejects.
   */
  async #tokenReadOrNull(signal) {
    try {
      return await untilAborted(this.#refreshToken(), signal);
    } catch (error) {
      if (signal?.aborted) throw error;
      return null;
    }
  }

  /**
   * Sends a request with the CSRF header on unsafe methods. On 403 `csrf`, fetches a fresh
   * token and retries exactly once. On 401 `unauthenticated` or `ambiguous_session_cookie` (or
   * a refresh that finds no session; for HEAD, whose 401 has no body, a session read that
   * finds none) rejects with CountersignError 401 `unauthenticated` (`keepAmbiguous`: the
   * ambiguous case keeps its own code), first ending the session (see #sessionEnded) and, when
   * `reportUnauthenticated`, signalling the app. A write whose token read finds another user's
   * session (see #appUser) is refused the same way without being sent. The caller's signal
   * (`init.signal`, or the Request's) is honoured while waiting for a token read too.
   * `makeInput` builds a fresh input per attempt (a Request body can be read only once).
   */
  async #csrfProtected(makeInput, init, { reportUnauthenticated, keepAmbiguous = false }) {
    const firstInput = makeInput();
    const method = (init.method ?? (isRequest(firstInput) ? firstInput.method : 'GET')).toUpperCase();
    const unsafe = !SAFE_METHODS.has(method);
    const signal = init.signal ?? (isRequest(firstInput) ? firstInput.signal : null);
    // An already aborted request is not started, not even its token read.
    signal?.throwIfAborted();
    const refusal = (code) =>
      new CountersignError(401, keepAmbiguous && code === 'ambiguous_session_cookie' ? code : 'unauthenticated');

    if (unsafe && this.#csrfToken === null) {
      // After a page reload the token is gone from memory; one read of the session gets it
      // back without first spending a request that is bound to be refused. If the read finds
      // no session, or fails (503 while the session store is down, a network error), the
      // request still goes out, without a token: the route may be public and need neither,
      // and where it needs them the proxy's answer to the request itself is what the caller
      // should see.
      const outcome = await this.#tokenReadOrNull(signal);
      // The cookie now names another user (signed in from another tab) than the one the app
      // shows: this write was made for the app's user, and is not sent in the other's name.
      if (outcome?.foreign) {
        this.#sessionEnded(outcome.generation, urlOf(firstInput), { report: reportUnauthenticated });
        throw refusal('unauthenticated');
      }
    }
    // The generation this request is sent under (taken after the token read, which is done
    // on its behalf), and the user it is made for: the one the app shows (a token read never
    // adopts another user's session, see #appUser).
    const generation = this.#generation;
    const sentUser = this.#session?.user ?? null;
    const ended = (response, code) => {
      this.#sessionEnded(generation, response.url || urlOf(firstInput), { report: reportUnauthenticated });
      return refusal(code);
    };

    let sentToken = null;
    const attempt = (input) => {
      const headers = new Headers(isRequest(input) ? input.headers : undefined);
      new Headers(init.headers).forEach((value, name) => headers.set(name, value));
      sentToken = unsafe ? this.#csrfToken : null;
      if (sentToken === null) return this.#send(input, { ...init, credentials: this.#credentials, headers });
      headers.set(CSRF_HEADER, sentToken);
      const redirect = tokenRedirect(input, init);
      return this.#send(input, { ...init, credentials: this.#credentials, headers, redirect });
    };

    let response = await attempt(firstInput);
    if (
      response.status === 403 &&
      unsafe &&
      isReplayableBody(init.body) &&
      (await errorCodeOf(response, signal)) === 'csrf'
    ) {
      // A session this request was made for that has since been reported ended (another
      // request's 401, a logout) is not brought back by a refresh: the app was told already.
      if (sentUser !== null && generation !== this.#generation && this.#session === null) {
        throw new CountersignError(401, 'unauthenticated');
      }
      // If another request already fetched a newer token while this one was in flight, use
      // it instead of reading the session again.
      if (this.#csrfToken === null || this.#csrfToken === sentToken) {
        const outcome = await this.#tokenReadOrNull(signal);
        // The token read failed: the request's own answer is what the caller gets, as for any
        // other status.
        if (outcome === null) return response;
        // No session, or another user's (not adopted): the session the write was made for is over.
        if (outcome.session === null) throw ended(response, outcome.code);
      }
      // The session the client holds now is another user's (the app's own session() or
      // login() moved it there meanwhile): the write was made for the user the app showed,
      // whose session is over. Retrying it would make it in the other user's name.
      if (sentUser !== null && this.#session?.user !== sentUser) throw ended(response);
      response = await attempt(makeInput());
    }

    if (response.status === 401 && method === 'HEAD') {
      // Answers to HEAD have no body, so this 401 cannot say `unauthenticated` (nor tell the
      // proxy's from an upstream API's own). Ask the session endpoint: no session means the
      // request met the end of the session, as a GET would have been told. If that read fails,
      // or a login or logout has replaced the session since, the 401 is returned as it is.
      if (generation !== this.#generation) return response;
      const outcome = await this.#tokenReadOrNull(signal);
      if (outcome === null) return response;
      if (outcome.session === null) throw ended(response, outcome.code);
      return response;
    }
    // `ambiguous_session_cookie`: the browser's cookies name two live sessions (one a sibling
    // subdomain's), or more than the proxy looks at; no request works until a login (below
    // that cap) or clearing the site's cookies. For the app that is the end of its session, as
    // `unauthenticated` is.
    if (response.status === 401) {
      const code = await errorCodeOf(response, signal);
      if (SESSION_END_CODES.has(code)) throw ended(response, code);
    }
    return response;
  }

  /**
   * `fetch` for the app's API calls through the proxy. Same arguments and result as
   * `window.fetch`, with these differences for requests to the proxy's origin (see
   * `#isProxyUrl`): cookies go same-origin, unsafe methods carry X-CSRF-Token (refreshed and
   * retried once on 403 `csrf`), a 401 `unauthenticated` (for HEAD: a 401 and no session)
   * dispatches the `unauthenticated` event, calls `onUnauthenticated` and rejects with
   * CountersignError. Requests to any other origin go to fetch exactly as given: no token, the
   * caller's own `credentials`, no retry and no session change whatever they answer. For both,
   * a network failure rejects with CountersignError `network_error`, an abort with the signal's
   * reason and a request that cannot be built with fetch's TypeError (see #send), and any other
   * status (including 4xx/5xx) resolves with the Response. A request that carries the token
   * follows no redirect unless the caller asks to (see tokenRedirect): the redirect is the
   * Response.
   */
  async fetch(input, init) {
    if (!isRequest(input)) {
      // A URL object or any other stringifiable input, as fetch itself would read it.
      const resolved = this.url(typeof input === 'string' ? input : String(input));
      if (!this.#isProxyUrl(resolved)) return this.#send(resolved, init);
      return this.#csrfProtected(() => resolved, init ?? {}, { reportUnauthenticated: true });
    }
    if (!this.#isProxyUrl(input.url)) return this.#send(input, init);
    // A Request body can be read only once: keep a pristine copy for the CSRF retry.
    const pristine = input.clone();
    let first = true;
    const makeInput = () => {
      if (first) {
        first = false;
        return input;
      }
      return pristine.clone();
    };
    return this.#csrfProtected(makeInput, init ?? {}, { reportUnauthenticated: true });
  }

  /**
   * JSON convenience over `fetch`: serialises an object `body` that is not a BodyInit (plain
   * objects, arrays, class instances) with JSON.stringify, parses the response (null for 204
   * or an empty body), and rejects with CountersignError for any non-2xx status. A Request's
   * own headers are kept, `init.headers` set over them.
   */
  async fetchJson(input, init = {}) {
    // A Request's own headers first: `new Request(request, {headers})` replaces them all, which
    // is how a Request to another origin (sent as given) would otherwise go out.
    const headers = new Headers(isRequest(input) ? input.headers : undefined);
    new Headers(init.headers).forEach((value, name) => headers.set(name, value));
    if (!headers.has('Accept')) headers.set('Accept', 'application/json');
    let { body } = init;
    if (typeof body === 'object' && body !== null && !isBodyInitObject(body)) {
      body = JSON.stringify(body);
      if (!headers.has('Content-Type')) headers.set('Content-Type', 'application/json');
    }
    const response = await this.fetch(input, { ...init, headers, body });
    if (!response.ok) throw await errorFrom(response);
    if (response.status === 204) return null;
    const text = await response.text();
    if (text === '') return null;
    try {
      return JSON.parse(text);
    } catch (cause) {
      throw new CountersignError(response.status, 'invalid_json', { cause });
    }
  }
}

function isRequest(value) {
  return typeof Request === 'function' && value instanceof Request;
}

/**
 * The `redirect` mode of a request that carries the CSRF token. fetch follows redirects by
 * default and, on one to another origin, drops only Authorization (and in Node Cookie): the
 * token would go along to wherever an API's 307 or an open redirect points. So such a request
 * follows none ('manual': the caller gets the redirect as the answer, in a browser an opaque
 * one with status 0); the client cannot follow same-origin ones itself, as a browser hides
 * their Location. The caller's own `init.redirect` is kept ('follow' sends the token along, by
 * their choice), and so is a Request's 'error' or 'manual' (its 'follow' is the default, which
 * cannot be told from a chosen one).
 */
function tokenRedirect(input, init) {
  if (init.redirect !== undefined) return init.redirect;
  if (isRequest(input) && input.redirect !== 'follow') return input.redirect;
  return 'manual';
}

/** Creates a client. See countersign.d.ts for the options. */
export function createClient(options = {}) {
  return new CountersignClient(options);
}
