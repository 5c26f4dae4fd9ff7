// Compile-time checks of countersign.d.ts (npm run check:types). Never executed.
import {
  createClient,
  CountersignClient,
  CountersignError,
  type CountersignErrorCode,
  type SessionInfo,
} from './countersign.js';

const client: CountersignClient = createClient({
  baseUrl: '/bff',
  onUnauthenticated: (detail) => {
    const code: 'unauthenticated' = detail.code;
    const url: string = detail.url;
    void code;
    void url;
  },
});

client.addEventListener('unauthenticated', (event) => {
  const status: 401 = event.detail.status;
  void status;
});

async function usage(): Promise<void> {
  const session: SessionInfo = await client.login('demo', 'pw');
  const roles: readonly string[] = session.roles;
  const sorted: string[] = [...session.roles].sort();
  const maybe: SessionInfo | null = await client.session({ touch: false });
  await client.logout({ all: true });
  const response: Response = await client.fetch('/api/notes', { method: 'POST', body: '{}' });
  const notes = await client.fetchJson<{ id: string; text: string }[]>('/api/notes');
  // null for 204 or an empty body
  const first: string | undefined = notes?.[0]?.text;
  await client.fetchJson('/api/notes', { method: 'POST', body: { text: 'x' } });
  class CreateNote {
    constructor(readonly text: string) {}
  }
  await client.fetchJson('/api/notes', { method: 'POST', body: new CreateNote('x') });
  const expires: number | null = session.expiresAt;
  const code: CountersignErrorCode = 'session_store_unavailable';
  try {
    await client.fetch(new Request('/api/whoami'));
  } catch (e) {
    if (e instanceof CountersignError) {
      const n: number = e.status;
      const r: number | null = e.retryAfter;
      void n;
      void r;
    }
  }
  void roles;
  void sorted;
  void maybe;
  void response;
  void first;
  void expires;
  void code;
}
void usage;

// @ts-expect-error fetchJson may resolve with null (204 or an empty body)
void (async () => (await client.fetchJson<string[]>('/api/x')).length);
// @ts-expect-error login needs a password
void client.login('demo');
// @ts-expect-error the session objects are frozen: their fields cannot be assigned
void ((s: SessionInfo) => (s.user = 'root'));
// @ts-expect-error the CSRF token is not part of the public session
void ((s: SessionInfo) => s.csrf_token);
// @ts-expect-error roles is a frozen array: sort or extend a copy
void ((s: SessionInfo) => s.roles.push('admin'));
