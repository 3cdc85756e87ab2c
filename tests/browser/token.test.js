// The session banner of the presenter and viewer pages (SPEC §9): it appears
// when the token's end is near, a pasted token goes out as refresh-token, a
// refusal is shown and the old token kept, and on token-refreshed the page
// carries on without a reload and a reload uses the new token.
//
// The first two tests inject the server's §9 messages into the page's socket
// (as pages.test.js does for presence), so they check the pages against the
// wire format whatever this server implements. The last one needs the
// server's side (`--token-warning`): it runs when the binary has that flag.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PortalClient } from '../../web/client.js';
import { byTestId, eventually, routeSocket, run, screenshot, sharedBrowser, text, waitStatus, waitText, withServer } from './harness.js';

const TEST = { timeout: 90_000 };
const { open } = sharedBrowser();
const SERVER_HAS_REFRESH = (await run(['serve', '--help'])).includes('--token-warning');

const expOf = (token) => JSON.parse(Buffer.from(token.split('.')[1], 'base64url')).exp;
const storedToken = (page) => page.evaluate(() => JSON.parse(sessionStorage.getItem('portal-sync:credentials')).token);

/**
 * A page whose socket runs through the test; the server's answers to the
 * page's refresh-token messages are held back, so that the test plays the
 * server's §9 side.
 */
async function tappedPage(pages, url) {
  let tap;
  const record = await open(pages, url, {
    before: async (page) => {
      tap = await routeSocket(page, {
        dropFromServer: (m) => m.id !== undefined && tap.fromPage.some((sent) => sent.type === 'refresh-token' && sent.id === m.id),
      });
    },
  });
  return { ...record, tap };
}

test('the presenter shows the banner when its token is near its end, shows a refusal, and carries on with a refreshed token', TEST, () =>
  withServer(async (server, pages) => {
    // 61 s: the page's own warning (60 s before exp) is due within a second.
    const short = await server.token('alice', '61s');
    const presenter = await tappedPage(pages, `${server.base}/presenter#token=${short}&view=demo`);
    const { page, tap } = presenter;
    await waitStatus(page, 'live');
    await page.evaluate(() => (window.sameDocument = true));
    const banner = byTestId(page, 'token-banner');
    await banner.waitFor({ state: 'visible', timeout: 5000 });
    assert.match(await text(page, 'token-banner-ends'), /^Your session ends at .+ \(in \d+ s\)\.$/);
    assert.match(await banner.textContent(), /Make one on the server with portal-sync token --user alice\./);
    await screenshot(page, 'presenter-token-banner.png');

    // A refused token: shown, the old one kept.
    await byTestId(page, 'token-banner-input').fill('not-a-token');
    await byTestId(page, 'token-banner-submit').click();
    const first = await eventually(() => tap.fromPage.find((m) => m.type === 'refresh-token'), { what: 'a refresh-token' });
    assert.deepEqual(first, { type: 'refresh-token', token: 'not-a-token', id: first.id });
    tap.routes.at(-1).send(JSON.stringify({ type: 'error', code: 'BAD_REQUEST', message: 'invalid token', id: first.id }));
    await waitText(page, 'token-banner-note', 'The server refused that token: invalid token. The session keeps its old token.');
    assert.equal(await banner.isVisible(), true);
    assert.equal(await page.evaluate(() => window.portal.client.token), short);

    // A good one: sent, answered token-refreshed, banner gone, the page goes on.
    const fresh = await server.token('alice', '1h');
    await byTestId(page, 'token-banner-input').fill(fresh);
    await byTestId(page, 'token-banner-submit').click();
    const second = await eventually(() => tap.fromPage.find((m) => m.type === 'refresh-token' && m.token === fresh), { what: 'the second refresh-token' });
    tap.routes.at(-1).send(JSON.stringify({ type: 'token-refreshed', exp: expOf(fresh), id: second.id }));
    await banner.waitFor({ state: 'hidden' });
    assert.equal(await storedToken(page), fresh, 'a reload will sign in with the new token');
    assert.equal(await page.evaluate(() => window.portal.client.tokenExp), expOf(fresh));
    assert.equal(await byTestId(page, 'status').getAttribute('data-state'), 'live');
    assert.equal(await page.evaluate(() => window.sameDocument), true, 'no reload');
    assert.ok(!page.url().includes('token'), 'the token stays out of the address bar');
    assert.equal(presenter.sockets.length, 1, 'the same connection');

    await page.reload();
    await waitStatus(page, 'live');
    assert.ok(presenter.sockets.at(-1).url().endsWith(`token=${encodeURIComponent(fresh)}`), 'the reload connected with the new token');
    assert.equal(await banner.count(), 0, 'no banner for an hour-long token');
  }),
);

test("the viewer page shows the banner on the server's token-expiring and hides it on token-refreshed", TEST, () =>
  withServer(async (server, pages) => {
    const viewer = await tappedPage(pages, server.users.carol.viewer);
    const { page, tap } = viewer;
    await waitStatus(page, 'live');
    assert.equal(await byTestId(page, 'token-banner').count(), 0, 'nothing to paste into while the token is good');
    const exp = Math.floor(Date.now() / 1000) + 30;
    tap.routes.at(-1).send(JSON.stringify({ type: 'token-expiring', exp }));
    await byTestId(page, 'token-banner').waitFor({ state: 'visible' });
    assert.match(await byTestId(page, 'token-banner').textContent(), /portal-sync token --user carol/);
    const fresh = await server.token('carol', '2h');
    await byTestId(page, 'token-banner-input').fill(fresh);
    await byTestId(page, 'token-banner-submit').click();
    const sent = await eventually(() => tap.fromPage.find((m) => m.type === 'refresh-token'), { what: 'a refresh-token' });
    assert.equal(sent.token, fresh);
    tap.routes.at(-1).send(JSON.stringify({ type: 'token-refreshed', exp: expOf(fresh), id: sent.id }));
    await byTestId(page, 'token-banner').waitFor({ state: 'hidden' });
    assert.equal(await storedToken(page), fresh);
    // The viewer still follows the presenter.
    await server.patch({ currentItem: '3' });
    await waitText(page, 'item-title', 'Questions?');
  }),
);

test(
  'against the real server: a presenter on a 6 s token is refused a bad token, pastes a good one and stays live past the first expiry',
  { ...TEST, skip: SERVER_HAS_REFRESH ? false : 'the binary has no --token-warning yet (SPEC §9 server side, branch h-refresh)' },
  () =>
    withServer(
      async (server, pages) => {
        const viewer = await open(pages, server.users.carol.viewer);
        const short = await server.token('alice', '6s');
        const presenter = await open(pages, `${server.base}/presenter#token=${short}&view=demo`);
        const p = presenter.page;
        await waitStatus(p, 'live');
        await waitStatus(viewer.page, 'live');
        // The page's own warning (60 s ahead) is up at once; the server's refusal of a bad token shows in it.
        await byTestId(p, 'token-banner').waitFor({ state: 'visible', timeout: 5000 });
        await byTestId(p, 'token-banner-input').fill(await server.token('bob', '1h'));
        await byTestId(p, 'token-banner-submit').click();
        await eventually(async () => /^The server refused that token: .+\. The session keeps its old token\.$/.test(await text(p, 'token-banner-note')), {
          what: 'the refusal of a token for another user',
        });
        assert.equal(presenter.received.find((m) => m.type === 'error')?.code, 'BAD_REQUEST');
        // token-expiring comes 3 s before the end.
        await eventually(() => presenter.received.some((m) => m.type === 'token-expiring' && m.exp === expOf(short)), { timeout: 5000, what: "the server's token-expiring" });
        const fresh = await server.token('alice', '1h');
        await byTestId(p, 'token-banner-input').fill(fresh);
        await byTestId(p, 'token-banner-submit').click();
        await byTestId(p, 'token-banner').waitFor({ state: 'hidden' });
        const refreshed = presenter.received.find((m) => m.type === 'token-refreshed');
        assert.equal(refreshed?.exp, expOf(fresh));

        // Past the first token's expiry: the same connection, still driving the viewer.
        await eventually(() => Date.now() / 1000 > expOf(short) + 1, { timeout: 8000, what: 'the first token expired' });
        assert.equal(await byTestId(p, 'status').getAttribute('data-state'), 'live');
        assert.equal(presenter.sockets.length, 1, 'not reconnected');
        assert.ok(!presenter.received.some((m) => m.type === 'closed'), 'no close');
        await byTestId(p, 'next').click();
        await waitText(viewer.page, 'item-title', 'How it works');
        assert.equal((await server.view()).state.currentItem, '2');
      },
      { args: ['--token-warning', '3'] },
    ),
);

test(
  "against the real server: client.js on SSE + POST refreshes through its getToken hook on token-expiring and outlives the first token",
  { ...TEST, skip: SERVER_HAS_REFRESH ? false : 'the binary has no --token-warning yet (SPEC §9 server side, branch h-refresh)' },
  () =>
    withServer(
      async (server, pages, clients) => {
        const short = await server.token('carol', '4s');
        const fresh = await server.token('carol', '1h');
        let asked = 0;
        const client = new PortalClient({
          view: 'demo',
          token: short,
          origin: server.base,
          transport: 'sse',
          getToken: async () => {
            asked += 1;
            return fresh;
          },
        });
        const events = [];
        client.addEventListener('token', (e) => events.push(e.detail.status));
        clients.push(client);
        client.start();
        await eventually(() => client.status === 'live', { what: 'live on SSE' });
        const link = client.socket;
        await eventually(() => client.token === fresh, { timeout: 5000, what: 'the refreshed token' });
        assert.equal(asked, 1);
        assert.deepEqual(events, ['expiring', 'refreshing', 'refreshed']);
        assert.equal(client.tokenExp, expOf(fresh));
        assert.equal(link.token, fresh, 'the POSTs carry the new token');
        await eventually(() => Date.now() / 1000 > expOf(short) + 1, { timeout: 8000, what: 'the first token expired' });
        assert.equal(client.status, 'live');
        assert.equal(client.socket, link, 'the same stream');
        // A viewer's message still goes through on the old stream with the new token.
        await client.send('ping');
        const stored = await server.patch({ currentItem: '2' });
        await eventually(() => client.version === stored.version, { what: 'the update on the stream' });
      },
      { args: ['--token-warning', '2'] },
    ),
);
