// The viewer page: the current item, large, updating live. No controls: what
// is shown is whatever the presenter last stored.

import { PortalClient } from './client.js';
import { TokenBanner, bindStale, bindStatus, connectionOptions, readCredentials, renderStage, signInForm } from './app.js';

const stage = document.querySelector('[data-testid=stage]');
const who = document.querySelector('[data-testid=who]');
const credentials = readCredentials();

if (!credentials) {
  document.querySelector('#app').replaceChildren(signInForm({ note: 'Sign in to watch a portal view.' }));
  document.querySelector('[data-testid=status]').textContent = 'Signed out';
} else {
  const banner = new TokenBanner();
  const client = new PortalClient({ ...credentials, ...connectionOptions(), getToken: banner.ask });
  banner.bind(client, credentials.view);
  // A debugging handle (the console can reach the socket anyway).
  window.portal = { client };
  bindStatus(client, document.querySelector('[data-testid=status]'), document.querySelector('[data-testid=version]'));
  client.addEventListener('state', () => renderStage(stage, client.state));
  bindStale(client, stage, document.querySelector('[data-testid=stale-notice]'));
  client.addEventListener('status', ({ detail }) => {
    if (detail.status === 'live') who.textContent = `${client.userId} · ${client.view}`;
    if (detail.status === 'closed' && detail.code === 1008) {
      document.querySelector('#app').replaceChildren(signInForm({ view: client.view, note: `The server refused this link: ${detail.reason}.` }));
    }
  });
  client.start();
}
