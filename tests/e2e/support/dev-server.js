// Starts and stops `countersign dev` for the browser tests. scripts/e2e.sh normally starts the
// main instance and passes COUNTERSIGN_URL / COUNTERSIGN_PASSWORD / COUNTERSIGN_ADMIN_URL; a
// test that needs different settings (a short idle timeout) starts its own here.

import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const COUNTERSIGN_BIN = process.env.COUNTERSIGN_BIN ?? path.join(REPO_ROOT, 'target/debug/countersign');
export const STATIC_DIR = process.env.SPA_DIST ?? path.join(REPO_ROOT, 'examples/react-spa/dist');

/** Whether `countersign dev --help` lists `flag` (e.g. '--idle-timeout'). */
export function devSupports(flag) {
  const help = spawnSync(COUNTERSIGN_BIN, ['dev', '--help'], { encoding: 'utf8', timeout: 10_000 });
  return `${help.stdout}${help.stderr}`.includes(flag);
}

/** A free loopback port (bound, read, released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls until `url` answers with any HTTP status, or fails after `timeoutMs`. */
export async function waitForHttp(url, { timeoutMs = 30_000, isAlive = () => true } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  while (Date.now() < deadline) {
    if (!isAlive()) throw new Error(`process exited before ${url} answered`);
    try {
      const response = await fetch(url, { signal: AbortSignal.timeout(2_000) });
      await response.arrayBuffer();
      return response.status;
    } catch (error) {
      lastError = error;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  throw new Error(`${url} did not answer within ${timeoutMs} ms: ${lastError}`);
}

/**
 * Spawns `countersign dev` on free loopback ports. `extraArgs` are appended (e.g.
 * ['--idle-timeout', '3s']). It serves the React example (`staticDir`), or with
 * `staticDir: null` its own built-in demo page. Resolves with { url, adminUrl, password, output(), stop() }.
 * A port is only known to be free when it is chosen: if another process binds one before
 * `countersign dev` does, it exits saying so, and it is started again on other ports.
 */
export async function startDevServer({ extraArgs = [], staticDir = STATIC_DIR } = {}) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDevServerOnce(extraArgs, staticDir);
    } catch (error) {
      if (attempt >= 3 || !/Address already in use|must differ/.test(error.message)) throw error;
    }
  }
}

/** Two distinct free loopback ports (both held while the second is chosen). */
async function twoFreePorts() {
  const listen = () =>
    new Promise((resolve, reject) => {
      const server = createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve(server));
    });
  const first = await listen();
  const second = await listen();
  const ports = [first.address().port, second.address().port];
  await Promise.all([first, second].map((server) => new Promise((resolve) => server.close(resolve))));
  return ports;
}

async function startDevServerOnce(extraArgs, staticDir) {
  const [port, adminPort] = await twoFreePorts();
  const password = `e2e-${randomBytes(12).toString('hex')}`;
  const args = [
    'dev',
    '--listen',
    `127.0.0.1:${port}`,
    '--admin-listen',
    `127.0.0.1:${adminPort}`,
    '--password',
    password,
    ...(staticDir === null ? [] : ['--static-dir', staticDir]),
    ...extraArgs,
  ];
  const child = spawn(COUNTERSIGN_BIN, args, { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk) => (output += chunk));
  child.stderr.on('data', (chunk) => (output += chunk));
  let exited = false;
  const exitPromise = new Promise((resolve) => {
    child.once('exit', () => {
      exited = true;
      resolve();
    });
    child.once('error', (error) => {
      output += `\nspawn error: ${error.message}`;
      exited = true;
      resolve();
    });
  });

  // After 'exit' the output may still be arriving; 'close' comes once it has all been read.
  const closed = new Promise((resolve) => child.once('close', resolve));

  const url = `http://127.0.0.1:${port}`;
  try {
    await waitForHttp(`${url}/auth/session`, { isAlive: () => !exited });
  } catch (error) {
    child.kill('SIGKILL');
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 5_000))]);
    throw new Error(`countersign ${args.join(' ')} did not start: ${error.message}\n--- output ---\n${output}`);
  }
  return {
    url,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    password,
    output: () => output,
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exitPromise;
        clearTimeout(timer);
      }
    },
  };
}

/**
 * The main instance: the one scripts/e2e.sh started (from the environment), or one started
 * here when the tests run on their own (`npm test` with the binary and dist/ built).
 */
export async function mainDevServer() {
  if (process.env.COUNTERSIGN_URL && process.env.COUNTERSIGN_PASSWORD) {
    return {
      url: process.env.COUNTERSIGN_URL.replace(/\/+$/, ''),
      adminUrl: process.env.COUNTERSIGN_ADMIN_URL?.replace(/\/+$/, '') ?? null,
      password: process.env.COUNTERSIGN_PASSWORD,
      output: () => '(started by scripts/e2e.sh; see its log)',
      stop: async () => {},
    };
  }
  return startDevServer();
}
