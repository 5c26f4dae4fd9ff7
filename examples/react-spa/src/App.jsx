import { useCallback, useEffect, useState } from 'react';
import { CountersignError } from '@countersign/client';
import { client } from './client.js';

// What the user should read for the proxy's stable error codes.
function describeError(error) {
  if (!(error instanceof CountersignError)) return 'Something went wrong.';
  switch (error.code) {
    case 'invalid_credentials':
      return 'Wrong username or password.';
    case 'too_many_attempts':
      return error.retryAfter
        ? `Too many attempts. Try again in ${error.retryAfter} s.`
        : 'Too many attempts. Try again later.';
    case 'network_error':
      return 'The server cannot be reached.';
    case 'session_store_unavailable':
      return 'The server cannot check sessions right now. Try again in a moment.';
    case 'csrf':
      return 'The request was refused as a possible forgery. Reload the page.';
    case 'ambiguous_session_cookie':
      // login() or logout() when the browser holds too many session cookies of this site
      // (docs/FRONTEND.md): nothing the page can fix.
      return "This browser holds several sessions for this site. Clear the site's cookies, then sign in again.";
    default:
      return `The server answered ${error.status} (${error.code}).`;
  }
}

// The demo API may wrap the list; accept both `[...]` and `{ notes: [...] }`.
const notesFrom = (body) => (Array.isArray(body) ? body : (body?.notes ?? []));

export default function App() {
  // undefined: still asking the proxy; null: signed out; object: the session.
  const [session, setSession] = useState(undefined);
  const [notice, setNotice] = useState(null);

  useEffect(() => {
    // Any API call that meets a dead session (idle timeout, logout elsewhere, revoked by an
    // admin) lands here, wherever in the app it was made.
    const onUnauthenticated = () => {
      setSession(null);
      setNotice('Your session has ended. Please sign in again.');
    };
    client.addEventListener('unauthenticated', onUnauthenticated);
    // After a reload the cookie may still be valid: ask once, which also restores the CSRF
    // token that only lives in memory. If the proxy cannot answer (offline, 503 while its
    // session store is down), say so on the login view rather than pretend the user is
    // signed out: the session may be fine, and signing in would meet the same failure.
    client.session().then(setSession, (e) => {
      setNotice(`Cannot check your session: ${describeError(e)}`);
      setSession(null);
    });
    return () => client.removeEventListener('unauthenticated', onUnauthenticated);
  }, []);

  if (session === undefined) return <p className="loading">Loading…</p>;
  if (session === null) {
    return (
      <LoginView
        notice={notice}
        onLogin={(s) => {
          setNotice(null);
          setSession(s);
        }}
      />
    );
  }
  return (
    <Home
      session={session}
      onLogout={() => {
        setNotice('You are signed out.');
        setSession(null);
      }}
    />
  );
}

function LoginView({ notice, onLogin }) {
  const [username, setUsername] = useState('demo');
  const [password, setPassword] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  async function submit(event) {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onLogin(await client.login(username, password));
    } catch (e) {
      setError(describeError(e));
      setBusy(false);
    }
  }

  return (
    <main className="card login" data-testid="login-view">
      <h1>Sign in</h1>
      {notice && (
        <p className="notice" role="status" data-testid="login-notice">
          {notice}
        </p>
      )}
      <form onSubmit={submit}>
        <label>
          Username
          <input
            name="username"
            autoComplete="username"
            value={username}
            onChange={(e) => setUsername(e.target.value)}
            required
          />
        </label>
        <label>
          Password
          <input
            name="password"
            type="password"
            autoComplete="current-password"
            value={password}
            onChange={(e) => setPassword(e.target.value)}
            required
          />
        </label>
        <button type="submit" disabled={busy}>
          {busy ? 'Signing in…' : 'Sign in'}
        </button>
      </form>
      {error && (
        <p className="error" role="alert" data-testid="login-error">
          {error}
        </p>
      )}
    </main>
  );
}

function Home({ session, onLogout }) {
  const [error, setError] = useState(null);

  async function logout(all) {
    try {
      await client.logout({ all });
      onLogout();
    } catch (e) {
      setError(describeError(e));
    }
  }

  return (
    <main data-testid="home-view">
      <header className="card">
        <div>
          Signed in as <strong data-testid="session-user">{session.user}</strong>
          {session.roles.length > 0 && <span className="roles"> ({session.roles.join(', ')})</span>}
        </div>
        <div className="actions">
          <button onClick={() => logout(false)} data-testid="logout">
            Sign out
          </button>
          <button onClick={() => logout(true)} className="secondary">
            Sign out everywhere
          </button>
        </div>
      </header>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <WhoAmI />
      <Notes />
    </main>
  );
}

// What the API itself verified from the proxy's signature: proof the identity travelled.
function WhoAmI() {
  const [identity, setIdentity] = useState(null);
  const [error, setError] = useState(null);

  const load = useCallback(async () => {
    try {
      setIdentity(await client.fetchJson('/api/whoami'));
      setError(null);
    } catch (e) {
      // 401 unauthenticated already sent the app back to the login view.
      if (!(e instanceof CountersignError && e.code === 'unauthenticated')) setError(describeError(e));
    }
  }, []);

  useEffect(() => {
    load();
  }, [load]);

  return (
    <section className="card">
      <h2>Who am I, according to the API</h2>
      <pre data-testid="whoami">{identity ? JSON.stringify(identity, null, 2) : '…'}</pre>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <button onClick={load} data-testid="whoami-refresh">
        Ask again
      </button>
    </section>
  );
}

function Notes() {
  const [notes, setNotes] = useState([]);
  const [text, setText] = useState('');
  const [error, setError] = useState(null);

  const guard = useCallback(async (action) => {
    try {
      await action();
      setError(null);
    } catch (e) {
      if (!(e instanceof CountersignError && e.code === 'unauthenticated')) setError(describeError(e));
    }
  }, []);

  const reload = useCallback(
    () => guard(async () => setNotes(notesFrom(await client.fetchJson('/api/notes')))),
    [guard],
  );

  useEffect(() => {
    reload();
  }, [reload]);

  async function add(event) {
    event.preventDefault();
    if (text.trim() === '') return;
    await guard(async () => {
      await client.fetchJson('/api/notes', { method: 'POST', body: { text } });
      setText('');
      await reload();
    });
  }

  const remove = (id) =>
    guard(async () => {
      await client.fetchJson(`/api/notes/${encodeURIComponent(id)}`, { method: 'DELETE' });
      await reload();
    });

  return (
    <section className="card">
      <h2>Notes</h2>
      <form onSubmit={add} className="inline">
        <input
          aria-label="New note"
          name="note"
          placeholder="Write a note"
          value={text}
          onChange={(e) => setText(e.target.value)}
        />
        <button type="submit">Add</button>
        <button type="button" className="secondary" onClick={reload} data-testid="notes-refresh">
          Refresh
        </button>
      </form>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <ul data-testid="notes">
        {notes.map((note) => (
          <li key={note.id} data-testid="note">
            <span>{note.text}</span>
            <button className="secondary" onClick={() => remove(note.id)} aria-label={`Delete ${note.text}`}>
              Delete
            </button>
          </li>
        ))}
      </ul>
      {notes.length === 0 && <p className="empty">No notes yet.</p>}
    </section>
  );
}
