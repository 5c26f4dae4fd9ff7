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
