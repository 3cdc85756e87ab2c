// The viewer page while its connection is down: the last slide stays, dimmed
// and labelled stale, until a new connection brings the state back. The
// stream is cut by routing the page's WebSocket through the test (the server
// keeps running, so the test takes seconds, not a restart).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { byTestId, screenshot, sharedBrowser, text, waitStatus, waitText, withServer } from './harness.js';

const TEST = { timeout: 90_000 };
const { open } = sharedBrowser();

test("a viewer's slide is dimmed and says so while reconnecting, and is live again after", TEST, () =>
  withServer(async (server, pages) => {
    const link = { blocked: false, routes: [] };
    // WebSocket only: a blocked WebSocket must not be rescued by the SSE fallback here.
    const url = server.users.carol.viewer.replace('/viewer#', '/viewer?transport=websocket#');
    const viewer = await open(pages, url, {
      before: (page) =>
        page.routeWebSocket(/\/ws\/portal-view\//, (ws) => {
          if (link.blocked) return ws.close({ code: 1011, reason: 'blocked by the test' });
          link.routes.push(ws);
          ws.connectToServer();
          return undefined;
        }),
    });
    const page = viewer.page;
    await waitStatus(page, 'live');
    const stage = byTestId(page, 'stage');
    const notice = byTestId(page, 'stale-notice');
    const opacity = () => byTestId(page, 'item-title').evaluate((e) => Number(getComputedStyle(e).opacity));
    assert.equal(await stage.getAttribute('data-stale'), 'false');
    assert.equal(await notice.isHidden(), true);
    assert.equal(await opacity(), 1);

    link.blocked = true;
    await link.routes.at(-1).close({ code: 1011, reason: 'cut by the test' });
    await waitStatus(page, 'reconnecting');
    assert.equal(await stage.getAttribute('data-stale'), 'true');
    await notice.waitFor({ state: 'visible' });
    assert.equal(await text(page, 'stale-notice'), 'Reconnecting… showing the last slide received');
    assert.equal(await text(page, 'item-title'), 'Welcome', 'the last slide is still shown');
    assert.ok((await opacity()) < 0.5, 'dimmed');
    await screenshot(page, 'viewer-stale.png');
    // Still stale after failed attempts (a closed attempt is not "live").
    await page.waitForTimeout(1200);
    assert.equal(await stage.getAttribute('data-stale'), 'true');

    // Meanwhile the presenter moved on; the next connection brings it.
    await server.patch({ currentItem: '2' });
    link.blocked = false;
    await waitStatus(page, 'live', 20_000);
    await waitText(page, 'item-title', 'How it works');
    assert.equal(await stage.getAttribute('data-stale'), 'false');
    assert.equal(await notice.isHidden(), true);
    assert.equal(await opacity(), 1);
  }),
);
