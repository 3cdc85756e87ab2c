// The presenter page: the items, next/previous (buttons and keys), show/hide,
// editing an item, "send full sync", the live audience and an activity log
// of who came, who left and what this presenter did. The role comes from the server's
// `connected` message: a viewer who opens this page gets the viewer's stage
// and a note, never controls the server would refuse anyway.

import { PortalClient } from './client.js';
import {
  TokenBanner,
  bindStale,
  bindStatus,
  connectionOptions,
  field,
  forgetCredentials,
  h,
  itemIds,
  readCredentials,
  renderStage,
  signInForm,
} from './app.js';

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
const ACTIVITY_LINES = 20;
/** Keys that step through the items, as presentation clickers and slide apps use them. */
const NEXT_KEYS = new Set(['ArrowRight', 'ArrowDown', ' ', 'PageDown']);
const PREVIOUS_KEYS = new Set(['ArrowLeft', 'ArrowUp', 'PageUp']);

const credentials = readCredentials();
if (credentials) present(credentials);
else showSignIn('Sign in to present a portal view.');

function showSignIn(note, view) {
  $('presenter').hidden = true;
  $('role-notice').hidden = true;
  document.querySelector('#app').append(signInForm({ note, view }));
  if (!$('status').dataset.code) $('status').textContent = 'Signed out';
}

function present({ view, token }) {
  const banner = new TokenBanner();
  const client = new PortalClient({ view, token, ...connectionOptions(), getToken: banner.ask });
  banner.bind(client, view);
  // A debugging handle (the console can reach the socket anyway).
  window.portal = { client };
  bindStatus(client, $('status'), $('version'));
  bindStale(client, $('stage'), $('stale-notice'));

  const editor = { itemId: null, dirty: false };
  let messageTimer = null;

  const signOut = $('sign-out');
  signOut.hidden = false;
  signOut.addEventListener('click', () => {
    client.stop();
    forgetCredentials();
    location.assign('/');
  });

  const showMessage = (text) => {
    const box = $('message');
    box.textContent = text;
    box.hidden = false;
    clearTimeout(messageTimer);
    messageTimer = setTimeout(() => (box.hidden = true), 6000);
  };
  const failed = (what) => (error) => showMessage(`${what} failed: ${error.code ?? ''} ${error.message}`.replace('  ', ' '));

  const activity = (text) => {
    const list = $('activity');
    const time = new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
    list.prepend(h('li', {}, h('time', {}, time), ' ', text));
    while (list.children.length > ACTIVITY_LINES) list.lastElementChild.remove();
  };

  const isController = () => client.role === 'controller';
  const currentId = () => (client.state.currentItem === undefined || client.state.currentItem === null ? null : String(client.state.currentItem));

  const setEnabled = (enabled) => {
    for (const control of document.querySelectorAll('[data-testid=presenter] button, [data-testid=presenter] input, [data-testid=presenter] textarea')) {
      control.disabled = !enabled;
    }
    if (enabled) renderControls();
  };

  // --- controls ------------------------------------------------------------

  /** This presenter's own changes, in the activity log once the server stored them. */
  const mine = (what) => ({ version }) => activity(`you ${what} (version ${version})`);
  const titleOf = (id) => field(client.state.items?.[id], 'title');
  const show = (id) => {
    const title = titleOf(id);
    client
      .updateView({ currentItem: id })
      .then(mine(`showed item ${id}${title ? ` “${title}”` : ''}`))
      .catch(failed('Changing the item'));
  };
  const step = (delta) => {
    const ids = itemIds(client.state);
    const index = ids.indexOf(currentId());
    const target = index === -1 ? ids[0] : ids[index + delta];
    if (target !== undefined) show(target);
  };
  $('prev').addEventListener('click', () => step(-1));
  $('next').addEventListener('click', () => step(1));
  document.addEventListener('keydown', (event) => {
    const delta = NEXT_KEYS.has(event.key) ? 1 : PREVIOUS_KEYS.has(event.key) ? -1 : 0;
    if (delta === 0 || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey || event.repeat) return;
    const target = event.target;
    // Typing stays typing; Space on a focused button or link presses it.
    if (target.closest?.('input, textarea, select, [contenteditable]')) return;
    if (event.key === ' ' && target.closest?.('button, a')) return;
    if (!isController() || client.status !== 'live') return;
    event.preventDefault();
    step(delta);
  });
  $('toggle-visible').addEventListener('click', () => {
    const visible = client.state.visible === false;
    client
      .updateView({ visible })
      .then(mine(visible ? 'showed the screen to viewers' : 'hid the screen from viewers'))
      .catch(failed('Show/hide'));
  });
  $('full-sync').addEventListener('click', () => {
    client
      .sendFullSync()
      .then(({ version }) => {
        showMessage(`Full state sent: stored as version ${version}.`);
        mine('sent a full sync')({ version });
      })
      .catch(failed('Full sync'));
  });

  $('edit-title').addEventListener('input', () => (editor.dirty = true));
  $('edit-body').addEventListener('input', () => (editor.dirty = true));
  $('editor').addEventListener('submit', (event) => {
    event.preventDefault();
    if (editor.itemId === null) return;
    const fields = { title: $('edit-title').value, body: $('edit-body').value };
    const itemId = editor.itemId;
    $('save-state').textContent = 'Saving…';
    client
      .updateItem(itemId, fields)
      .then(({ version }) => {
        editor.dirty = false;
        $('save-state').textContent = `Saved as version ${version}`;
        mine(`saved item ${itemId}`)({ version });
      })
      .catch((error) => {
        $('save-state').textContent = '';
        failed('Saving the item')(error);
      });
  });

  // --- rendering -----------------------------------------------------------

  function renderControls() {
    const ids = itemIds(client.state);
    const index = ids.indexOf(currentId());
    const live = client.status === 'live';
    $('prev').disabled = !live || index <= 0;
    $('next').disabled = !live || index === ids.length - 1 || ids.length === 0;
    const visible = client.state.visible !== false;
    const toggle = $('toggle-visible');
    toggle.textContent = visible ? 'Hide from viewers' : 'Show to viewers';
    toggle.setAttribute('aria-pressed', String(!visible));
  }

  function renderItems() {
    const current = currentId();
    const items = client.state.items ?? {};
    $('item-list').replaceChildren(
      ...itemIds(client.state).map((id) =>
        h(
          'li',
          { class: id === current ? 'current' : null, dataset: { itemId: id } },
          h(
            'button',
            {
              type: 'button',
              class: 'item',
              'aria-current': id === current ? 'true' : null,
              disabled: client.status !== 'live',
              dataset: { testid: `item-${id}` },
              onclick: () => show(id),
            },
            h('span', { class: 'item-id' }, id),
            h('span', { class: 'item-title' }, field(items[id], 'title') || '(untitled)'),
          ),
        ),
      ),
    );
  }

  /** Follows the current item; keeps what the presenter is typing unless the item changes. */
  function renderEditor() {
    const id = currentId();
    const item = id !== null ? client.state.items?.[id] : undefined;
    $('editor').hidden = item === undefined;
    if (item === undefined) return;
    if (editor.itemId !== id) {
      editor.itemId = id;
      editor.dirty = false;
      $('save-state').textContent = '';
    }
    $('editing-id').textContent = id;
    if (!editor.dirty) {
      $('edit-title').value = field(item, 'title');
      $('edit-body').value = field(item, 'body');
    }
  }

  function renderAudience() {
    const { controllers = 0, viewers = 0, connections = 0 } = client.presence ?? {};
    $('count-viewers').textContent = String(viewers);
    $('count-controllers').textContent = String(controllers);
    $('count-connections').textContent = String(connections);
    const people = [...client.audience.entries()].sort(([a], [b]) => a.localeCompare(b));
    // Presence events name who comes and goes after we connected; people who
    // were here before are only in the counts.
    const unnamed = Math.max(0, controllers + viewers - people.length);
    const rows = people.map(([userId, role]) =>
      h('li', { dataset: { userId, role } }, h('span', { class: 'person' }, userId), h('span', { class: `role ${role}` }, userId === client.userId ? `${role}, you` : role)),
    );
    if (unnamed) rows.push(h('li', { class: 'more', dataset: { testid: 'audience-unnamed' } }, `and ${unnamed} ${unnamed === 1 ? 'person' : 'people'} who were here before you`));
    $('audience-list').replaceChildren(...rows);
  }

  function render() {
    if (client.role === null) return;
    if (!isController()) {
      // A viewer on the presenter URL: the viewer's stage, and why.
      $('role-notice').textContent = `${client.userId} is a viewer of “${client.view}”: only the library's owner and its OWNER or EDITOR members can present. Showing what viewers see.`;
      $('role-notice').append(' ', h('a', { href: '/viewer' }, 'Open the viewer page'));
      $('role-notice').hidden = false;
      $('presenter').hidden = false;
      document.body.classList.add('as-viewer');
      for (const part of ['controls', 'editor']) $(part)?.remove();
      document.querySelector('.panel.items')?.remove();
      document.querySelector('.panel.audience')?.remove();
      renderStage($('stage'), client.state);
      return;
    }
    $('presenter').hidden = false;
    renderItems();
    renderStage($('stage'), client.state, { preview: true });
    renderControls();
    renderEditor();
  }

  client.addEventListener('state', render);
  client.addEventListener('presence', ({ detail }) => {
    for (const { userId, role } of detail.joined) activity(`${userId} joined (${role})`);
    for (const { userId, role } of detail.left) activity(`${userId} left (${role})`);
    if (isController()) renderAudience();
  });
  client.addEventListener('status', ({ detail }) => {
    if (detail.status === 'live') {
      $('who').textContent = `${client.userId} · ${client.view} · ${client.role}`;
      activity(`connected as ${client.userId}`);
    }
    if (detail.status === 'reconnecting' && detail.code) activity(`disconnected: ${detail.reason || 'connection lost'} (${detail.code})`);
    if (isController()) setEnabled(detail.status === 'live');
    if (detail.status === 'closed' && detail.code === 1008) showSignIn(`The server refused this link: ${detail.reason}.`, client.view);
  });
  client.addEventListener('reply', ({ detail }) => showMessage(`The server refused a message: ${detail.code}: ${detail.message}`));
  client.addEventListener('request', ({ detail }) => activity(`${detail.from?.userId ?? 'a viewer'} asked for a sync`));
  client.addEventListener('resync', () => activity('missed an update: re-reading the view'));
  client.start();
}
