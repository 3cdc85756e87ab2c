// What the sign-in, presenter and viewer pages share: credentials, the sign-in
// form, the connection status, the version, and the stage that shows the
// current item. Everything from the state is put in the page as text
// (`textContent`), never as HTML: items are written by any controller.

const STORAGE_KEY = 'portal-sync:credentials';
const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * The token and view id: from the URL fragment (`#token=…&view=…`, as the
 * demo prints them; a fragment never reaches the server, its logs or a
 * Referer), else from this tab's sessionStorage. A fragment is moved into
 * sessionStorage and wiped from the address bar, so the token does not linger
 * in history or on a screen share, and a reload still works.
 */
export function readCredentials() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has('token')) {
    const credentials = { token: hash.get('token'), view: hash.get('view') || 'demo' };
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(credentials));
    history.replaceState(null, '', location.pathname + location.search);
    return credentials;
  }
  try {
    const stored = JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? 'null');
    if (stored && typeof stored.token === 'string' && typeof stored.view === 'string') return stored;
  } catch {
    // unreadable: sign in again
  }
  return null;
}

export function forgetCredentials() {
  sessionStorage.removeItem(STORAGE_KEY);
}

/** Keeps a refreshed token for this tab, so that a reload signs in with it. */
export function saveCredentials({ token, view }) {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ token, view }));
}

/** `h('p', {class: 'x', dataset: {testid: 'y'}}, 'text', child)`: a small element builder. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'dataset') Object.assign(element.dataset, value);
    else if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? '' : String(value));
  }
  element.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

/**
 * The sign-in step: a token and a portal view id, then the presenter or the
 * viewer page. `note` says why it is shown (e.g. the token was refused).
 */
export function signInForm({ view = 'demo', note = '' } = {}) {
  const form = h(
    'form',
    { class: 'sign-in', dataset: { testid: 'sign-in' } },
    h('h1', {}, 'Sign in to a portal view'),
    note ? h('p', { class: 'note', dataset: { testid: 'sign-in-note' } }, note) : null,
    h(
      'label',
      {},
      'Token',
      h('input', { name: 'token', type: 'password', autocomplete: 'off', required: true, dataset: { testid: 'token-input' } }),
    ),
    h(
      'label',
      {},
      'Portal view',
      h('input', { name: 'view', value: view, required: true, pattern: ID_PATTERN.source.slice(1, -1), dataset: { testid: 'view-input' } }),
    ),
    h(
      'div',
      { class: 'actions' },
      h('button', { type: 'submit', name: 'page', value: 'presenter', dataset: { testid: 'open-presenter' } }, 'Open presenter'),
      h('button', { type: 'submit', name: 'page', value: 'viewer', dataset: { testid: 'open-viewer' } }, 'Open viewer'),
    ),
    h('p', { class: 'hint' }, 'portal-sync demo prints ready-made links for alice, bob and carol.'),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const page = event.submitter?.value === 'viewer' ? 'viewer' : 'presenter';
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ token: String(data.get('token')).trim(), view: String(data.get('view')).trim() }));
    location.assign(`/${page}`);
  });
  return form;
}

const CLOSE_WORDS = {
  1000: 'closed',
  1001: 'server going away',
  1006: 'connection lost',
  1011: 'server error',
  1013: 'server overloaded',
};

const TRANSPORT_WORDS = { websocket: 'WebSocket', sse: 'SSE fallback' };

/**
 * The connection options a page's address may carry: `?transport=sse` (or
 * `websocket`) pins the transport instead of falling back on its own, and
 * `?probe=<ms>` changes how often the fallback tries a WebSocket again.
 */
export function connectionOptions(search = location.search) {
  const query = new URLSearchParams(search);
  const options = {};
  const transport = query.get('transport');
  if (transport === 'sse' || transport === 'websocket') options.transport = transport;
  const probe = Number(query.get('probe'));
  if (query.has('probe') && Number.isFinite(probe) && probe >= 100) options.probeIntervalMs = probe;
  return options;
}

/** Keeps the status badge and the version in step with the client. */
export function bindStatus(client, statusElement, versionElement) {
  let tick = null;
  const render = ({ status, code, reason, delayMs, transport }) => {
    clearInterval(tick);
    statusElement.dataset.state = status;
    statusElement.dataset.code = code ?? '';
    const cause = code ? `${reason || CLOSE_WORDS[code] || 'closed'} (${code})` : '';
    statusElement.dataset.transport = transport;
    if (status === 'connecting') statusElement.textContent = 'Connecting…';
    else if (status === 'live') statusElement.textContent = `Live · ${TRANSPORT_WORDS[transport]}`;
    else if (status === 'closed') statusElement.textContent = `Closed: ${cause || 'stopped'}`;
    else if (status === 'reconnecting' && delayMs !== null) {
      const due = Date.now() + delayMs;
      const show = () => {
        const seconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
        statusElement.textContent = `Reconnecting: ${cause}, retry in ${seconds} s`;
      };
      show();
      tick = setInterval(show, 500);
    } else statusElement.textContent = `Reconnecting…${cause ? ` ${cause}` : ''}`;
    statusElement.title = statusElement.textContent;
  };
  client.addEventListener('status', (event) => render(event.detail));
  client.addEventListener('state', () => {
    versionElement.textContent = `version ${client.version}`;
    versionElement.dataset.version = String(client.version);
  });
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** The ids of `state.items` in presentation order: numeric ids by number, then the rest by name. */
export function itemIds(state) {
  const items = isObject(state.items) ? state.items : {};
  return Object.keys(items).sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
}

/** A field of an item as text (items are free-form JSON). */
export function field(item, name) {
  const value = isObject(item) ? item[name] : undefined;
  if (value === undefined || value === null) return '';
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/**
 * Draws the current item into `stage` (the big view viewers see). `preview`
 * is the presenter's copy: it keeps showing the item when it is hidden from
 * viewers, marked as such.
 */
export function renderStage(stage, state, { preview = false } = {}) {
  const ids = itemIds(state);
  const current = state.currentItem === undefined || state.currentItem === null ? null : String(state.currentItem);
  const item = current !== null && isObject(state.items) ? state.items[current] : undefined;
  const visible = state.visible !== false;
  stage.dataset.itemId = current ?? '';
  stage.dataset.visible = String(visible);
  stage.replaceChildren();
  if (!visible && !preview) {
    stage.append(h('p', { class: 'stage-hidden', dataset: { testid: 'hidden-notice' } }, 'The presenter has hidden the screen.'));
    return;
  }
  if (!visible) stage.append(h('p', { class: 'badge', dataset: { testid: 'hidden-notice' } }, 'Hidden from viewers'));
  if (item === undefined) {
    stage.append(h('p', { class: 'stage-empty', dataset: { testid: 'item-title' } }, current === null ? 'Nothing to show yet.' : `Item ${current} does not exist.`));
    return;
  }
  const position = ids.indexOf(current);
  stage.append(
    h('h1', { class: 'stage-title', dataset: { testid: 'item-title' } }, field(item, 'title') || `Item ${current}`),
    h('p', { class: 'stage-body', dataset: { testid: 'item-body' } }, field(item, 'body')),
    h('p', { class: 'stage-position', dataset: { testid: 'item-position' } }, position >= 0 ? `${position + 1} / ${ids.length}` : ''),
  );
}

/**
 * Dims the stage while the connection is down after having been live, and
 * says so: what it shows is the last state received, which may be stale.
 */
export function bindStale(client, stage, notice) {
  client.addEventListener('status', ({ detail }) => {
    const stale = detail.status === 'reconnecting' && client.version !== null;
    stage.dataset.stale = String(stale);
    notice.hidden = !stale;
    if (stale) notice.textContent = 'Reconnecting… showing the last slide received';
  });
}

/** How long before the token's `exp` the pages warn when the server has not (SPEC §9's default). */
export const TOKEN_WARNING_S = 60;

const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });

/**
 * The "your session ends soon" banner: shown on the server's
 * `token-expiring`, when the token's own `exp` is near, or when a reconnect
 * needs a new token; a pasted token is sent as `refresh-token` (or used for
 * the reconnect) and the banner hides once the server took it. `ask` is the
 * client's `getToken` hook: a promise of the next token pasted.
 */
export class TokenBanner {
  constructor() {
    this.client = null;
    this.element = null;
    this._waiting = null;
    this._warnTimer = null;
    this._tick = null;
    this.ask = this.ask.bind(this);
  }

  /** Follows `client`'s token; `view` is kept with a refreshed token for reloads. */
  bind(client, view) {
    this.client = client;
    this.view = view;
    client.addEventListener('token', ({ detail }) => this._onToken(detail));
    client.addEventListener('status', ({ detail }) => {
      if (detail.status === 'live') this._armWarning();
      if (detail.status === 'closed') this.hide();
    });
  }

  /** The getToken hook: shows the banner and resolves with the next token pasted. */
  ask() {
    this.show();
    if (!this._waiting) {
      let resolve;
      const promise = new Promise((r) => (resolve = r));
      this._waiting = { promise, resolve };
    }
    return this._waiting.promise;
  }

  show(note = '') {
    if (!this.element) this._build();
    this.element.hidden = false;
    this._note(note);
    this._render();
    clearInterval(this._tick);
    this._tick = setInterval(() => this._render(), 1000);
  }

  hide() {
    clearInterval(this._tick);
    if (this.element) this.element.hidden = true;
  }

  _armWarning() {
    clearTimeout(this._warnTimer);
    const exp = this.client.tokenExp;
    if (exp === null) return;
    // setTimeout holds at most ~24.8 days; a later warning is re-armed on the next connect.
    const due = Math.min(exp * 1000 - TOKEN_WARNING_S * 1000 - Date.now(), 2 ** 31 - 1);
    this._warnTimer = setTimeout(() => this.show(), Math.max(0, due));
  }

  _onToken({ status, code, message }) {
    if (status === 'expiring') this.show();
    else if (status === 'refreshing') this._note('Checking the new token…');
    else if (status === 'refused' && code === 'OFFLINE') this.show('Not connected: the token was not sent. Paste it again once the page is live.');
    else if (status === 'refused') this.show(`The server refused that token: ${message}. The session keeps its old token.`);
    else if (status === 'refreshed') {
      saveCredentials({ token: this.client.token, view: this.view });
      this.element?.querySelector('input')?.form?.reset();
      this.hide();
      this._armWarning();
    }
  }

  _submit(event) {
    event.preventDefault();
    const input = this.element.querySelector('input');
    const token = input.value.trim();
    if (!token) return;
    if (this._waiting) {
      // The client asked (token-expiring, or a reconnect): it sends or uses it.
      const { resolve } = this._waiting;
      this._waiting = null;
      this._note('Checking the new token…');
      resolve(token);
    } else {
      this.client.refreshToken(token).catch(() => {}); // a refusal comes as a `token` event
    }
  }

  _render() {
    const exp = this.client?.tokenExp ?? null;
    const left = exp === null ? null : Math.ceil(exp - Date.now() / 1000);
    const text = this.element.querySelector('.session-ends');
    if (left === null) text.textContent = 'Your session needs a new token.';
    else if (left > 0) text.textContent = `Your session ends at ${clock(exp)} (in ${left} s).`;
    else text.textContent = 'Your session has ended: its token expired.';
    const user = this.client?.userId ?? 'ID';
    this.element.querySelector('code').textContent = `portal-sync token --user ${user}`;
  }

  _note(text) {
    const note = this.element.querySelector('.session-note');
    note.textContent = text;
    note.hidden = text === '';
  }

  _build() {
    const form = h(
      'form',
      { class: 'session-banner', role: 'alert', dataset: { testid: 'token-banner' }, onsubmit: (event) => this._submit(event) },
      h('span', { class: 'session-ends', dataset: { testid: 'token-banner-ends' } }),
      h(
        'label',
        {},
        'Paste a new token to carry on',
        h('input', { name: 'token', type: 'password', autocomplete: 'off', dataset: { testid: 'token-banner-input' } }),
      ),
      h('button', { type: 'submit', dataset: { testid: 'token-banner-submit' } }, 'Use this token'),
      h('span', { class: 'hint' }, 'Make one on the server with ', h('code', {}), '.'),
      h('span', { class: 'session-note', dataset: { testid: 'token-banner-note' }, hidden: true }),
    );
    this.element = form;
    document.body.insertBefore(form, document.querySelector('main'));
  }
}
