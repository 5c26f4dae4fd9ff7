// `countersign run` with two users (demo and bob) in front of `countersign demo-api`, serving
// the React example: for browser tests that need a second user or another upstream (a
// server-sent events API), which `countersign dev` (one demo user, the demo API) cannot give. Everything is written to a temporary folder and removed on stop().

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { COUNTERSIGN_BIN, REPO_ROOT, STATIC_DIR, freePort, waitForHttp } from './dev-server.js';

function hashPassword(password) {
  const run = spawnSync(COUNTERSIGN_BIN, ['hash-password'], { input: password, encoding: 'utf8', timeout: 60_000 });
  if (run.status !== 0) throw new Error(`countersign hash-password failed: ${run.stderr}`);
  return run.stdout.trim();
}

function spawnLogged(args) {
  const child = spawn(COUNTERSIGN_BIN, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const state = { output: '', exited: false };
  child.stdout.on('data', (chunk) => (state.output += chunk));
  child.stderr.on('data', (chunk) => (state.output += chunk));
  state.exit = new Promise((resolve) => {
    child.once('exit', () => {
      state.exited = true;
      resolve();
    });
    child.once('error', (error) => {
      state.output += `\nspawn error: ${error.message}`;
      state.exited = true;
      resolve();
    });
  });
  state.stop = async () => {
    if (state.exited) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await state.exit;
    clearTimeout(timer);
  };
  return state;
}

/**
 * Resolves with { url, passwords: { demo, bob }, output(), stop() }. `upstreams` adds routes
 * ([{ name, prefix, url }]) next to the demo API's `/api/`.
 */
export async function startTwoUsersServer({ upstreams = [] } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'countersign-e2e-two-users-'));
  const passwords = { demo: `e2e-${randomBytes(8).toString('hex')}`, bob: `e2e-${randomBytes(8).toString('hex')}` };
  const keyring = path.join(REPO_ROOT, 'examples/config/keys.toml');
  const users = Object.entries(passwords)
    .map(([name, password]) => `[[users]]\nname = "${name}"\npassword = "${hashPassword(password)}"\nroles = ["user"]\n`)
    .join('\n');
  writeFileSync(path.join(dir, 'users.toml'), users);
  const [port, apiPort] = [await freePort(), await freePort()];
  const url = `http://127.0.0.1:${port}`;
  writeFileSync(
    path.join(dir, 'proxy.toml'),
    [
      '[server]',
      `listen = "127.0.0.1:${port}"`,
      `public_origin = "${url}"`,
      `static_dir = ${JSON.stringify(STATIC_DIR)}`,
      '[session]',
      'store = "memory"',
      '[auth]',
      `users_file = ${JSON.stringify(path.join(dir, 'users.toml'))}`,
      '[signing]',
      `keyring = ${JSON.stringify(keyring)}`,
      '[[upstream]]',
      'name = "api"',
      'prefix = "/api/"',
      `url = "http://127.0.0.1:${apiPort}"`,
      ...upstreams.flatMap((u) => ['[[upstream]]', `name = "${u.name}"`, `prefix = "${u.prefix}"`, `url = "${u.url}"`]),
      '',
    ].join('\n'),
  );
  const api = spawnLogged(['demo-api', '--listen', `127.0.0.1:${apiPort}`, '--keyring', keyring]);
  const proxy = spawnLogged(['run', '--config', path.join(dir, 'proxy.toml')]);
  const stop = async () => {
    await Promise.all([proxy.stop(), api.stop()]);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitForHttp(`http://127.0.0.1:${apiPort}/api/whoami`, { isAlive: () => !api.exited });
    await waitForHttp(`${url}/auth/session`, { isAlive: () => !proxy.exited });
  } catch (error) {
    await stop();
    throw new Error(`${error.message}\n--- demo-api ---\n${api.output}\n--- run ---\n${proxy.output}`);
  }
  const output = () => `--- demo-api ---\n${api.output}\n--- run ---\n${proxy.output}`;
  return { url, passwords, output, stop };
}
