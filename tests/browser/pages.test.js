// The presenter and viewer pages in a real headless Chromium against the real
// binary (`portal-sync demo` on a free port, temp database). Each test starts
// its own server, opens the links the demo printed, and checks what a person
// would see, then what the server stored (REST), so a page that only looks
// right is not enough.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  byTestId,
  eventually,
  routeSocket,
  screenshot,
  sharedBrowser,
  shownVersion,
  text,
  waitStatus,
  waitText,
  withServer,
} from './harness.js';

const TEST = { timeout: 90_000 };
const PRESENTER_SIZE = { width: 1280, height: 800 };
const VIEWER_SIZE = { width: 1280, height: 720 };

const { open } = sharedBrowser();

test('the presenter drives two viewers: next, item edits and show/hide reach them live', TEST, () =>
  withServer(async (server, pages) => {
    const dave = await server.addViewer('dave');
    const carol = await open(pages, server.users.carol.viewer, { viewport: VIEWER_SIZE });
    const daveView = await open(pages, dave.viewer, { viewport: VIEWER_SIZE });
    await waitStatus(carol.page, 'live');
    await waitStatus(daveView.page, 'live');
    const viewers = [carol.page, daveView.page];
    for (const page of viewers) assert.equal(await text(page, 'item-title'), 'Welcome');

    const presenter = await open(pages, server.users.alice.presenter, { viewport: PRESENTER_SIZE });
    const p = presenter.page;
    await waitStatus(p, 'live');
    // The token came in the fragment and does not stay in the address bar.
    assert.ok(!p.url().includes('token'), `token left in the URL: ${p.url()}`);
    assert.equal(await text(p, 'who'), 'alice · demo · controller');
    // Opened after both viewers: `connected` counts them (two people).
    assert.equal(await text(p, 'count-viewers'), '2');
    assert.equal(await text(p, 'count-controllers'), '1');
    assert.equal(await text(p, 'audience-unnamed'), 'and 2 people who were here before you');
    assert.equal(await byTestId(p, 'item-list').locator('li').count(), 3);

    // Next: both viewers show item 2 within a second.
    const start = await server.view();
    await byTestId(p, 'next').click();
    await Promise.all(viewers.map((page) => waitText(page, 'item-title', 'How it works', 1000)));
    let stored = await server.view();
    assert.equal(stored.state.currentItem, '2');
    assert.equal(stored.version, start.version + 1);
    for (const page of [p, ...viewers]) {
      await eventually(async () => (await shownVersion(page)) === stored.version, { what: 'the new version on every page' });
    }
    assert.equal(await byTestId(p, 'item-list').locator('li.current').getAttribute('data-item-id'), '2');

    // Edit the current item.
    await byTestId(p, 'edit-title').fill('Live edit from the presenter');
    await byTestId(p, 'edit-body').fill('Typed in the presenter page; every viewer sees it as soon as it is stored.');
    await byTestId(p, 'save-item').click();
    await Promise.all(viewers.map((page) => waitText(page, 'item-title', 'Live edit from the presenter', 2000)));
    assert.equal(await text(carol.page, 'item-body'), 'Typed in the presenter page; every viewer sees it as soon as it is stored.');
    stored = await server.view();
    assert.equal(stored.state.items['2'].title, 'Live edit from the presenter');
    assert.equal(await text(p, 'save-state'), `Saved as version ${stored.version}`);
    assert.equal(await text(p, 'item-2'), '2Live edit from the presenter');

    await screenshot(p, 'presenter.png');
    await screenshot(carol.page, 'viewer.png');

    // Hide, then show again.
    await byTestId(p, 'toggle-visible').click();
    await Promise.all(viewers.map((page) => waitText(page, 'hidden-notice', 'The presenter has hidden the screen.', 2000)));
    assert.equal((await server.view()).state.visible, false);
    assert.equal(await text(p, 'toggle-visible'), 'Show to viewers');
    await screenshot(carol.page, 'viewer-hidden.png');
    await byTestId(p, 'toggle-visible').click();
    await Promise.all(viewers.map((page) => waitText(page, 'item-title', 'Live edit from the presenter', 2000)));
    assert.equal((await server.view()).state.visible, true);

    // Send full sync: the presenter's state is stored as a new version.
    const beforeSync = await server.view();
    await byTestId(p, 'full-sync').click();
    await waitText(p, 'message', `Full state sent: stored as version ${beforeSync.version + 1}.`);
    const afterSync = await server.view();
    assert.equal(afterSync.version, beforeSync.version + 1);
    assert.deepEqual(afterSync.state, beforeSync.state);
    await eventually(async () => (await shownVersion(carol.page)) === afterSync.version, { what: 'the viewer at the synced version' });
  }),
);

test('a viewer has no controls, and a controller message forged from its console is FORBIDDEN and changes nothing', TEST, () =>
  withServer(async (server, pages) => {
    const viewer = await open(pages, server.users.carol.viewer, { viewport: VIEWER_SIZE });
    const page = viewer.page;
    await waitStatus(page, 'live');
    assert.equal(await page.locator('button, input, textarea, select, [contenteditable]').count(), 0, 'no controls on the viewer page');

    const before = await server.view();
    await page.evaluate(() => {
      const socket = window.portal.client.socket;
      socket.send(JSON.stringify({ type: 'portal-view-update', payload: { currentItem: '3' }, id: 'forged-update' }));
      socket.send(JSON.stringify({ type: 'item-update', payload: { itemId: '1', title: 'pwned' }, id: 'forged-item' }));
      socket.send(JSON.stringify({ type: 'sync-response', payload: {}, id: 'forged-sync' }));
    });
    const ids = ['forged-update', 'forged-item', 'forged-sync'];
    const replies = await eventually(
      () => {
        const errors = viewer.received.filter((m) => m.type === 'error' && ids.includes(m.id));
        return errors.length === ids.length && errors;
      },
      { what: 'an error reply to each forged message' },
    );
    for (const reply of replies) assert.equal(reply.code, 'FORBIDDEN', JSON.stringify(reply));
    const after = await server.view();
    assert.equal(after.version, before.version, 'version unchanged');
    assert.deepEqual(after.state, before.state, 'state unchanged');
    assert.equal(await text(page, 'item-title'), 'Welcome');
    assert.equal(await shownVersion(page), before.version);
    assert.equal(await byTestId(page, 'status').getAttribute('data-state'), 'live', 'the socket stays open');

    // carol opening a presenter link gets the viewer's stage and a clear note.
    const wrongPage = await open(pages, server.users.carol.presenter, { viewport: PRESENTER_SIZE });
    await waitStatus(wrongPage.page, 'live');
    await byTestId(wrongPage.page, 'role-notice').waitFor({ state: 'visible' });
    assert.match(await text(wrongPage.page, 'role-notice'), /carol is a viewer of “demo”/);
    assert.equal(await text(wrongPage.page, 'item-title'), 'Welcome');
    for (const control of ['next', 'prev', 'toggle-visible', 'full-sync', 'editor']) {
      assert.equal(await byTestId(wrongPage.page, control).count(), 0, `no ${control} for a viewer`);
    }
  }),
);

test('a server restart: pages show reconnecting, come back live and show the current state without a reload', TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter, { viewport: PRESENTER_SIZE });
    const viewer = await open(pages, server.users.carol.viewer, { viewport: VIEWER_SIZE });
    const both = [presenter.page, viewer.page];
    for (const page of both) {
      await waitStatus(page, 'live');
      await page.evaluate(() => {
        window.sameDocument = true;
        window.statuses = [];
        window.portal.client.addEventListener('status', (e) => window.statuses.push(e.detail));
      });
    }

    await server.stop();
    for (const page of both) await waitStatus(page, 'reconnecting');
    for (const page of both) {
      const statuses = await page.evaluate(() => window.statuses);
      assert.ok(
        statuses.some((s) => s.status === 'reconnecting' && s.code === 1001 && s.reason === 'server shutting down'),
        `reconnecting after 1001: ${JSON.stringify(statuses)}`,
      );
      assert.match(await text(page, 'status'), /^Reconnecting/);
    }
    await screenshot(presenter.page, 'presenter-reconnecting.png');

    await server.start();
    const stored = await server.patch({ currentItem: '3' });
    for (const page of both) await waitStatus(page, 'live', 20_000);
    await waitText(viewer.page, 'item-title', 'Questions?');
    for (const page of both) {
      await eventually(async () => (await shownVersion(page)) === stored.version, { what: `version ${stored.version} after the restart` });
      assert.equal(await page.evaluate(() => window.sameDocument), true, 'not reloaded');
    }
    assert.equal(await byTestId(presenter.page, 'item-list').locator('li.current').getAttribute('data-item-id'), '3');
    assert.ok(viewer.sockets.length >= 2, `the viewer reconnected (${viewer.sockets.length} sockets)`);

    // And the presenter drives the viewer again on the new server.
    await byTestId(presenter.page, 'prev').click();
    await waitText(viewer.page, 'item-title', 'How it works');
  }),
);

test('a refused link (1008) shows the reason and does not reconnect', TEST, () =>
  withServer(async (server, pages) => {
    const cases = [
      [`${server.base}/viewer#token=not-a-token&view=demo`, 'invalid token'],
      [`${server.base}/presenter#token=${server.users.alice.token}&view=no-such-view`, 'portal view not found'],
    ];
    for (const [url, reason] of cases) {
      const { page, sockets } = await open(pages, url);
      await waitStatus(page, 'closed');
      assert.equal(await text(page, 'status'), `Closed: ${reason} (1008)`);
      assert.match(await text(page, 'sign-in-note'), new RegExp(reason));
      // Longer than several backoff steps: still the one attempt.
      await page.waitForTimeout(2500);
      assert.equal(sockets.length, 1, `one WebSocket attempt for ${reason}`);
      assert.equal(await byTestId(page, 'status').getAttribute('data-state'), 'closed');
      await screenshot(page, `refused-${reason.replaceAll(' ', '-')}.png`);
    }
  }),
);

test('a viewer that misses a broadcast asks for a sync, and the presenter answers it', TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter);
    let dropNext = false;
    let tap;
    const viewer = await open(pages, server.users.carol.viewer, {
      before: async (page) => {
        tap = await routeSocket(page, {
          dropFromServer: (m) => {
            if (dropNext && m.type === 'portal-view-update') {
              dropNext = false;
              return true;
            }
            return false;
          },
        });
      },
    });
    await waitStatus(presenter.page, 'live');
    await waitStatus(viewer.page, 'live');
    const start = await server.view();

    dropNext = true;
    await byTestId(presenter.page, 'next').click();
    await eventually(() => tap.dropped.length === 1, { what: 'the first broadcast dropped' });
    await byTestId(presenter.page, 'next').click();

    // The viewer saw version start+2 after start: a gap. It asks; the presenter
    // answers with a sync-response (stored as start+3).
    await eventually(() => tap.fromPage.some((m) => m.type === 'request-sync'), { what: "the viewer's request-sync" });
    await waitText(viewer.page, 'item-title', 'Questions?');
    const stored = await server.view();
    assert.equal(stored.version, start.version + 3, 'two updates and one sync-response');
    assert.equal(stored.state.currentItem, '3');
    await eventually(async () => (await shownVersion(viewer.page)) === stored.version, { what: 'the viewer in sync' });
    assert.match(await text(presenter.page, 'activity'), /carol asked for a sync/);
  }),
);

test('a presenter that misses a broadcast re-reads the view over REST', TEST, () =>
  withServer(async (server, pages) => {
    let dropNext = false;
    let tap;
    const presenter = await open(pages, server.users.alice.presenter, {
      before: async (page) => {
        tap = await routeSocket(page, {
          dropFromServer: (m) => {
            if (dropNext && m.source === 'rest') {
              dropNext = false;
              return true;
            }
            return false;
          },
        });
      },
    });
    const p = presenter.page;
    await waitStatus(p, 'live');

    dropNext = true;
    await server.patch({ visible: false });
    await eventually(() => tap.dropped.length === 1, { what: 'the REST broadcast dropped' });
    const stored = await server.patch({ currentItem: '2' });

    await eventually(
      () => presenter.requests.find((r) => r.url === `${server.base}/api/portal-views/demo` && r.headers.authorization === `Bearer ${server.users.alice.token}`),
      { what: 'a GET of the view with the bearer token' },
    );
    await eventually(async () => (await shownVersion(p)) === stored.version, { what: 'the presenter in sync' });
    assert.equal(await text(p, 'item-title'), 'How it works');
    assert.equal(await text(p, 'hidden-notice'), 'Hidden from viewers', 'the dropped change is there too');
    assert.equal(tap.fromPage.filter((m) => m.type === 'request-sync').length, 0, 'controllers do not send request-sync');
  }),
);

test('presence events update the audience panel', TEST, () =>
  withServer(async (server, pages) => {
    let tap;
    const presenter = await open(pages, server.users.alice.presenter, {
      before: async (page) => {
        tap = await routeSocket(page);
      },
    });
    const p = presenter.page;
    await waitStatus(p, 'live');
    assert.equal(await byTestId(p, 'audience-list').textContent(), 'alicecontroller, you');
    // Events as SPEC §3.3 words them, injected into the page's socket so the
    // panel is tested whether or not this server sends them yet.
    const socket = tap.routes.at(-1);
    socket.send(JSON.stringify({ type: 'presence', joined: [{ userId: 'dave', role: 'viewer' }, { userId: 'bob', role: 'controller' }], left: [], presence: { controllers: 2, viewers: 1, connections: 4 } }));
    await waitText(p, 'count-viewers', '1');
    assert.equal(await text(p, 'count-controllers'), '2');
    assert.equal(await text(p, 'count-connections'), '4');
    const people = () => byTestId(p, 'audience-list').locator('li').evaluateAll((items) => items.map((li) => `${li.dataset.userId}:${li.dataset.role}`));
    assert.deepEqual(await people(), ['alice:controller', 'bob:controller', 'dave:viewer']);
    assert.match(await text(p, 'activity'), /dave joined \(viewer\)/);

    socket.send(JSON.stringify({ type: 'presence', joined: [], left: [{ userId: 'dave', role: 'viewer' }], presence: { controllers: 2, viewers: 0, connections: 3 } }));
    await waitText(p, 'count-viewers', '0');
    assert.deepEqual(await people(), ['alice:controller', 'bob:controller']);
    assert.match(await text(p, 'activity'), /dave left \(viewer\)/);
  }),
);

test('the audience panel follows the server\'s own presence events', TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter);
    const p = presenter.page;
    await waitStatus(p, 'live');
    const people = () => byTestId(p, 'audience-list').locator('li').evaluateAll((items) => items.map((li) => `${li.dataset.userId}:${li.dataset.role}`));
    const carol = await open(pages, server.users.carol.viewer);
    await waitStatus(carol.page, 'live');
    await waitText(p, 'count-viewers', '1');
    const same = (want) => async () => JSON.stringify(await people()) === JSON.stringify(want);
    await eventually(same(['alice:controller', 'carol:viewer']), { what: 'carol in the audience' });
    assert.match(await text(p, 'activity'), /carol joined \(viewer\)/);
    // A second tab of carol is no news: the counts change, the list does not.
    const second = await open(pages, server.users.carol.viewer);
    await waitStatus(second.page, 'live');
    await waitText(p, 'count-connections', '3');
    assert.equal(await text(p, 'count-viewers'), '1');
    await second.context.close();
    await carol.context.close();
    await waitText(p, 'count-viewers', '0');
    await eventually(same(['alice:controller']), { what: 'carol gone from the audience' });
    assert.match(await text(p, 'activity'), /carol left \(viewer\)/);
  }),
);

test('item text is shown as text: markup in a title does not become HTML', TEST, () =>
  withServer(async (server, pages) => {
    const viewer = await open(pages, server.users.carol.viewer);
    await waitStatus(viewer.page, 'live');
    const title = '<img src=x onerror="window.pwned=1">Hello';
    await server.patch({ items: { 1: { title } } });
    await waitText(viewer.page, 'item-title', title);
    assert.equal(await viewer.page.locator('[data-testid=stage] img').count(), 0);
    assert.equal(await viewer.page.evaluate(() => window.pwned), undefined);
  }),
);

test('the sign-in page opens the viewer, keeps the token out of the URL, and survives a reload', TEST, () =>
  withServer(async (server, pages) => {
    const { page } = await open(pages, `${server.base}/`);
    await byTestId(page, 'token-input').fill(server.users.carol.token);
    assert.equal(await byTestId(page, 'view-input').inputValue(), 'demo');
    await byTestId(page, 'open-viewer').click();
    await page.waitForURL(`${server.base}/viewer`);
    await waitStatus(page, 'live');
    assert.equal(await text(page, 'item-title'), 'Welcome');
    await page.reload();
    await waitStatus(page, 'live');
    assert.equal(page.url(), `${server.base}/viewer`);
    assert.equal(await text(page, 'who'), 'carol · demo');
  }),
);
