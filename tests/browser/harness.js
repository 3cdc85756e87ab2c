// Test harness for the browser tests: the real `portal-sync` binary on a free
// port with a temp database, Debian's Chromium driven by playwright-core, and
// small helpers to read what a page shows. Every wait is bounded.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../..');
export const BIN = process.env.PORTAL_SYNC_BIN ?? path.join(ROOT, 'target/debug/portal-sync');
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
export const SCREENSHOTS = process.env.SCREENSHOT_DIR ?? path.join(ROOT, 'target/browser-screenshots');
export const SECRET = 'browser-test-secret';

/** How long the server may take to start or stop on a loaded 2-core machine. */
const SERVER_WAIT_MS = 30_000;
/** How long a page may take to show something. */
export const PAGE_WAIT_MS = 10_000;

const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/** The binary's environment: ours, minus any PORTAL_* the caller had set. */
function env(extra) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PORTAL_')));
  return { ...clean, PORTAL_JWT_SECRET: SECRET, RUST_LOG: 'info', ...extra };
}

/** Runs the binary to completion; resolves with stdout, rejects on a non-zero exit. */
export function run(args, { timeoutMs = SERVER_WAIT_MS } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, args, { env: env(), stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      if (code === 0) resolve(stdout);
      else reject(new Error(`portal-sync ${args.join(' ')}: exit ${code ?? signal}\n${stderr}`));
    });
  });
}

/**
 * `portal-sync demo` on 127.0.0.1 with its own temp database, read from the
 * banner it prints: the base URL and each demo user's presenter and viewer
 * links (which is what the tests open, so the printed links are tested too).
 */
export class Server {
  /** `args`: more flags for `portal-sync demo` (e.g. `--allowed-origins`), kept for restarts. */
  static async start({ args = [] } = {}) {
    const dir = await mkdtemp(path.join(tmpdir(), 'portal-sync-browser-'));
    const server = new Server(dir);
    server.args = args;
    await server.start(0);
    return server;
  }

  constructor(dir) {
    this.dir = dir;
    this.db = path.join(dir, 'demo.db');
    this.port = 0;
    this.base = null;
    /** {alice: {presenter, viewer, token}, bob: …, carol: …} */
    this.users = {};
    this.child = null;
    this.log = '';
    this.args = [];
  }

  /** Starts the demo on `port` (0: any free port, then kept for restarts). */
  async start(port = this.port) {
    const child = spawn(BIN, ['demo', '--db', this.db, '--addr', `127.0.0.1:${port}`, '--shutdown-timeout', '5', ...this.args], {
      env: env(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.add(child);
    this.child = child;
    child.stderr.on('data', (d) => (this.log += d));
    const banner = await new Promise((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`no demo banner in time:\n${out}\n${this.log}`)), SERVER_WAIT_MS);
      child.on('exit', (code) => reject(new Error(`demo exited (${code}) before its banner:\n${out}\n${this.log}`)));
      child.stdout.on('data', (d) => {
        out += d;
        if (/^As carol/m.test(out)) {
          clearTimeout(timer);
          resolve(out);
        }
      });
    });
    child.stdout.resume();
    this.base = /portal-sync demo on (http:\/\/127\.0\.0\.1:\d+)/.exec(banner)[1];
    this.port = Number(new URL(this.base).port);
    let user = null;
    for (const line of banner.split('\n')) {
      const name = /^(Alice|Bob|Carol) \(/.exec(line);
      if (name) user = this.users[name[1].toLowerCase()] = {};
      const link = /^\s+(Presenter|Viewer) page:\s+(\S+)$/.exec(line);
      if (link && user) {
        user[link[1].toLowerCase()] = link[2];
        user.token = new URLSearchParams(new URL(link[2]).hash.slice(1)).get('token');
      }
    }
    for (const name of ['alice', 'bob', 'carol']) {
      const u = this.users[name];
      if (!u?.presenter || !u?.viewer) throw new Error(`the banner has no presenter and viewer link for ${name}:\n${banner}`);
    }
    return this;
  }

  /** SIGTERM, then wait for the exit (SIGKILL if it hangs). */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal)));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), SERVER_WAIT_MS);
    const code = await exited;
    clearTimeout(timer);
    children.delete(child);
    this.child = null;
    if (code !== 0) throw new Error(`the server exited with ${code} on SIGTERM:\n${this.log}`);
  }

  async restart() {
    await this.stop();
    await this.start(this.port);
  }

  async dispose() {
    await this.stop().catch(() => {});
    await rm(this.dir, { recursive: true, force: true });
  }

  /** An administration command against this server's database. */
  admin(...args) {
    return run([...args, '--db', this.db]);
  }

  /** A token for `user` signed with this server's secret; `ttl` as `portal-sync token --ttl` takes it. */
  async token(user, ttl) {
    return (await run(['token', '--user', user, ...(ttl ? ['--ttl', ttl] : [])])).trim();
  }

  async addViewer(user) {
    await this.admin('user', 'add', '--id', user, '--email', `${user}@example.com`, '--name', user);
    await this.admin('member', 'set', '--library', 'demo-library', '--user', user, '--role', 'VIEWER');
    const token = await this.token(user);
    return { token, viewer: `${this.base}/viewer#token=${token}&view=demo`, presenter: `${this.base}/presenter#token=${token}&view=demo` };
  }

  /** GET /api/portal-views/demo as `user`. */
  async view(user = 'alice') {
    const response = await fetch(`${this.base}/api/portal-views/demo`, {
      headers: { Authorization: `Bearer ${this.users[user].token}` },
      signal: AbortSignal.timeout(PAGE_WAIT_MS),
    });
    if (!response.ok) throw new Error(`GET the view: ${response.status} ${await response.text()}`);
    return response.json();
  }

  /** PATCH /api/portal-views/demo as `user`; returns the stored view. */
  async patch(patch, user = 'bob') {
    const response = await fetch(`${this.base}/api/portal-views/demo`, {
      method: 'PATCH',
      headers: { Authorization: `Bearer ${this.users[user].token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(patch),
      signal: AbortSignal.timeout(PAGE_WAIT_MS),
    });
    if (!response.ok) throw new Error(`PATCH the view: ${response.status} ${await response.text()}`);
    return response.json();
  }
}

export function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, timeout: SERVER_WAIT_MS });
}

/**
 * One Chromium for a test file: launched before its tests, closed after.
 * `open(pages, url, options)` opens a page in it and adds its record to `pages`.
 */
export function sharedBrowser() {
  let browser;
  before(async () => {
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
  });
  return {
    async open(pages, url, options) {
      const record = await openPage(browser, url, options);
      pages.push(record);
      return record;
    },
  };
}

/**
 * Starts a server (`options` as `Server.start`'s), runs `body(server, pages, clients)`, and always cleans up:
 * the PortalClients in `clients` are stopped, the pages' contexts closed, the
 * server stopped and its files removed. A page that threw or hit the CSP
 * fails the test.
 */
export async function withServer(body, options) {
  const server = await Server.start(options);
  const pages = [];
  const clients = [];
  try {
    await body(server, pages, clients);
    for (const { errors } of pages) assert.deepEqual(errors, [], 'no script errors or CSP violations');
  } finally {
    for (const client of clients) client.stop();
    for (const { context } of pages) await context.close().catch(() => {});
    await server.dispose();
  }
}

/**
 * A page in its own browser context (its own sessionStorage, like another
 * person's browser), with what it did recorded: its WebSockets, the frames
 * they carried, and any error it threw or CSP violation it reported.
 */
export async function openPage(browser, url, { viewport = { width: 1280, height: 800 }, before } = {}) {
  const context = await browser.newContext({ viewport });
  context.setDefaultTimeout(PAGE_WAIT_MS);
  const page = await context.newPage();
  const record = { context, page, sockets: [], received: [], sent: [], errors: [], requests: [] };
  page.on('websocket', (ws) => {
    record.sockets.push(ws);
    ws.on('framereceived', ({ payload }) => record.received.push(parse(payload)));
    ws.on('framesent', ({ payload }) => record.sent.push(parse(payload)));
  });
  page.on('pageerror', (error) => record.errors.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (/Content Security Policy|Refused to/i.test(message.text())) record.errors.push(`CSP: ${message.text()}`);
  });
  page.on('request', (request) => record.requests.push({ url: request.url(), headers: request.headers() }));
  if (before) await before(page, record);
  await page.goto(url);
  return record;
}

function parse(payload) {
  try {
    return JSON.parse(payload);
  } catch {
    return payload;
  }
}

/**
 * Routes a page's portal WebSocket through the test (Playwright's
 * routeWebSocket), forwarding everything both ways unless `dropFromServer`
 * says to drop a server message. Returns the route list (to inject server
 * messages with `routes.at(-1).send(...)`) and what the page sent.
 */
export async function routeSocket(page, { dropFromServer = () => false } = {}) {
  const tap = { routes: [], fromPage: [], dropped: [] };
  await page.routeWebSocket(/\/ws\/portal-view\//, (ws) => {
    const server = ws.connectToServer();
    tap.routes.push(ws);
    ws.onMessage((message) => {
      tap.fromPage.push(parse(message));
      server.send(message);
    });
    server.onMessage((message) => {
      const parsed = parse(message);
      if (dropFromServer(parsed)) tap.dropped.push(parsed);
      else ws.send(message);
    });
  });
  return tap;
}

export const byTestId = (page, id) => page.locator(`[data-testid="${id}"]`);

export function text(page, id) {
  return byTestId(page, id).first().textContent({ timeout: PAGE_WAIT_MS });
}

/** Waits until the connection status badge shows `state` (connecting, live, reconnecting, closed). */
export function waitStatus(page, state, timeout = PAGE_WAIT_MS) {
  return page.waitForFunction((s) => document.querySelector('[data-testid=status]')?.dataset.state === s, state, { timeout });
}

/** Waits until the element `id` shows exactly `expected`. */
export function waitText(page, id, expected, timeout = PAGE_WAIT_MS) {
  return page.waitForFunction(
    ([testid, want]) => document.querySelector(`[data-testid="${testid}"]`)?.textContent === want,
    [id, expected],
    { timeout },
  );
}

/** The version the page shows. */
export async function shownVersion(page) {
  return Number(await byTestId(page, 'version').getAttribute('data-version'));
}

/** Polls `condition` until it is truthy or `timeout` passes. */
export async function eventually(condition, { timeout = PAGE_WAIT_MS, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function screenshot(page, name) {
  await mkdir(SCREENSHOTS, { recursive: true });
  const file = path.join(SCREENSHOTS, name);
  await page.screenshot({ path: file });
  return file;
}
