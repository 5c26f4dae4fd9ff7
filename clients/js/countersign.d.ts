// Types for countersign.js, the browser client of the countersign backend-for-frontend proxy.
// Browsers, and Node >= 20 with a cookie-aware `fetch` option (Node's fetch keeps no cookies).

/**
 * Stable error codes the proxy sends as `{"error":"<code>"}` (docs/FRONTEND.md, "Errors"), plus
 * the client's own.
 */
export type CountersignErrorCode =
  // States the SPA handles at run time.
  | 'unauthenticated'
  /**
   * 401: the browser sent several session cookies and more than one names a live session (a
   * sibling subdomain's, an old Path's), or more than `session.max_session_cookies` (default 4)
   * distinct ids. A login ends every session they name; beyond that cap the login itself is
   * refused with this code, and only clearing the site's cookies helps (tell the user).
   * `client.fetch` handles it as the end of the session (`unauthenticated` event and
   * CountersignError(401, 'unauthenticated')) and `session()` resolves null; `login()` and
   * `logout()` reject with this code (nothing was ended), as plain `fetch` shows it.
   */
  | 'ambiguous_session_cookie'
  | 'invalid_credentials'
  | 'too_many_attempts'
  | 'csrf'
  | 'body_too_large'
  | 'bad_gateway'
  | 'gateway_timeout'
  /** 503: the session store or the login throttle cannot answer; retry later. */
  | 'session_store_unavailable'
  /**
   * 503: the proxy is reading as many request bodies at once as `server.max_body_memory`
   * holds; nothing was forwarded, so the same request (a write too) may be sent again after
   * `Retry-After` (1 s).
   */
  | 'body_memory_limit'
  /**
   * 429: this user (on a public route or at the login, this address) is already sending as
   * many request bodies at once as `server.max_body_memory_per_client` holds; nothing was
   * forwarded: finish or cancel other uploads, then send it again after `Retry-After` (1 s).
   */
  | 'client_body_memory_limit'
  /** 503: a WebSocket handshake beyond the route's `websocket_max_open`; reconnect later. */
  | 'websocket_limit'
  /**
   * 429: the user has `server.websocket_max_open_per_user` WebSockets open through this proxy
   * already; close one (another tab's) before opening more.
   */
  | 'websocket_user_limit'
  // A bug in the request rather than a state to handle.
  | 'bad_request'
  | 'not_found'
  | 'method_not_allowed'
  | 'request_timeout'
  | 'unsupported_media_type'
  | 'websocket_unsupported'
  | 'websocket_version'
  /** 412 / 416: a `static_dir` file's `If-Match` or `Range` (the proxy's own files only). */
  | 'precondition_failed'
  | 'range_not_satisfiable'
  | 'internal_error'
  /**
   * The request was sent but never completed (offline, DNS, connection refused). Not used for
   * an aborted request (the signal's AbortError / TimeoutError) nor for one fetch cannot build
   * (its TypeError).
   */
  | 'network_error'
  /**
   * A 2xx response whose body was not JSON (fetchJson), or not the proxy's session JSON (login,
   * session: `user` a string, `roles` an array of strings, `csrf_token` a non-empty string,
   * `expires_at` an integer if present; e.g. the SPA's index.html or another API's JSON,
   * answered for a wrong `baseUrl`). The client's state is then unchanged.
   */
  | 'invalid_json'
  | `http_${number}`
  | (string & {});

export class CountersignError extends Error {
  constructor(
    status: number,
    code: CountersignErrorCode,
    options?: { cause?: unknown; retryAfter?: number | null },
  );
  readonly name: 'CountersignError';
  /** HTTP status; 0 when no response arrived. */
  readonly status: number;
  readonly code: CountersignErrorCode;
  /** Seconds to wait, from Retry-After (429 too_many_attempts); otherwise null. */
  readonly retryAfter: number | null;
}

/**
 * What the proxy says about the signed-in user, from the login and session answers
 * (`{"user": "demo", "roles": ["user"], "expires_at": 1795980014, "csrf_token": "..."}`).
 * The CSRF token is kept inside the client. The objects the client hands out are frozen
 * (`roles` too): they are its `currentSession`, which sorting or extending them would change.
 */
export interface SessionInfo {
  /** The user name the session was opened for. */
  readonly user: string;
  /** The user's roles (empty if none). A frozen array: sort a copy (`[...roles].sort()`). */
  readonly roles: readonly string[];
  /**
   * `expires_at`: when the session ends, in unix seconds (UTC; `new Date(expiresAt * 1000)`),
   * the earlier of its idle and absolute timeouts as of this answer. Each request that
   * touches the session moves the idle timeout on, so read it again (`session({ touch: false })`)
   * rather than counting down to it. null only if the proxy sent none.
   */
  readonly expiresAt: number | null;
}

export interface UnauthenticatedDetail {
  status: 401;
  code: 'unauthenticated';
  /** The URL whose request was refused. */
  url: string;
}

export interface ClientOptions {
  /**
   * Prefix for relative paths, e.g. '' (same origin, the default) or '/bff'. Its origin,
   * resolved against the page (the page's own origin for '' or a path), is the proxy's: only
   * requests to that origin get the CSRF token, `credentials` and the session handling.
   * The client's own `/auth/` calls (login, session, logout, token reads) always go to that
   * origin, as absolute URLs, whatever a `<base href>` says; a relative URL given to `fetch`
   * goes where fetch resolves it (against `document.baseURI`), without the token if a `<base>`
   * on another origin moves it off the proxy.
   */
  baseUrl?: string;
  /** Called (after the `unauthenticated` event) when the proxy reports no valid session. */
  onUnauthenticated?: (detail: UnauthenticatedDetail) => void;
  /**
   * Defaults to 'same-origin': the proxy serves the SPA, so cookies never go cross-site.
   * Applies to requests to the proxy only; others keep the caller's own `init.credentials`.
   */
  credentials?: RequestCredentials;
  /**
   * A fetch implementation; defaults to the global `fetch`. In Node, pass one that keeps
   * cookies (e.g. `makeFetchCookie(fetch)` from fetch-cookie): Node's own fetch has no cookie
   * jar, so without one the session cookie set by login is never sent back.
   */
  fetch?: typeof globalThis.fetch;
}

export interface CountersignEventMap {
  unauthenticated: CustomEvent<UnauthenticatedDetail>;
}

export class CountersignClient extends EventTarget {
  constructor(options?: ClientOptions);

  /** The last session the proxy reported, or null. */
  readonly currentSession: SessionInfo | null;

  /** Resolves a relative path against `baseUrl`; absolute URLs pass through. */
  url(path: string): string;

  /**
   * POST /auth/login. Rejects with CountersignError `invalid_credentials` (401) or
   * `too_many_attempts` (429, with `retryAfter`), among others; `ambiguous_session_cookie`
   * (401) when the browser holds more session cookies than the proxy accepts (the user must
   * clear the site's cookies); `invalid_json` when the answer is not the proxy's session JSON.
   * The user it signs in is the client's from then on (see `fetch`).
   */
  login(username: string, password: string): Promise<SessionInfo>;

  /**
   * POST /auth/logout (`all: true`: every session of the user). Resolves if already logged out;
   * on a network or server failure rejects and keeps the session state (retry). Rejects with
   * `ambiguous_session_cookie` (401) when the proxy cannot tell which session to end: nothing
   * was ended, the client forgets the session, and the user must clear the site's cookies.
   */
  logout(options?: { all?: boolean }): Promise<void>;

  /**
   * GET /auth/session: the session, or null without one (also for a 401
   * `ambiguous_session_cookie`). Also restores the in-memory CSRF token (e.g. after a page
   * reload). `touch: false` does not extend the idle timeout. The app's own read: whichever
   * user it finds is the client's from then on (see `fetch`). A session other than the one the
   * client held (another user's, one after none, a new login in another tab) makes the answers
   * to requests still in flight outdated, as a login does: their 401 rejects them but does not
   * end the session found. If a login or logout completes while the read is in flight,
   * resolves with `currentSession` instead of the outdated answer.
   * Never dispatches `unauthenticated` (null is the normal answer at startup). Rejects with
   * CountersignError for other errors (503 `session_store_unavailable`, `network_error`,
   * `invalid_json`), leaving the state unchanged.
   */
  session(options?: { touch?: boolean }): Promise<SessionInfo | null>;

  /**
   * `window.fetch` through the proxy: same-origin cookies, X-CSRF-Token on unsafe methods
   * (read from GET /auth/session first when none is in memory), one token refresh and retry
   * on 403 `csrf` (not for a ReadableStream or async-iterable body, which cannot be sent
   * twice). The token reads the client makes on its own never switch it to another user: a
   * write whose read finds another user's session (signed in from another tab) than the one
   * of the app's last `login()` / `session()` is not sent (not retried after a 403) and ends
   * this client's session, as a 401 does, until the app calls `login()` or `session()` again;
   * only before any of those (a page load) does the first read adopt the session it finds.
   * Rejects with CountersignError on 401 `unauthenticated` or `ambiguous_session_cookie` (as
   * `unauthenticated`; for HEAD, whose 401 has no body: a 401 and no session at GET
   * /auth/session), after dispatching the `unauthenticated` event unless a login or logout has
   * replaced the session the request was sent under; and on network failure
   * (`network_error`). Like fetch, rejects with the signal's reason (AbortError, TimeoutError)
   * when aborted, also while it waits for a token read (an already aborted signal sends
   * nothing), and with a TypeError for a request that cannot be built (e.g. a GET with a
   * body); every other status resolves with the Response. A request that carries the token
   * follows no redirect unless `init.redirect` says so (`'manual'` by default, so the token
   * never reaches another origin through one; a Request's own `'error'` or `'manual'` is kept):
   * the redirect resolves as the Response (in a browser an opaque one, status 0; in Node the
   * 3xx). `redirect: 'follow'` sends the token wherever the redirect leads. Error bodies are
   * read for their code only up to 4 KiB and for at most a second (more, or an endless or
   * stalled one: `http_<status>`). All of
   * that only for the proxy's origin (see `baseUrl`; scheme, host and port must match): a
   * request to any other origin goes to fetch as given (no token, no retry, no session change)
   * and only network failures are mapped, to CountersignError `network_error`.
   */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;

  /**
   * JSON convenience: a `body` that is an object but not a BodyInit (a plain object, an array,
   * a class instance; serialised with JSON.stringify, so `toJSON` applies) is sent as JSON with
   * `Content-Type: application/json`; strings, Blob, FormData, URLSearchParams, buffers and
   * streams go as they are; a Request's own headers are kept, `init.headers` going over them.
   * Resolves with the parsed body, or null for 204 or an empty body; rejects with
   * CountersignError on any non-2xx status (a redirect not followed: `http_0` in a browser).
   */
  fetchJson<T = unknown>(
    input: RequestInfo | URL,
    init?: Omit<RequestInit, 'body'> & { body?: BodyInit | object | null },
  ): Promise<T | null>;

  addEventListener<K extends keyof CountersignEventMap>(
    type: K,
    listener: (this: CountersignClient, event: CountersignEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof CountersignEventMap>(
    type: K,
    listener: (this: CountersignClient, event: CountersignEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export function createClient(options?: ClientOptions): CountersignClient;
