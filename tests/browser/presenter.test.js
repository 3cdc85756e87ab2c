// The presenter page's keyboard and its activity log, in Chromium against the
// real binary: a key is a stored change that a viewer sees, typing is not,
// and what the presenter did is logged with the version it was stored as.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { byTestId, eventually, routeSocket, sharedBrowser, waitStatus, waitText, withServer } from './harness.js';

const TEST = { timeout: 90_000 };
const { open } = sharedBrowser();

const TITLES = { 1: 'Welcome', 2: 'How it works', 3: 'Questions?' };

test('the presenter steps with the keyboard (arrows, Space, PageUp/PageDown), a viewer follows, and typing is not a step', TEST, () =>
  withServer(async (server, pages) => {
    let tap;
    const presenter = await open(pages, server.users.alice.presenter, { before: async (page) => (tap = await routeSocket(page)) });
    const viewer = await open(pages, server.users.carol.viewer);
    const p = presenter.page;
    await waitStatus(p, 'live');
    await waitStatus(viewer.page, 'live');
    const start = await server.view();

    const steps = [
      ['ArrowRight', '2'],
      ['ArrowRight', '3'],
      ['ArrowLeft', '2'],
      ['ArrowUp', '1'],
      ['ArrowDown', '2'],
      ['PageUp', '1'],
      ['PageDown', '2'],
      ['Space', '3'],
    ];
    for (const [index, [key, item]] of steps.entries()) {
      await p.keyboard.press(key);
      await waitText(viewer.page, 'item-title', TITLES[item], 3000);
      const sent = tap.fromPage.filter((m) => m.type === 'portal-view-update');
      assert.deepEqual(sent.at(-1).payload, { currentItem: item }, `${key} sends currentItem ${item}`);
      assert.equal(sent.length, index + 1, `${key}: one update per key`);
    }
    const stored = await server.view();
    assert.equal(stored.state.currentItem, '3');
    assert.equal(stored.version, start.version + steps.length);

    // At the last item "next" keys do nothing; in the editor they are typing.
    await p.keyboard.press('ArrowRight');
    await byTestId(p, 'edit-title').click();
    for (const key of ['ArrowLeft', 'ArrowUp', 'PageUp', 'End', 'Space']) await p.keyboard.press(key);
    await byTestId(p, 'edit-body').click();
    await p.keyboard.press('ArrowLeft');
    await p.keyboard.press('Space');
    await p.waitForTimeout(300);
    assert.equal(tap.fromPage.filter((m) => m.type === 'portal-view-update').length, steps.length, 'no update from keys in inputs or past the end');
    assert.equal((await server.view()).version, stored.version);
    assert.equal(await byTestId(p, 'edit-title').inputValue(), `${TITLES[3]} `, 'Space typed into the title');
  }),
);

test("the presenter's own actions are in its activity log with the version each was stored as", TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter);
    const p = presenter.page;
    await waitStatus(p, 'live');
    const start = (await server.view()).version;
    const lines = () => byTestId(p, 'activity').locator('li').evaluateAll((items) => items.map((li) => li.textContent.slice(li.querySelector('time').textContent.length + 1)));
    const logged = async (line) =>
      eventually(async () => (await lines()).includes(line), { what: `"${line}" in the activity log` }).catch(async (error) => {
        throw new Error(`${error.message}: ${JSON.stringify(await lines())}`);
      });

    await byTestId(p, 'next').click();
    await logged(`you showed item 2 “How it works” (version ${start + 1})`);
    await byTestId(p, 'item-3').click();
    await logged(`you showed item 3 “Questions?” (version ${start + 2})`);
    await byTestId(p, 'toggle-visible').click();
    await logged(`you hid the screen from viewers (version ${start + 3})`);
    await byTestId(p, 'toggle-visible').click();
    await logged(`you showed the screen to viewers (version ${start + 4})`);
    await byTestId(p, 'edit-title').fill('Any questions?');
    await byTestId(p, 'save-item').click();
    await logged(`you saved item 3 (version ${start + 5})`);
    await byTestId(p, 'full-sync').click();
    await logged(`you sent a full sync (version ${start + 6})`);
    await p.keyboard.press('ArrowLeft');
    await logged(`you showed item 2 “How it works” (version ${start + 7})`);
    assert.equal((await server.view()).version, start + 7);
    // Newest first, after the connect line.
    const all = await lines();
    assert.equal(all[0], `you showed item 2 “How it works” (version ${start + 7})`);
    assert.equal(all.at(-1), 'connected as alice');
  }),
);
