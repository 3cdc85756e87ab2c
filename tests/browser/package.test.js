// web/ as the `portal-sync-client` npm package: what `npm pack` puts in it,
// that the packed package imports by its name and exports what client.js
// does, and that client.d.ts declares exactly those exports and types a
// page's use of them (tsc, strict). No browser and no server: a few seconds.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import ts from 'typescript';

import { ROOT } from './harness.js';

const run = promisify(execFile);
const WEB = path.join(ROOT, 'web');
const TEST = { timeout: 60_000 };
const PACKED = ['client.d.ts', 'client.js', 'package.json', 'rules.js', 'sse.js'];

async function runtimeExports() {
  return Object.keys(await import(path.join(WEB, 'client.js'))).sort();
}

/** Compiles `files` (strict, no emit) and returns the diagnostics as text. */
function typeErrors(files, options = {}) {
  const program = ts.createProgram(files, {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2022.d.ts', 'lib.dom.d.ts'],
    types: [],
    // The standard library is not ours to check (and is most of the time); client.d.ts is.
    skipDefaultLibCheck: true,
    ...options,
  });
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file ? `${path.basename(d.file.fileName)}:${d.file.getLineAndCharacterOfPosition(d.start).line + 1}: ` : '';
    return where + ts.flattenDiagnosticMessageText(d.messageText, '\n');
  });
}

test('npm pack in web/ packs the client and nothing else', TEST, async () => {
  const { stdout } = await run('npm', ['pack', '--dry-run', '--json', '--loglevel=error'], { cwd: WEB });
  const [pack] = JSON.parse(stdout);
  assert.equal(pack.name, 'portal-sync-client');
  assert.deepEqual(pack.files.map((f) => f.path).sort(), PACKED);
  // Every module a packed script imports is packed too.
  for (const file of PACKED.filter((f) => f.endsWith('.js'))) {
    const source = await readFile(path.join(WEB, file), 'utf8');
    for (const [, name] of source.matchAll(/from '\.\/([^']+)'/g)) assert.ok(PACKED.includes(name), `${file} imports ${name}, which is not packed`);
  }
});

test('the packed package imports by its name, its types resolve through exports, and a TypeScript page checks against them', TEST, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'portal-sync-pack-'));
  try {
    const { stdout } = await run('npm', ['pack', '--json', '--loglevel=error', '--pack-destination', dir], { cwd: WEB });
    const [{ filename }] = JSON.parse(stdout);
    const installed = path.join(dir, 'node_modules', 'portal-sync-client');
    await mkdir(installed, { recursive: true });
    await run('tar', ['-xzf', path.join(dir, filename), '-C', installed, '--strip-components=1']);
    await writeFile(path.join(dir, 'package.json'), '{"type":"module"}');
    await writeFile(path.join(dir, 'use.js'), "import * as client from 'portal-sync-client';\nconsole.log(JSON.stringify(Object.keys(client).sort()));\n");
    const used = await run(process.execPath, ['use.js'], { cwd: dir });
    assert.deepEqual(JSON.parse(used.stdout), await runtimeExports());

    await writeFile(
      path.join(dir, 'use.ts'),
      "import { PortalClient, type TokenDetail } from 'portal-sync-client';\n" +
        "const c = new PortalClient({ view: 'demo', token: 't' });\n" +
        "c.addEventListener('token', (e) => { const d: TokenDetail = e.detail; console.log(d.exp); });\n" +
        "// @ts-expect-error: the types came with the package, so this is an error\nc.updateView(1);\n",
    );
    // One program for both (parsing the DOM's types is the slow part): the
    // packed package by name, and tests/browser/types-example.ts, whose
    // @ts-expect-error lines are misuses that must stay errors.
    assert.deepEqual(typeErrors([path.join(dir, 'use.ts'), path.join(ROOT, 'tests/browser/types-example.ts')]), []);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('client.d.ts declares exactly the values client.js exports', TEST, async () => {
  const file = path.join(WEB, 'client.d.ts');
  // Only the names matter here: no standard library to parse.
  const program = ts.createProgram([file], { noEmit: true, noLib: true, types: [] });
  const checker = program.getTypeChecker();
  const module = checker.getSymbolAtLocation(program.getSourceFile(file));
  const declared = checker
    .getExportsOfModule(module)
    .filter((symbol) => symbol.flags & ts.SymbolFlags.Value)
    .map((symbol) => symbol.name)
    .sort();
  assert.deepEqual(declared, await runtimeExports());
});
