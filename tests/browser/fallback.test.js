// The HTTP fallback (SPEC §7) end to end: web/client.js on SSE + POST in Node
// against the real binary, then the pages in Chromium with their WebSockets
// blocked (Playwright's routeWebSocket closes them before they reach the
// server, as a proxy that breaks WebSockets would).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PortalClient } from '../../web/client.js';
import { byTestId, eventually, screenshot, sharedBrowser, shownVersion, text, waitStatus, waitText, withServer } from './harness.js';

const TEST = { timeout: 90_000 };

const { open } = sharedBrowser();

/** client.js in Node on SSE + POST only, recording every version it took. */
function sseClient(server, user, clients) {
  const client = new PortalClient({ view: 'demo', token: server.users[user].token, origin: server.base, transport: 'sse' });
  const seen = [];
  client.addEventListener('state', () => {
    if (seen.at(-1) !== client.version) seen.push(client.version);
  });
  clients.push(client);
  client.start();
  return { client, seen };
}

function waitLive(client) {
  return eventually(() => client.status === 'live', { what: `${client.userId ?? 'the client'} live` });
}

/** A page link with `query` added before its fragment. */
function withQuery(link, query) {
  const [head, fragment] = link.split('#');
  return `${head}?${query}#${fragment}`;
}

/** Makes the page's portal WebSockets fail while `gate.blocked`; counts the attempts. */
async function blockWebSockets(page, gate) {
  await page.routeWebSocket(/\/ws\/portal-view\//, (ws) => {
    gate.attempts += 1;
    if (gate.blocked) ws.close({ code: 1011, reason: 'blocked by the test' });
    else ws.connectToServer();
  });
}

async function metric(server, name) {
  const body = await (await fetch(`${server.base}/metrics`)).text();
  const line = body.split('\n').find((l) => l.startsWith(`${name} `));
  return line === undefined ? NaN : Number(line.split(' ')[1]);
}

test('client.js on SSE + POST: a controller drives a viewer, every version in order, the acks over POST', TEST, () =>
  withServer(async (server, pages, clients) => {
    const viewer = sseClient(server, 'carol', clients);
    const controller = sseClient(server, 'alice', clients);
    await waitLive(viewer.client);
    await waitLive(controller.client);
    assert.equal(viewer.client.role, 'viewer');
    assert.equal(controller.client.role, 'controller');
    assert.equal(controller.client.transport, 'sse');
    assert.equal(await metric(server, 'portal_sse_streams'), 2);
    const start = controller.client.version;

    const acked = [];
    for (let i = 0; i < 20; i++) {
      const change = i % 2 ? controller.client.updateItem('1', { title: `Title ${i}` }) : controller.client.updateView({ currentItem: String((i % 3) + 1) });
      acked.push((await change).version);
    }
    assert.deepEqual(acked, Array.from({ length: 20 }, (_, i) => start + i + 1), 'every change acked with the next version');
    // A REST PATCH in between reaches both, too.
    const patched = await server.patch({ visible: false });
    const stored = await server.view();
    assert.equal(stored.version, patched.version);
    await eventually(() => viewer.client.version === stored.version && controller.client.version === stored.version, { what: 'both at the stored version' });
    assert.deepEqual(viewer.client.state, stored.state);
    assert.deepEqual(controller.client.state, stored.state);
    const after = viewer.seen.filter((v) => v > start);
    assert.deepEqual(after, Array.from({ length: 21 }, (_, i) => start + i + 1), 'the viewer took every version, in order');

    // A viewer's controller message over POST is refused as on a WebSocket.
    await assert.rejects(viewer.client.updateView({ currentItem: '3' }), { code: 'FORBIDDEN' });
    assert.equal((await server.view()).version, stored.version);
  }),
);

test('client.js on SSE: a refused stream stops with its reason, and the token never goes in the URL', TEST, () =>
  withServer(async (server, pages, clients) => {
    const urls = [];
    const recordingFetch = (url, init) => {
      urls.push(String(url));
      return fetch(url, init);
    };
    const cases = [
      [{ view: 'demo', token: 'not-a-token' }, 'invalid token'],
      [{ view: 'no-such-view', token: server.users.alice.token }, 'portal view not found'],
    ];
    for (const [options, reason] of cases) {
      const client = new PortalClient({ ...options, origin: server.base, transport: 'sse', fetch: recordingFetch });
      clients.push(client);
      client.start();
      await eventually(() => client.status === 'closed', { what: `closed for ${reason}` });
      assert.deepEqual(client.lastClose, { code: 1008, reason });
    }
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.equal(urls.length, 2, `one attempt each: ${urls}`);
    for (const url of urls) assert.ok(!url.includes('token'), url);

    // Revocation ends a live stream with its close code, as a WebSocket's.
    const { client } = sseClient(server, 'carol', clients);
    await waitLive(client);
    await server.admin('member', 'remove', '--library', 'demo-library', '--user', 'carol');
    await eventually(() => client.status === 'closed', { what: 'carol closed after the revocation', timeout: 15_000 });
    assert.deepEqual(client.lastClose, { code: 1008, reason: 'access denied' }, 'the one retry after "access revoked" is refused');
  }),
);

test('with WebSockets blocked, the viewer page falls back to SSE, says so, and follows the presenter live', TEST, () =>
  withServer(async (server, pages) => {
    const gate = { blocked: true, attempts: 0 };
    const viewer = await open(pages, server.users.carol.viewer, { before: (page) => blockWebSockets(page, gate) });
    await waitStatus(viewer.page, 'live');
    assert.equal(await text(viewer.page, 'status'), 'Live · SSE fallback');
    assert.equal(await byTestId(viewer.page, 'status').getAttribute('data-transport'), 'sse');
    assert.equal(gate.attempts, 2, 'two WebSocket attempts, then the fallback');
    const stream = viewer.requests.find((r) => r.url.includes('/sse/portal-view/demo'));
    assert.ok(stream, 'the page opened the SSE stream');
    assert.ok(!stream.url.includes('token'), 'no token in the stream URL');
    assert.match(stream.headers.authorization, /^Bearer /);

    const presenter = await open(pages, server.users.alice.presenter);
    await waitStatus(presenter.page, 'live');
    assert.equal(await text(presenter.page, 'status'), 'Live · WebSocket');
    assert.equal(await text(presenter.page, 'count-viewers'), '1', 'the SSE viewer counts in presence');

    await byTestId(presenter.page, 'next').click();
    await waitText(viewer.page, 'item-title', 'How it works', 2000);
    await byTestId(presenter.page, 'edit-title').fill('Seen over SSE');
    await byTestId(presenter.page, 'save-item').click();
    await waitText(viewer.page, 'item-title', 'Seen over SSE', 2000);
    const stored = await server.view();
    await eventually(async () => (await shownVersion(viewer.page)) === stored.version, { what: 'the viewer at the stored version' });
    assert.equal(stored.state.items['2'].title, 'Seen over SSE');
    assert.equal(gate.attempts, 2, 'no more WebSocket attempts (the next probe is 30 s away)');
    await screenshot(viewer.page, 'viewer-sse-fallback.png');
  }),
);

test('a presenter on ?transport=sse drives a WebSocket viewer: its changes are POSTed naming its stream', TEST, () =>
  withServer(async (server, pages) => {
    const viewer = await open(pages, server.users.carol.viewer);
    const presenter = await open(pages, withQuery(server.users.alice.presenter, 'transport=sse'));
    const p = presenter.page;
    await waitStatus(p, 'live');
    await waitStatus(viewer.page, 'live');
    assert.equal(await text(p, 'status'), 'Live · SSE fallback');
    assert.equal(await text(viewer.page, 'status'), 'Live · WebSocket');
    assert.equal(presenter.sockets.length, 0, 'transport=sse opens no WebSocket');

    const start = await server.view();
    await byTestId(p, 'next').click();
    await waitText(viewer.page, 'item-title', 'How it works', 2000);
    await byTestId(p, 'edit-title').fill('Sent by POST');
    await byTestId(p, 'save-item').click();
    await waitText(viewer.page, 'item-title', 'Sent by POST', 2000);
    const stored = await server.view();
    assert.equal(stored.version, start.version + 2);
    assert.equal(await text(p, 'save-state'), `Saved as version ${stored.version}`, 'the ack came back over POST');

    const connectionId = await p.evaluate(() => window.portal.client.connectionId);
    const posts = presenter.requests.filter((r) => r.url.endsWith('/api/portal-views/demo/messages'));
    assert.equal(posts.length, 2);
    for (const post of posts) assert.equal(post.headers['x-connection-id'], connectionId);
    // The viewer's broadcasts name the presenter's stream as their sender.
    const broadcasts = viewer.received.filter((m) => m.version > start.version && m.from);
    assert.deepEqual(
      broadcasts.map((m) => [m.version, m.from.connectionId]),
      [
        [start.version + 1, connectionId],
        [start.version + 2, connectionId],
      ],
    );
    await screenshot(p, 'presenter-sse.png');
  }),
);

test('on the fallback the page keeps trying WebSockets and goes back to one when it works', TEST, () =>
  withServer(async (server, pages) => {
    const gate = { blocked: true, attempts: 0 };
    const viewer = await open(pages, withQuery(server.users.carol.viewer, 'probe=500'), { before: (page) => blockWebSockets(page, gate) });
    await waitStatus(viewer.page, 'live');
    assert.equal(await text(viewer.page, 'status'), 'Live · SSE fallback');
    await eventually(() => gate.attempts >= 4, { what: 'probes every 0.5 s' });
    assert.equal(await byTestId(viewer.page, 'status').getAttribute('data-transport'), 'sse');
    assert.equal(await metric(server, 'portal_sse_streams'), 1);

    gate.blocked = false;
    await viewer.page.waitForFunction(() => document.querySelector('[data-testid=status]')?.textContent === 'Live · WebSocket');
    // The stream is closed on the server: one connection, on a WebSocket.
    await eventually(async () => (await metric(server, 'portal_sse_streams')) === 0, { what: 'the SSE stream closed' });
    assert.equal(await metric(server, 'portal_connections{role="viewer"}'), 1);

    const patched = await server.patch({ currentItem: '3' });
    await waitText(viewer.page, 'item-title', 'Questions?', 2000);
    await eventually(async () => (await shownVersion(viewer.page)) === patched.version, { what: 'the patched version' });
  }),
);
