// Launches Debian's Chromium (apt `chromium`) through playwright-core. Playwright's own browser
// builds are never downloaded: the tests use the system browser at CHROMIUM_PATH.

import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const ARTIFACTS_DIR = process.env.E2E_ARTIFACTS_DIR ?? path.join(repoRoot, 'artifacts', 'e2e');

// Headless, no sandbox (root in a container), and nothing that phones home or updates itself:
// the machine has no network beyond loopback, and background fetches would only add noise.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/**
 * A fresh browser profile (its own --user-data-dir, so no cookie survives between tests).
 * Returns { context, close }.
 */
export async function launchBrowser() {
  const userDataDir = mkdtempSync(path.join(tmpdir(), 'countersign-e2e-profile-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM_PATH,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1000, height: 760 },
      timeout: 30_000,
    });
  } catch (error) {
    rmSync(userDataDir, { recursive: true, force: true });
    throw error;
  }
  context.setDefaultTimeout(10_000);
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Saves a full-page screenshot as artifacts/e2e/<name>.png. */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  const file = path.join(ARTIFACTS_DIR, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

/**
 * Runs `body(page, context)` in a fresh browser profile, closing it whatever happens.
 *
 * A browser test that fails on a wait ("Timeout 10000ms exceeded") says nothing of which side
 * stalled, and a flake may not come back: so when `body` throws, the error also carries what the
 * browser asked and got (every request of every tab with its status or failure, the ones still
 * unanswered, console errors), a screenshot of each open tab (artifacts/e2e/failure-*.png), and
 * the output of `servers` (objects with `output()`, e.g. a startTwoUsersServer()), whose access
 * log shows which requests reached the proxy.
 */
export async function withBrowser(body, { servers = [] } = {}) {
  const browser = await launchBrowser();
  const started = Date.now();
  const events = [];
  const unanswered = new Set();
  const note = (line) => events.push(`${((Date.now() - started) / 1000).toFixed(3)}s ${line}`);
  const { context } = browser;
  context.on('request', (request) => {
    unanswered.add(request);
    note(`-> ${request.method()} ${request.url()}`);
  });
  context.on('requestfinished', (request) => {
    unanswered.delete(request);
    request.response().then(
      (response) => note(`<- ${response?.status() ?? '(no response)'} ${request.method()} ${request.url()}`),
      () => note(`<- (response unreadable) ${request.method()} ${request.url()}`),
    );
  });
  context.on('requestfailed', (request) => {
    unanswered.delete(request);
    note(`<- FAILED ${request.failure()?.errorText ?? ''} ${request.method()} ${request.url()}`);
  });
  context.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') note(`console.${message.type()}: ${message.text()}`);
  });
  context.on('weberror', (webError) => note(`page error: ${webError.error().message}`));
  try {
    const page = await context.newPage();
    return await body(page, context);
  } catch (error) {
    const shots = [];
    for (const [index, page] of context.pages().entries()) {
      const name = `failure-${Date.now()}-tab${index}`;
      shots.push(await screenshot(page, name).catch((e) => `(no screenshot of tab ${index}: ${e.message})`));
    }
    const tail = (text, lines) => String(text).split('\n').slice(-lines).join('\n');
    const outputs = servers.map((server, index) => `--- server ${index} output (tail) ---\n${tail(server.output?.() ?? '(none)', 80)}`);
    const pending = [...unanswered].map((request) => `${request.method()} ${request.url()}`);
    const report = [
      `--- browser: requests and console, by seconds since launch (${pending.length} unanswered) ---`,
      ...events,
      ...(pending.length ? ['--- unanswered ---', ...pending] : []),
      `--- screenshots ---`,
      ...shots,
      ...outputs,
    ].join('\n');
    if (error instanceof Error) {
      error.message = `${error.message}\n${report}`;
      throw error;
    }
    throw new Error(`${String(error)}\n${report}`);
  } finally {
    await browser.close();
  }
}
