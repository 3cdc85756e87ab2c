// A page's use of the client as TypeScript sees it through web/client.d.ts;
// package.test.js compiles it (strict, no emit). The @ts-expect-error lines
// are misuses the declarations must reject: if they stopped being errors
// (types gone loose, e.g. `any`), the compile fails on the unused directive.

import { PortalClient, tokenExp, type StatusDetail, type TokenDetail } from '../../web/client.js';

const client = new PortalClient({
  view: 'demo',
  token: 'eyJ…',
  origin: 'http://127.0.0.1:3000',
  getToken: async () => 'a new token',
});

client.addEventListener('state', () => {
  const title: unknown = client.state.title;
  const version: number | null = client.version;
  console.log(title, version, client.role === 'controller');
});
client.addEventListener('status', (event) => {
  const detail: StatusDetail = event.detail;
  if (detail.status === 'closed' && detail.code === 1008) console.log(detail.reason);
});
client.addEventListener('token', (event) => {
  const detail: TokenDetail = event.detail;
  if (detail.status === 'refused') console.log(detail.code, detail.message);
});
client.start();

async function drive(): Promise<number> {
  const { version } = await client.updateView({ currentItem: '2' });
  await client.updateItem(2, { title: 'Two' });
  const { exp } = await client.refreshToken('a new token');
  return version + exp + (tokenExp(client.token) ?? 0);
}
void drive();

// @ts-expect-error: the view id is required
new PortalClient({ token: 't' });
// @ts-expect-error: a patch is an object
client.updateView('currentItem=2');
// @ts-expect-error: status is read-only
client.status = 'live';
client.addEventListener('status', (event) => {
  // @ts-expect-error: a status event has no `exp`
  console.log(event.detail.exp);
});
// @ts-expect-error: getToken returns a token
new PortalClient({ view: 'v', token: 't', getToken: () => 42 });
