// The README's "Use it in your own page" example, run as written: the html
// block is read from README.md, served from a page origin of its own (with
// the package's files where its import map points), and loaded in Chromium
// against `portal-sync demo --allowed-origins <that origin>`. Only the
// server's address and the token placeholder are replaced.

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import path from 'node:path';
import { test } from 'node:test';

import { ROOT, byTestId, eventually, sharedBrowser, withServer } from './harness.js';

const TEST = { timeout: 90_000 };
const { open } = sharedBrowser();
/** What the package holds (web/package.json `files`), served under node_modules/ as npm would install it. */
const PACKAGE_FILES = ['client.js', 'rules.js', 'sse.js', 'client.d.ts', 'package.json'];

/** The first ```html block after the heading, exactly as the README has it. */
async function readmeExample() {
  const readme = await readFile(path.join(ROOT, 'README.md'), 'utf8');
  const section = readme.indexOf('\n### Use it in your own page\n');
  assert.ok(section >= 0, 'the README has the section');
  const block = /```html\n([\s\S]*?)```/.exec(readme.slice(section));
  assert.ok(block, 'the section has an html block');
  return block[1];
}

function replaceOnce(text, from, to) {
  assert.equal(text.split(from).length, 2, `${from} appears once in the example`);
  return text.replace(from, to);
}

/** A static server for the example's directory: the page (`html()`) at / and the installed package. */
async function pageServer(html) {
  const server = createServer(async (request, response) => {
    const { pathname } = new URL(request.url, 'http://x');
    const file = /^\/node_modules\/portal-sync-client\/([^/]+)$/.exec(pathname)?.[1];
    if (pathname === '/') {
      response.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' }).end(html());
    } else if (PACKAGE_FILES.includes(file)) {
      const type = file.endsWith('.js') ? 'text/javascript' : 'text/plain';
      response.writeHead(200, { 'Content-Type': type }).end(await readFile(path.join(ROOT, 'web', file)));
    } else {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

test("the README's own-page example shows the view's state and follows an update", TEST, async () => {
  const example = await readmeExample();
  let html = '';
  const site = await pageServer(() => html);
  try {
    await withServer(
      async (server, pages) => {
        html = replaceOnce(replaceOnce(example, "'http://127.0.0.1:3000'", `'${server.base}'`), 'PASTE-A-TOKEN', server.users.carol.token);
        const { page } = await open(pages, `${site.origin}/`);
        const shown = () => page.locator('#state').textContent();
        const start = await server.view();
        await eventually(async () => (await shown()).startsWith(`live · version ${start.version}\n`), { what: 'the example live' });
        assert.deepEqual(JSON.parse((await shown()).split('\n').slice(1).join('\n')), start.state);

        const stored = await server.patch({ currentItem: '2' });
        await eventually(async () => (await shown()).startsWith(`live · version ${stored.version}\n`), { what: 'the update shown' });
        assert.deepEqual(JSON.parse((await shown()).split('\n').slice(1).join('\n')), stored.state);
        assert.equal(await byTestId(page, 'status').count(), 0, 'nothing of the shipped pages');
      },
      { args: ['--allowed-origins', site.origin] },
    );
  } finally {
    await new Promise((resolve) => site.server.close(resolve));
  }
});
