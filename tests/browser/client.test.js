// web/client.js on its own, in Node, with a scripted fake WebSocket: the
// sequencing, ack, gap and reconnect rules, message by message. The browser
// tests (pages.test.js) then show the same client working against the server.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  PortalClient,
  RECONNECT_BASE_MS,
  RECONNECT_CAP_MS,
  SseParser,
  WS_FAILURES_AFTER_LIVE,
  backoffMs,
  changeOf,
  closeOfStatus,
  mergePatch,
  shouldReconnect,
  tokenExp,
} from '../../web/client.js';

class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
    this.onclose?.({ code, reason });
  }

  /** A message from the server. */
  deliver(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  /** The server (or the network) closes the socket. */
  drop(code, reason = '') {
    this.onclose?.({ code, reason });
  }
}

const STATE = { currentItem: '1', items: { 1: { title: 'One' }, 2: { title: 'Two' } } };

/**
 * The server's side of the HTTP fallback, scripted: every request is kept;
 * a stream GET answers `streamStatus` (200 by default: a body the test
 * writes events into); a POST waits for the test's `answer`.
 */
class FakeHttp {
  constructor() {
    this.requests = [];
    this.streams = [];
    this.posts = [];
    this.streamStatus = 200;
    this.fetch = (url, init = {}) => this._fetch(url, init);
  }

  async _fetch(url, init) {
    const request = { url: String(url), method: init.method ?? 'GET', headers: init.headers ?? {}, body: init.body };
    this.requests.push(request);
    if (request.method === 'POST') {
      return new Promise((resolve) => {
        this.posts.push({
          request,
          message: JSON.parse(request.body),
          answer: (status, body) => resolve(new Response(JSON.stringify(body), { status })),
        });
      });
    }
    if (this.streamStatus !== 200) {
      const message = this.streamStatus === 401 ? 'invalid token' : 'internal error';
      return new Response(JSON.stringify({ error: { code: 'X', message } }), { status: this.streamStatus });
    }
    const encoder = new TextEncoder();
    let controller;
    const body = new ReadableStream({ start: (c) => (controller = c) });
    const stream = {
      request,
      aborted: false,
      write: (text) => controller.enqueue(encoder.encode(text)),
      send: (message) => stream.write(`data:${JSON.stringify(message)}\n${message.version === undefined ? '' : `id:${message.version}\n`}\n`),
      end: () => controller.close(),
    };
    init.signal?.addEventListener('abort', () => {
      stream.aborted = true;
      controller.error(new DOMException('aborted', 'AbortError'));
    });
    this.streams.push(stream);
    return new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } });
  }
}

/** Lets fetch promises, stream reads and microtasks run. */
async function settle() {
  for (let i = 0; i < 10; i++) await new Promise((resolve) => setImmediate(resolve));
}

const CONNECTED = (connectionId, role = 'viewer', version = 5) => ({
  type: 'connected',
  portalViewId: 'demo',
  connectionId,
  userId: role === 'controller' ? 'alice' : 'carol',
  role,
  state: structuredClone(STATE),
  version,
  presence: { controllers: 1, viewers: 1, connections: 2 },
});

/** A client on a scripted WebSocket and a scripted HTTP server, not started yet. */
function newClient(options = {}) {
  FakeSocket.all = [];
  const http = new FakeHttp();
  const client = new PortalClient({
    view: 'demo',
    token: 'tok en',
    origin: 'http://127.0.0.1:3000',
    WebSocket: FakeSocket,
    fetch: http.fetch,
    random: () => 0,
    ...options,
  });
  const statuses = [];
  client.addEventListener('status', (e) => statuses.push(e.detail));
  return { client, http, statuses };
}

/** A started client whose socket has received `connected` as `role` at version 5. */
function connectedClient(role, { fetch } = {}) {
  const { client, statuses } = newClient({ fetch: fetch ?? (() => Promise.reject(new Error('no fetch in this test'))) });
  client.start();
  const socket = FakeSocket.all[0];
  socket.deliver(CONNECTED('c1', role));
  return { client, socket, statuses };
}

const broadcast = (version, payload, type = 'portal-view-update') => ({ type, payload, version, from: { userId: 'bob', connectionId: 'c2' } });

describe('pure helpers', () => {
  test('mergePatch follows RFC 7386', () => {
    const cases = [
      [{ a: 'b' }, { a: 'c' }, { a: 'c' }],
      [{ a: 'b' }, { b: 'c' }, { a: 'b', b: 'c' }],
      [{ a: 'b', b: 'c' }, { a: null }, { b: 'c' }],
      [{ a: ['b'] }, { a: 'c' }, { a: 'c' }],
      [{ a: { b: 'c' } }, { a: { b: 'd', c: null } }, { a: { b: 'd' } }],
      [['a', 'b'], ['c', 'd'], ['c', 'd']],
      [{ a: 'b' }, ['c'], ['c']],
      [{ e: null }, { a: 1 }, { e: null, a: 1 }],
      [[1, 2], { a: 'b', c: null }, { a: 'b' }],
      [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
    ];
    for (const [target, patch, expected] of cases) {
      const copy = structuredClone(target);
      assert.deepEqual(mergePatch(target, patch), expected, `${JSON.stringify(target)} + ${JSON.stringify(patch)}`);
      assert.deepEqual(target, copy, 'the target is not mutated');
    }
  });

  test('an item-update is a merge of the rest into state.items[itemId]', () => {
    assert.deepEqual(changeOf('item-update', { itemId: 7, title: 'x' }), { kind: 'merge', patch: { items: { 7: { title: 'x' } } } });
    assert.deepEqual(mergePatch({ items: 'junk' }, changeOf('item-update', { itemId: 'a', t: 1 }).patch), { items: { a: { t: 1 } } });
    assert.equal(changeOf('item-update', { title: 'no id' }), null);
    assert.equal(changeOf('ping', undefined), null);
    assert.equal(changeOf('sync-response', [1]), null);
  });

  test('reconnect after every close but 1000 and 1008 (except a live access revoked)', () => {
    for (const code of [1001, 1006, 1011, 1013, 1003, 1009, 1002]) assert.equal(shouldReconnect(code, '', true), true, `${code}`);
    assert.equal(shouldReconnect(1000, '', true), false);
    for (const reason of ['invalid token', 'token expired', 'access denied', 'too many connections', 'rate limit exceeded']) {
      assert.equal(shouldReconnect(1008, reason, true), false, reason);
    }
    assert.equal(shouldReconnect(1008, 'access revoked', true), true);
    assert.equal(shouldReconnect(1008, 'access revoked', false), false, 'a refused handshake never loops');
  });

  test('backoff doubles with jitter up to the cap', () => {
    for (let attempt = 0; attempt < 12; attempt += 1) {
      const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** attempt);
      assert.equal(backoffMs(attempt, () => 0), ceiling / 2);
      assert.equal(backoffMs(attempt, () => 1), ceiling);
    }
    assert.equal(backoffMs(40, () => 1), RECONNECT_CAP_MS);
  });
});

describe('PortalClient', () => {
  test('connects with the token in the query and takes state, version and role from connected', () => {
    const { client, socket, statuses } = connectedClient('viewer');
    assert.equal(socket.url, 'ws://127.0.0.1:3000/ws/portal-view/demo?token=tok%20en');
    assert.equal(client.status, 'live');
    assert.equal(client.role, 'viewer');
    assert.equal(client.version, 5);
    assert.deepEqual(client.state, STATE);
    assert.deepEqual(statuses.map((s) => s.status), ['connecting', 'live']);
  });

  test('applies broadcasts in order and ignores versions it already has', () => {
    const { client, socket } = connectedClient('viewer');
    socket.deliver(broadcast(6, { currentItem: '2' }));
    socket.deliver(broadcast(7, { itemId: '2', title: 'Deux' }, 'item-update'));
    socket.deliver(broadcast(6, { currentItem: '1' }));
    socket.deliver(broadcast(7, { currentItem: '1' }));
    assert.equal(client.version, 7);
    assert.equal(client.state.currentItem, '2');
    assert.equal(client.state.items['2'].title, 'Deux');
    assert.deepEqual(socket.sent, [], 'in order: nothing to ask');
  });

  test('a viewer that sees a gap sends request-sync, holds later changes, and catches up from the answer', () => {
    const { client, socket } = connectedClient('viewer');
    socket.deliver(broadcast(7, { currentItem: '2' })); // 6 is missing
    assert.equal(client.version, 5, 'not applied across the gap');
    assert.deepEqual(socket.sent.map((m) => m.type), ['request-sync']);
    socket.deliver(broadcast(8, { visible: false }));
    assert.equal(socket.sent.length, 1, 'one request per gap');
    // The server answers itself (no controller online) with the state at 7.
    socket.deliver({ type: 'sync-response', payload: { ...STATE, currentItem: '2' }, version: 7, source: 'server', id: socket.sent[0].id });
    assert.equal(client.version, 8, 'the held change 8 follows the snapshot at 7');
    assert.equal(client.state.currentItem, '2');
    assert.equal(client.state.visible, false);
  });

  test("a controller that sees a gap re-reads the view over REST with its bearer token", async () => {
    const calls = [];
    let answer;
    const fetch = (url, init) => {
      calls.push({ url, init });
      return new Promise((resolve) => (answer = resolve));
    };
    const { client, socket } = connectedClient('controller', { fetch });
    socket.deliver(broadcast(7, { currentItem: '2' }));
    assert.equal(calls.length, 1);
    assert.equal(calls[0].url, 'http://127.0.0.1:3000/api/portal-views/demo');
    assert.equal(calls[0].init.headers.Authorization, 'Bearer tok en');
    assert.equal(socket.sent.length, 0, 'controllers may not send request-sync');
    socket.deliver(broadcast(8, { visible: false }));
    answer({ ok: true, json: async () => ({ state: { ...STATE, currentItem: '2' }, version: 7 }) });
    await new Promise((r) => setImmediate(r));
    assert.equal(client.version, 8);
    assert.equal(client.state.currentItem, '2');
    assert.equal(client.state.visible, false);
  });

  test('own changes show at once, are confirmed by their ack, and are undone by an error', async () => {
    const { client, socket } = connectedClient('controller');
    const accepted = client.updateView({ currentItem: '2' });
    assert.equal(client.state.currentItem, '2', 'shown before the ack');
    assert.equal(client.version, 5);
    const sent = socket.sent.at(-1);
    assert.equal(sent.type, 'portal-view-update');
    socket.deliver({ type: 'ack', id: sent.id, version: 6 });
    assert.deepEqual(await accepted, { version: 6 });
    assert.equal(client.version, 6);

    const refused = client.updateItem('1', { title: 'Nope' });
    assert.equal(client.state.items['1'].title, 'Nope');
    socket.deliver({ type: 'error', code: 'BAD_REQUEST', message: 'no', id: socket.sent.at(-1).id });
    await assert.rejects(refused, { code: 'BAD_REQUEST' });
    assert.equal(client.state.items['1'].title, 'One', 'reverted');
    assert.equal(client.version, 6);
  });

  test('a broadcast that lands between a send and its ack comes first, as on the server', () => {
    const { client, socket } = connectedClient('controller');
    client.updateView({ currentItem: '2' });
    socket.deliver(broadcast(6, { currentItem: '1', visible: false })); // committed before ours
    assert.equal(client.state.currentItem, '2', 'our pending change still shows on top');
    socket.deliver({ type: 'ack', id: socket.sent.at(-1).id, version: 7 });
    assert.equal(client.version, 7);
    assert.deepEqual({ c: client.state.currentItem, v: client.state.visible }, { c: '2', v: false });
  });

  test('a controller answers a burst of request-sync with one sync-response of its state', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, socket } = connectedClient('controller');
    socket.deliver({ type: 'request-sync', from: { userId: 'carol', connectionId: 'c3' } });
    socket.deliver({ type: 'request-sync', from: { userId: 'dave', connectionId: 'c4' } });
    t.mock.timers.tick(1000);
    const answers = socket.sent.filter((m) => m.type === 'sync-response');
    assert.equal(answers.length, 1);
    assert.deepEqual(answers[0].payload, client.state);
  });

  test('reconnects with backoff after 1006 and re-syncs from the new connected', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, socket, statuses } = connectedClient('viewer');
    const pending = client.send('ping');
    socket.drop(1006);
    assert.equal(client.status, 'reconnecting');
    assert.deepEqual(statuses.at(-1), { status: 'reconnecting', code: 1006, reason: '', delayMs: RECONNECT_BASE_MS / 2, transport: 'websocket' });
    t.mock.timers.tick(RECONNECT_BASE_MS / 2 - 1);
    assert.equal(FakeSocket.all.length, 1, 'waits out the backoff');
    t.mock.timers.tick(1);
    assert.equal(FakeSocket.all.length, 2);
    const second = FakeSocket.all[1];
    second.deliver({ type: 'connected', role: 'viewer', userId: 'carol', state: { currentItem: '9' }, version: 42, presence: {} });
    assert.equal(client.status, 'live');
    assert.equal(client.version, 42);
    assert.deepEqual(client.state, { currentItem: '9' });
    // A late message from the old socket changes nothing.
    socket.deliver(broadcast(43, { currentItem: 'old' }));
    assert.equal(client.version, 42);
    return pending;
  });

  test('does not reconnect after 1008, and keeps the reason', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, socket, statuses } = connectedClient('viewer');
    socket.drop(1008, 'token expired');
    t.mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(client.status, 'closed');
    assert.deepEqual(statuses.at(-1), { status: 'closed', code: 1008, reason: 'token expired', delayMs: null, transport: 'websocket' });
  });

  test('unacked changes are rejected when the connection drops', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, socket } = connectedClient('controller');
    const change = client.updateView({ currentItem: '2' });
    socket.drop(1011, 'internal error');
    await assert.rejects(change, { code: 'OFFLINE' });
    assert.equal(client.state.currentItem, '1', 'the unconfirmed change is no longer shown');
    await assert.rejects(client.updateView({ currentItem: '2' }), { code: 'OFFLINE' });
  });

  test('presence events keep the audience and the counts', () => {
    const { client, socket } = connectedClient('controller');
    assert.deepEqual([...client.audience], [['alice', 'controller']]);
    socket.deliver({ type: 'presence', joined: [{ userId: 'carol', role: 'viewer' }], left: [], presence: { controllers: 1, viewers: 1, connections: 2 } });
    assert.deepEqual([...client.audience.keys()], ['alice', 'carol']);
    socket.deliver({ type: 'presence', joined: [], left: [{ userId: 'carol', role: 'viewer' }], presence: { controllers: 1, viewers: 0, connections: 1 } });
    assert.deepEqual([...client.audience.keys()], ['alice']);
    assert.deepEqual(client.presence, { controllers: 1, viewers: 0, connections: 1 });
  });

  test('a re-sync nobody answers ends in a reconnect, whose connected brings the state', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, socket } = connectedClient('viewer');
    socket.deliver(broadcast(9, { currentItem: '2' }));
    t.mock.timers.tick(5000);
    assert.equal(socket.closedWith?.code, 4000);
    t.mock.timers.tick(0);
    assert.equal(FakeSocket.all.length, 2, 'reconnected at once');
    assert.equal(client.status, 'reconnecting');
  });
});

describe('the HTTP fallback (SSE + POST)', () => {
  test('the SSE parser gives the same events however the stream is cut', () => {
    const text = ': keep-alive\r\ndata:{"type":"connected","version":1}\r\nid:1\r\n\r\ndata: two\rdata:lines\r\r:c\n\nevent:x\ndata\n\n';
    const whole = new SseParser();
    const expected = whole.feed(text);
    assert.deepEqual(expected, [
      { data: '{"type":"connected","version":1}', id: '1', event: 'message' },
      { data: 'two\nlines', id: '1', event: 'message' },
      { data: '', id: '1', event: 'x' },
    ]);
    assert.equal(whole.comments, 2);
    for (const size of [1, 2, 3, 7]) {
      const parser = new SseParser();
      const events = [];
      for (let i = 0; i < text.length; i += size) events.push(...parser.feed(text.slice(i, i + size)));
      assert.deepEqual(events, expected, `chunks of ${size}`);
    }
  });

  test('a refused stream is the close a WebSocket would have got', () => {
    assert.deepEqual(closeOfStatus(401, 'token expired'), { code: 1008, reason: 'token expired' });
    for (const status of [403, 404, 429]) assert.equal(closeOfStatus(status, 'x').code, 1008);
    assert.deepEqual(closeOfStatus(503, ''), { code: 1001, reason: 'shutting down' });
    assert.equal(closeOfStatus(500, 'internal error').code, 1011);
    assert.equal(closeOfStatus(502, '').code, 1011, "a proxy's error is worth a retry");
  });

  test('after two WebSocket attempts fail it streams over SSE with the token in a header, and POSTs its messages', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http, statuses } = newClient();
    client.start();
    FakeSocket.all[0].drop(1006);
    t.mock.timers.tick(RECONNECT_BASE_MS);
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(client.transport, 'websocket', 'one failure is not enough');
    FakeSocket.all[1].drop(1006);
    assert.equal(client.transport, 'sse');
    t.mock.timers.tick(RECONNECT_BASE_MS * 2);
    await settle();
    assert.equal(FakeSocket.all.length, 2, 'no third WebSocket');
    assert.equal(http.streams.length, 1);
    const { request } = http.streams[0];
    assert.equal(request.url, 'http://127.0.0.1:3000/sse/portal-view/demo');
    assert.equal(request.headers.Authorization, 'Bearer tok en');

    const stream = http.streams[0];
    stream.write(': keep-alive\n\n');
    stream.send(CONNECTED('c9', 'controller'));
    stream.send(broadcast(6, { currentItem: '2' }));
    await settle();
    assert.equal(client.status, 'live');
    assert.deepEqual(statuses.at(-1), { status: 'live', code: null, reason: '', delayMs: null, transport: 'sse' });
    assert.equal(client.version, 6);
    assert.equal(client.state.currentItem, '2');

    const first = client.updateView({ currentItem: '1' });
    const second = client.updateItem('2', { title: 'Zwei' });
    await settle();
    assert.equal(http.posts.length, 1, 'one POST at a time: the second waits for the first answer');
    const post = http.posts[0];
    assert.equal(post.request.url, 'http://127.0.0.1:3000/api/portal-views/demo/messages');
    assert.equal(post.request.headers['X-Connection-Id'], 'c9');
    assert.equal(post.request.headers.Authorization, 'Bearer tok en');
    assert.equal(post.request.headers['Content-Type'], 'application/json');
    assert.deepEqual(post.message, { type: 'portal-view-update', payload: { currentItem: '1' }, id: 1 });
    assert.equal(client.state.currentItem, '1', 'shown before the ack');
    post.answer(200, { type: 'ack', id: 1, version: 7 });
    assert.deepEqual(await first, { version: 7 });
    await settle();
    assert.equal(http.posts.length, 2);
    assert.equal(http.posts[1].message.type, 'item-update');
    http.posts[1].answer(403, { type: 'error', code: 'FORBIDDEN', message: 'not allowed', id: 2 });
    await assert.rejects(second, { code: 'FORBIDDEN' });
    assert.equal(client.version, 7);
    assert.equal(client.state.items['2'].title, 'Two', 'the refused change is undone');
  });

  test('the closed event ends the stream with its code: token expired stops, a slow consumer retries', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http, statuses } = newClient({ transport: 'sse' });
    client.start();
    await settle();
    http.streams[0].send(CONNECTED('c1'));
    http.streams[0].send({ type: 'closed', code: 1013, reason: 'slow consumer' });
    http.streams[0].end();
    await settle();
    assert.deepEqual(statuses.at(-1), { status: 'reconnecting', code: 1013, reason: 'slow consumer', delayMs: RECONNECT_BASE_MS / 2, transport: 'sse' });
    t.mock.timers.tick(RECONNECT_BASE_MS / 2);
    await settle();
    assert.equal(http.streams.length, 2);
    http.streams[1].send(CONNECTED('c2'));
    http.streams[1].send({ type: 'closed', code: 1008, reason: 'token expired' });
    http.streams[1].end();
    await settle();
    assert.equal(client.status, 'closed');
    assert.deepEqual(client.lastClose, { code: 1008, reason: 'token expired' });
    t.mock.timers.tick(60_000);
    await settle();
    assert.equal(http.streams.length, 2, 'no retry after 1008');
    assert.equal(FakeSocket.all.length, 0, 'transport: sse never opens a WebSocket');
  });

  test('a refused stream stops with the reason (401) or retries (500); a stream cut without closed is a 1006', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http, statuses } = newClient({ transport: 'sse' });
    http.streamStatus = 500;
    client.start();
    await settle();
    assert.equal(statuses.at(-1).code, 1011);
    assert.equal(client.status, 'reconnecting');
    http.streamStatus = 200;
    t.mock.timers.tick(RECONNECT_BASE_MS / 2);
    await settle();
    http.streams[0].send(CONNECTED('c1'));
    await settle();
    assert.equal(client.status, 'live');
    http.streams[0].end();
    await settle();
    assert.deepEqual(client.lastClose, { code: 1006, reason: '' });
    http.streamStatus = 401;
    t.mock.timers.tick(RECONNECT_BASE_MS / 2);
    await settle();
    assert.equal(client.status, 'closed');
    assert.deepEqual(client.lastClose, { code: 1008, reason: 'invalid token' });
  });

  test('a POST whose answer is not a protocol message ends the link, and unacked changes are rejected', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http } = newClient({ transport: 'sse' });
    client.start();
    await settle();
    http.streams[0].send(CONNECTED('c1', 'controller'));
    await settle();
    const change = client.updateView({ currentItem: '2' });
    await settle();
    http.posts[0].answer(400, { error: { code: 'BAD_REQUEST', message: 'X-Connection-Id does not name an open SSE stream of yours on this view' } });
    await assert.rejects(change, { code: 'OFFLINE' });
    await settle();
    assert.equal(client.status, 'reconnecting');
    assert.equal(client.lastClose.code, 1011);
    assert.ok(http.streams[0].aborted, 'the stream is closed');
  });

  test('a server restart on a page whose WebSocket worked takes four failures before falling back', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http } = newClient();
    client.start();
    FakeSocket.all[0].deliver(CONNECTED('c1'));
    FakeSocket.all[0].drop(1001, 'server shutting down');
    for (let i = 1; i < WS_FAILURES_AFTER_LIVE; i++) {
      t.mock.timers.tick(RECONNECT_CAP_MS);
      FakeSocket.all[i].drop(1006);
      assert.equal(client.transport, 'websocket', `after ${i} failures`);
    }
    t.mock.timers.tick(RECONNECT_CAP_MS);
    FakeSocket.all[WS_FAILURES_AFTER_LIVE].drop(1006);
    assert.equal(client.transport, 'sse');
    assert.equal(http.requests.length, 0);
  });

  test('transport: websocket never falls back, and a 1008 stops the client instead of falling back', (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client } = newClient({ transport: 'websocket' });
    client.start();
    for (let i = 0; i < 5; i++) {
      FakeSocket.all.at(-1).drop(1006);
      t.mock.timers.tick(RECONNECT_CAP_MS);
    }
    assert.equal(client.transport, 'websocket', 'transport: websocket never falls back');
    const auto = newClient().client;
    auto.start();
    FakeSocket.all[0].drop(1008, 'access denied');
    assert.equal(auto.status, 'closed');
    assert.equal(auto.transport, 'websocket');
  });

  test('on the fallback it tries a WebSocket every probe interval, and one that connects replaces the stream', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const { client, http, statuses } = newClient({ probeIntervalMs: 1000 });
    client.start();
    FakeSocket.all[0].drop(1006);
    t.mock.timers.tick(RECONNECT_BASE_MS);
    FakeSocket.all[1].drop(1006);
    t.mock.timers.tick(RECONNECT_BASE_MS * 2);
    await settle();
    const stream = http.streams[0];
    stream.send(CONNECTED('c1', 'controller'));
    await settle();
    assert.equal(client.transport, 'sse');

    t.mock.timers.tick(999);
    assert.equal(FakeSocket.all.length, 2);
    t.mock.timers.tick(1);
    assert.equal(FakeSocket.all.length, 3, 'the first probe');
    FakeSocket.all[2].drop(1006);
    assert.equal(client.transport, 'sse', 'a failed probe changes nothing');
    t.mock.timers.tick(1000);
    const probe = FakeSocket.all[3];
    assert.ok(probe, 'the next probe, an interval later');

    // A change is in flight over POST when the probe gets in: it waits for the answer.
    const change = client.updateView({ currentItem: '2' });
    await settle();
    probe.deliver(CONNECTED('c7', 'controller', 6));
    probe.deliver(broadcast(7, { currentItem: '2' }));
    assert.equal(client.transport, 'sse', 'not while a change awaits its ack');
    assert.equal(stream.aborted, false);
    http.posts[0].answer(200, { type: 'ack', id: 1, version: 6 });
    assert.deepEqual(await change, { version: 6 });
    await settle();
    assert.equal(client.transport, 'websocket');
    assert.ok(stream.aborted, 'the stream is closed');
    assert.equal(client.connectionId, 'c7');
    assert.equal(client.version, 7, "the probe's connected plus what followed it");
    assert.equal(client.state.currentItem, '2');
    assert.deepEqual(statuses.at(-1), { status: 'live', code: null, reason: '', delayMs: null, transport: 'websocket' });
    probe.deliver(broadcast(8, { currentItem: '1' }));
    assert.equal(client.version, 8);
    t.mock.timers.tick(10_000);
    assert.equal(FakeSocket.all.length, 4, 'no probes once back on a WebSocket');
  });
});

/** A JWT-shaped token with `exp` (its signature is not checked by the client). */
function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}.c2ln`;
}

describe('token refresh (SPEC §9)', () => {
  const NOW = 1_800_000_000_000;
  const OLD = jwt({ sub: 'carol', exp: NOW / 1000 + 30 });
  const NEW = jwt({ sub: 'carol', exp: NOW / 1000 + 3600 });

  /** A live viewer whose token is OLD, with `getToken` giving `next`. */
  function refreshingClient(getToken, now = () => NOW) {
    const { client, statuses } = newClient({ token: OLD, getToken, now });
    const tokens = [];
    client.addEventListener('token', (e) => tokens.push(e.detail));
    client.start();
    const socket = FakeSocket.all[0];
    socket.deliver(CONNECTED('c1'));
    return { client, socket, statuses, tokens };
  }

  test('tokenExp reads exp from the payload without checking the signature', () => {
    assert.equal(tokenExp(OLD), NOW / 1000 + 30);
    assert.equal(tokenExp(jwt({ sub: 'x', exp: 1.5e9, name: 'é?>' })), 1.5e9);
    for (const bad of ['', 'abc', 'a.b.c', jwt({ sub: 'x' }), jwt({ exp: '12' }), null, 42]) assert.equal(tokenExp(bad), null, String(bad));
  });

  test('token-expiring calls getToken and sends refresh-token; token-refreshed moves the client onto the new token', async () => {
    let calls = 0;
    const { client, socket, tokens } = refreshingClient(() => {
      calls += 1;
      return Promise.resolve(NEW);
    });
    assert.equal(client.tokenExp, NOW / 1000 + 30);
    socket.deliver({ type: 'token-expiring', exp: NOW / 1000 + 30 });
    await settle();
    assert.equal(calls, 1);
    const sent = socket.sent.at(-1);
    assert.deepEqual(sent, { type: 'refresh-token', token: NEW, id: sent.id });
    assert.equal(client.token, OLD, 'the old token until the server agrees');
    socket.deliver({ type: 'token-refreshed', exp: NOW / 1000 + 3599, id: sent.id });
    assert.equal(client.token, NEW);
    assert.equal(client.tokenExp, NOW / 1000 + 3599, "the server's exp wins");
    assert.equal(client.wsUrl, `ws://127.0.0.1:3000/ws/portal-view/demo?token=${NEW}`);
    assert.deepEqual(tokens.map((t) => t.status), ['expiring', 'refreshing', 'refreshed']);
    assert.equal(tokens[2].exp, NOW / 1000 + 3599);
  });

  test('a BAD_REQUEST answer to refresh-token is surfaced and the old token kept', async () => {
    const { client, socket, tokens } = refreshingClient(() => NEW);
    const replies = [];
    client.addEventListener('reply', (e) => replies.push(e.detail));
    const refresh = client.refreshToken(NEW);
    assert.equal(client.refreshToken(NEW), refresh, 'the same token in flight is one message');
    const sent = socket.sent.filter((m) => m.type === 'refresh-token');
    assert.equal(sent.length, 1);
    socket.deliver({ type: 'error', code: 'BAD_REQUEST', message: 'token is for another user', id: sent[0].id });
    await assert.rejects(refresh, { code: 'BAD_REQUEST', message: 'token is for another user' });
    assert.equal(client.token, OLD);
    assert.equal(client.tokenExp, NOW / 1000 + 30);
    assert.deepEqual(tokens.at(-1), { status: 'refused', exp: NOW / 1000 + 30, code: 'BAD_REQUEST', message: 'token is for another user' });
    assert.deepEqual(replies, [], 'told as a token event, not as a refused message');
    assert.equal(client.status, 'live');
  });

  test('a reconnect whose token has expired asks getToken first and connects with its token', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    let now = NOW;
    let calls = 0;
    const { socket } = refreshingClient(() => {
      calls += 1;
      return NEW;
    }, () => now);
    socket.drop(1006);
    t.mock.timers.tick(RECONNECT_BASE_MS);
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(calls, 0, 'a token still valid is used as it is');
    assert.equal(FakeSocket.all[1].url, `ws://127.0.0.1:3000/ws/portal-view/demo?token=${OLD}`);
    FakeSocket.all[1].deliver(CONNECTED('c2'));

    now = NOW + 30_000; // exp is now: expired (SPEC §2, no leeway)
    FakeSocket.all[1].drop(1006);
    t.mock.timers.tick(RECONNECT_BASE_MS);
    await settle();
    assert.equal(calls, 1);
    assert.equal(FakeSocket.all.length, 3);
    assert.equal(FakeSocket.all[2].url, `ws://127.0.0.1:3000/ws/portal-view/demo?token=${NEW}`);
  });

  test('a session closed for token expired reconnects with a token from getToken; without a new one it stops', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const given = [NEW, NEW];
    const { client, socket, statuses } = refreshingClient(() => given.shift());
    socket.drop(1008, 'token expired');
    assert.equal(client.status, 'reconnecting');
    t.mock.timers.tick(RECONNECT_BASE_MS);
    await settle();
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(FakeSocket.all[1].url, `ws://127.0.0.1:3000/ws/portal-view/demo?token=${NEW}`);
    FakeSocket.all[1].deliver(CONNECTED('c2'));
    assert.equal(client.status, 'live');

    // The hook has nothing better than the token the server just called expired.
    FakeSocket.all[1].drop(1008, 'token expired');
    t.mock.timers.tick(60_000);
    await settle();
    assert.equal(FakeSocket.all.length, 2, 'no attempt with a token the server called expired');
    assert.equal(client.status, 'closed');
    assert.deepEqual(statuses.at(-1), { status: 'closed', code: 1008, reason: 'token expired', delayMs: null, transport: 'websocket' });
  });
});
