// Types for countersign.js, the browser client of the countersign backend-for-frontend proxy.

/** Stable error codes the proxy sends as `{"error":"<code>"}`, plus the client's own. */
export type CountersignErrorCode =
  | 'invalid_credentials'
  | 'too_many_attempts'
  | 'unauthenticated'
  | 'csrf'
  | 'body_too_large'
  | 'bad_gateway'
  | 'gateway_timeout'
  /** The request never completed (offline, DNS, connection refused). */
  | 'network_error'
  /** A 2xx response whose body was not JSON (fetchJson only). */
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

/** What the proxy says about the signed-in user. The CSRF token is kept inside the client. */
export interface SessionInfo {
  user: string;
  roles: string[];
  /** `expires_at` exactly as the proxy sent it. */
  expiresAt: string | number | null;
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
   */
  baseUrl?: string;
  /** Called (after the `unauthenticated` event) when the proxy reports no valid session. */
  onUnauthenticated?: (detail: UnauthenticatedDetail) => void;
  /**
   * Defaults to 'same-origin': the proxy serves the SPA, so cookies never go cross-site.
   * Applies to requests to the proxy only; others keep the caller's own `init.credentials`.
   */
  credentials?: RequestCredentials;
  /** A fetch implementation; defaults to the global `fetch`. */
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
   * `too_many_attempts` (429, with `retryAfter`), among others.
   */
  login(username: string, password: string): Promise<SessionInfo>;

  /**
   * POST /auth/logout (`all: true`: every session of the user). Resolves if already logged out;
   * on a network or server failure rejects and keeps the session state (retry).
   */
  logout(options?: { all?: boolean }): Promise<void>;

  /**
   * GET /auth/session: the session, or null without one. Also restores the in-memory CSRF
   * token (e.g. after a page reload). `touch: false` does not extend the idle timeout.
   */
  session(options?: { touch?: boolean }): Promise<SessionInfo | null>;

  /**
   * `window.fetch` through the proxy: same-origin cookies, X-CSRF-Token on unsafe methods,
   * one token refresh and retry on 403 `csrf`. Rejects with CountersignError on 401
   * `unauthenticated` (after dispatching the `unauthenticated` event) and on network failure;
   * every other status resolves with the Response. All of that only for the proxy's origin
   * (see `baseUrl`; scheme, host and port must match): a request to any other origin goes to
   * fetch as given (no token, no retry, no session change) and only network failures are
   * mapped, to CountersignError `network_error`.
   */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;

  /**
   * JSON convenience: a plain-object or array `body` is serialised with
   * `Content-Type: application/json`; resolves with the parsed body (null for an empty body or
   * 204); rejects with CountersignError on any non-2xx status.
   */
  fetchJson<T = unknown>(
    input: RequestInfo | URL,
    init?: Omit<RequestInit, 'body'> & { body?: BodyInit | object | unknown[] | null },
  ): Promise<T>;

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
