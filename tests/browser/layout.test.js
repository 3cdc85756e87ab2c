// How the pages look where it matters to a person: text readable against
// what is behind it (WCAG contrast), and the status badge whole on a phone.
// Real pages in Chromium against the real binary, measured with the
// browser's computed styles and layout.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { byTestId, eventually, screenshot, sharedBrowser, waitStatus, withServer } from './harness.js';

const TEST = { timeout: 90_000 };
const PHONE = { width: 390, height: 844 };
const { open } = sharedBrowser();

/**
 * The WCAG 2 contrast ratio of `selector`'s text against the first opaque
 * background behind it (its own or an ancestor's, semi-transparent layers
 * composited over it), in the page.
 */
function contrastOf(page, selector) {
  return page.locator(selector).first().evaluate((element) => {
    const rgba = (css) => {
      const [r, g, b, a = 1] = css.match(/[\d.]+/g).map(Number);
      return { r, g, b, a };
    };
    const layers = [];
    for (let node = element; node; node = node.parentElement) {
      const background = rgba(getComputedStyle(node).backgroundColor);
      if (background.a > 0) layers.push(background);
      if (background.a === 1) break;
    }
    let under = { r: 255, g: 255, b: 255 }; // the canvas
    for (const layer of layers.reverse()) {
      under = { r: layer.r * layer.a + under.r * (1 - layer.a), g: layer.g * layer.a + under.g * (1 - layer.a), b: layer.b * layer.a + under.b * (1 - layer.a) };
    }
    const ink = rgba(getComputedStyle(element).color);
    const luminance = ({ r, g, b }) => {
      const [R, G, B] = [r, g, b].map((c) => {
        const s = c / 255;
        return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
      });
      return 0.2126 * R + 0.7152 * G + 0.0722 * B;
    };
    const [light, dark] = [luminance(ink), luminance(under)].sort((a, b) => b - a);
    return { ratio: (light + 0.05) / (dark + 0.05), color: getComputedStyle(element).color, background: `rgb(${under.r}, ${under.g}, ${under.b})` };
  });
}

test("the presenter's audience list draws the viewer and controller role tags readably (contrast ≥ 4.5)", TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter);
    const p = presenter.page;
    await waitStatus(p, 'live');
    const carol = await open(pages, server.users.carol.viewer);
    await waitStatus(carol.page, 'live');
    await byTestId(p, 'audience-list').locator('li[data-user-id="carol"] .role.viewer').waitFor();
    for (const selector of ['[data-user-id="carol"] .role.viewer', '[data-user-id="alice"] .role.controller']) {
      const { ratio, color, background } = await contrastOf(p, `[data-testid=audience-list] ${selector}`);
      assert.ok(ratio >= 4.5, `${selector}: ${color} on ${background} is ${ratio.toFixed(2)}:1`);
    }
    // The viewer page itself keeps its dark stage.
    const { background } = await contrastOf(carol.page, '[data-testid=item-title]');
    assert.equal(background, 'rgb(15, 26, 43)');
  }),
);

/** The status badge lies inside the viewport and its text is not cut (no overflow). */
async function assertBadgeWhole(page, what) {
  const badge = byTestId(page, 'status');
  const box = await badge.boundingBox();
  const { width, height } = page.viewportSize();
  assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= width && box.y + box.height <= height, `${what}: badge ${JSON.stringify(box)} outside ${width}×${height}`);
  const { scrollWidth, clientWidth, text } = await badge.evaluate((e) => ({ scrollWidth: e.scrollWidth, clientWidth: e.clientWidth, text: e.textContent }));
  assert.ok(scrollWidth <= clientWidth, `${what}: "${text}" is clipped (${scrollWidth} > ${clientWidth})`);
}

test('at 390×844 the status badge is whole on the presenter and the viewer, live and reconnecting', TEST, () =>
  withServer(async (server, pages) => {
    const presenter = await open(pages, server.users.alice.presenter, { viewport: PHONE });
    const viewer = await open(pages, server.users.carol.viewer, { viewport: PHONE });
    for (const [page, what] of [[presenter.page, 'presenter'], [viewer.page, 'viewer']]) {
      await waitStatus(page, 'live');
      assert.equal(await byTestId(page, 'status').textContent(), 'Live · WebSocket');
      await assertBadgeWhole(page, `${what}, live`);
    }
    await screenshot(presenter.page, 'presenter-390.png');
    // The longest status a page shows: a reason, a code and a countdown.
    await server.stop();
    for (const [page, what] of [[presenter.page, 'presenter'], [viewer.page, 'viewer']]) {
      await eventually(async () => /^Reconnecting: (server shutting down \(1001\)|connection lost \(1006\)), retry in \d+ s$/.test(await byTestId(page, 'status').textContent()), {
        what: `${what} reconnecting after the shutdown`,
      });
      await assertBadgeWhole(page, `${what}, reconnecting`);
    }
  }),
);
