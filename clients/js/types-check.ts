// Compile-time checks of countersign.d.ts (npm run check:types). Never executed.
import { createClient, CountersignClient, CountersignError, type SessionInfo } from './countersign.js';

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
  const roles: string[] = session.roles;
  const maybe: SessionInfo | null = await client.session({ touch: false });
  await client.logout({ all: true });
  const response: Response = await client.fetch('/api/notes', { method: 'POST', body: '{}' });
  const notes = await client.fetchJson<{ id: string; text: string }[]>('/api/notes');
  const first: string | undefined = notes[0]?.text;
  await client.fetchJson('/api/notes', { method: 'POST', body: { text: 'x' } });
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
  void maybe;
  void response;
  void first;
}
void usage;

// @ts-expect-error login needs a password
void client.login('demo');
// @ts-expect-error the CSRF token is not part of the public session
void ((s: SessionInfo) => s.csrf_token);
