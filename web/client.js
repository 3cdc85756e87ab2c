/**
 * @module portal-sync-client
 *
 * The portal-sync browser client: one connection to one portal view, kept in
 * sync across disconnects, gaps and restarts. Pages read `client.state`,
 * `client.version`, `client.role`, `client.transport` and listen for events;
 * they never touch the socket or the wire format themselves. The pages the
 * server ships use it, and so can any page (`web/package.json` makes it the
 * `portal-sync-client` package; `client.d.ts` has its types).
 *
 * The connection is a WebSocket, or, where a network breaks WebSockets, the
 * HTTP fallback of SPEC §7 (`sse.js`): an SSE stream for what the server sends
 * and one POST per message the other way (`SseLink`, which looks like a
 * WebSocket to the rest of the client). See `WS_FAILURES_BEFORE_FALLBACK`.
 * The rules that need no connection (merge patch, backoff, when to
 * reconnect, a token's expiry) are in `rules.js`.
 *
 * Events (CustomEvent, details in brackets):
 *   status    the connection changed   {status, code, reason, delayMs, transport}
 *   state     the state or version changed {cause, from}
 *   presence  who is watching changed  {joined, left}
 *   reply     the server refused a message {code, message, id}
 *   request   a viewer asked for a sync (controllers only) {from}
 *   resync    a gap was seen and is being filled {via}
 *   token     the session's token (SPEC §9) {status, exp, code, message}, status one of
 *             `expiring` (the server's token-expiring), `refreshing`, `refreshed`,
 *             `refused` (the server's BAD_REQUEST, or getToken failed; the old token is kept)
 */

import { SseLink, parseMessage } from './sse.js';
import { applyChange, backoffMs, changeOf, isObject, shouldReconnect, tokenExp } from './rules.js';

export { SseLink, SseParser, closeOfStatus } from './sse.js';
export { RECONNECT_BASE_MS, RECONNECT_CAP_MS, backoffMs, changeOf, mergePatch, shouldReconnect, tokenExp } from './rules.js';

/** How long (ms) a re-sync may take before the client reconnects instead. */
export const RESYNC_TIMEOUT_MS = 5000;
/** Controllers wait this long (ms) before answering `request-sync`, so that a burst
 * of requests (a room of viewers noticing the same gap) costs one answer. */
export const SYNC_ANSWER_DELAY_MS = 100;
/** Our own close code for "re-sync took too long: reconnect now". */
const RESYNC_CLOSE = 4000;
/**
 * WebSocket attempts in a row that fail before `connected` (a close that is
 * not the server's 1008) after which the client falls back to SSE + POST. A
 * proxy that breaks WebSockets fails every attempt; a server that is merely
 * restarting fails a few, so once a WebSocket has worked on this page the
 * client allows more (`WS_FAILURES_AFTER_LIVE`, about 4–7 s of backoff)
 * before it concludes the network changed.
 */
export const WS_FAILURES_BEFORE_FALLBACK = 2;
/** `WS_FAILURES_BEFORE_FALLBACK` once a WebSocket has reached `connected` on this page. */
export const WS_FAILURES_AFTER_LIVE = 4;
/** How often (ms) a client on the fallback tries a WebSocket again. */
export const PROBE_INTERVAL_MS = 30_000;

/**
 * A connection to one portal view that stays in sync: `state` and `version`
 * follow the server's, through reconnects and gaps, with this client's own
 * unacknowledged changes applied on top. Events are listed in the module's
 * doc; `start()` opens it, `stop()` ends it.
 */
export class PortalClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.view   the portal view id
   * @param {string} options.token  a JWT; sent as `?token=` on a WebSocket (browsers cannot set its
   *   headers), as `Authorization: Bearer` on everything else
   * @param {() => string | Promise<string>} [options.getToken]  gives a fresh token: called on the
   *   server's `token-expiring` (the client then sends `refresh-token`), and before a (re)connect
   *   whose token has expired, which also makes a `token expired` close worth a reconnect
   * @param {string} [options.origin]  http(s)://host:port of the server; defaults to the page's
   * @param {'auto'|'websocket'|'sse'} [options.transport]  `auto` (the default): a WebSocket, SSE +
   *   POST when WebSockets keep failing, and back when one works again; the others stick to one
   * @param {number} [options.probeIntervalMs]  on the fallback, how often to try a WebSocket again
   * @param {typeof WebSocket} [options.WebSocket]  for tests outside a browser
   * @param {typeof fetch} [options.fetch]
   * @param {() => number} [options.random]
   * @param {() => number} [options.now]  the clock (ms since the epoch), for tests
   */
  constructor({ view, token, getToken, origin, transport, probeIntervalMs, WebSocket: WS, fetch: fetchImpl, random, now } = {}) {
    super();
    this.view = view;
    const base = new URL(origin ?? globalThis.location.origin);
    this._wsBase = `${base.protocol === 'https:' ? 'wss:' : 'ws:'}//${base.host}/ws/portal-view/${encodeURIComponent(view)}`;
    this.apiUrl = `${base.origin}/api/portal-views/${encodeURIComponent(view)}`;
    this.sseUrl = `${base.origin}/sse/portal-view/${encodeURIComponent(view)}`;
    /** The token in use, and the WebSocket URL that carries it (both change on a refresh). */
    this.token = null;
    this.wsUrl = null;
    /** The token's `exp` (seconds since the epoch): decoded from it, then as the server's `token-refreshed` says. */
    this.tokenExp = null;
    this._useToken(token, tokenExp(token));
    this.getToken = typeof getToken === 'function' ? getToken : null;
    this.now = now ?? Date.now;
    this.WebSocket = WS ?? globalThis.WebSocket;
    this.fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
    this.random = random ?? Math.random;
    /** `auto`, `websocket` or `sse`: what the page asked for. */
    this.mode = transport === 'sse' || transport === 'websocket' ? transport : 'auto';
    /** What the connection is now: `websocket`, or `sse` (SSE + POST). */
    this.transport = this.mode === 'sse' ? 'sse' : 'websocket';
    this.probeIntervalMs = probeIntervalMs ?? PROBE_INTERVAL_MS;

    /** idle | connecting | live | reconnecting | closed */
    this.status = 'idle';
    /** The last close: {code, reason}. */
    this.lastClose = null;
    this.role = null;
    this.userId = null;
    this.connectionId = null;
    this.presence = { controllers: 0, viewers: 0, connections: 0 };
    /** userId -> role of the people we know are here (from presence events). */
    this.audience = new Map();
    /** The state as the server stored it at `version`. */
    this.confirmed = {};
    this.version = null;
    /** What pages show: `confirmed` plus our changes the server has not acked yet. */
    this.state = {};
    /** The connection in use (a WebSocket or an SseLink); exposed for debugging from the console. */
    this.socket = null;

    this._attempt = 0;
    this._stopped = false;
    this._wasLive = false;
    this._reconnectTimer = null;
    /** The token the server last closed a session for as expired (with a getToken hook). */
    this._expiredToken = null;
    /** A (re)connect waiting for `getToken` first. */
    this._opening = false;
    this._nextId = 1;
    /** id -> {change, resolve, reject}, in the order sent. */
    this._pending = new Map();
    /** id -> {token, promise, resolve, reject}: refresh-token messages awaiting their answer. */
    this._refreshes = new Map();
    /** version -> change received after a gap, applied once the gap is filled. */
    this._buffer = new Map();
    /** The re-sync under way: {timer}, or null. */
    this._resync = null;
    this._answerTimer = null;
    this._restartAfterClose = false;
    /** WebSocket attempts in a row that failed before `connected`. */
    this._wsFailures = 0;
    /** Whether a WebSocket has reached `connected` on this page. */
    this._wsWorked = false;
    /** On the fallback: the WebSocket being tried, {ws, connected, queue}, or its timer. */
    this._probe = null;
    this._probeTimer = null;
  }

  /**
   * Opens the connection; it then stays open until `stop()` or a refusal (1008).
   * @returns {this}
   */
  start() {
    this._stopped = false;
    if (!this.socket && !this._reconnectTimer && !this._opening) this._open();
    return this;
  }

  /** Closes the connection (1000) and stops reconnecting; `status` becomes `closed`. */
  stop() {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._dropProbe();
    if (this.socket) this.socket.close(1000, 'bye');
    else this._setStatus('closed', { code: 1000, reason: 'stopped' });
  }

  /**
   * Sends a client message. State changes resolve with `{version}` when the
   * server acks them and reject with the server's `error` (`err.code`), or
   * when the connection drops first; other types resolve once sent.
   * @param {string} type
   * @param {unknown} [payload]
   * @returns {Promise<{version?: number}>}
   */
  send(type, payload) {
    if (this.status !== 'live' || !this.socket) {
      return Promise.reject(Object.assign(new Error('not connected'), { code: 'OFFLINE' }));
    }
    const id = this._nextId++;
    const message = payload === undefined ? { type, id } : { type, payload, id };
    const change = changeOf(type, payload);
    if (!change) {
      this.socket.send(JSON.stringify(message));
      return Promise.resolve({});
    }
    return new Promise((resolve, reject) => {
      this._pending.set(id, { change, resolve, reject });
      this.socket.send(JSON.stringify(message));
      this._publish('local');
    });
  }

  /**
   * Merge-patches the view's state (`portal-view-update`); controllers only.
   * @param {object} patch
   * @returns {Promise<{version: number}>}
   */
  updateView(patch) {
    return this.send('portal-view-update', patch);
  }

  /**
   * Merge-patches `state.items[itemId]` (`item-update`); controllers only.
   * @param {string | number} itemId
   * @param {object} fields
   * @returns {Promise<{version: number}>}
   */
  updateItem(itemId, fields) {
    return this.send('item-update', { ...fields, itemId });
  }

  /**
   * Replaces the stored state with what this presenter shows (`sync-response`).
   * @returns {Promise<{version: number}>}
   */
  sendFullSync() {
    return this.send('sync-response', this.state);
  }

  /**
   * Moves this session onto `token` (SPEC §9 `refresh-token`): resolves with
   * the new `{exp}` once the server answers `token-refreshed`, after which
   * reconnects and requests use the new token; rejects with the server's
   * `error` (`err.code` `BAD_REQUEST`: not a valid token for this user), or
   * `OFFLINE`, and the old token stays in use. Sending the same token again
   * while it is in flight returns the same promise.
   * @param {string} token
   * @returns {Promise<{exp: number}>}
   */
  refreshToken(token) {
    for (const refresh of this._refreshes.values()) if (refresh.token === token) return refresh.promise;
    if (this.status !== 'live' || !this.socket) {
      const error = Object.assign(new Error('not connected'), { code: 'OFFLINE' });
      this._emit('token', { status: 'refused', exp: this.tokenExp, code: error.code, message: error.message });
      return Promise.reject(error);
    }
    const id = this._nextId++;
    const refresh = { token };
    refresh.promise = new Promise((resolve, reject) => Object.assign(refresh, { resolve, reject }));
    this._refreshes.set(id, refresh);
    this._emit('token', { status: 'refreshing', exp: this.tokenExp, code: null, message: '' });
    this.socket.send(JSON.stringify({ type: 'refresh-token', token, id }));
    return refresh.promise;
  }

  // -------------------------------------------------------------------------

  _useToken(token, exp) {
    this.token = token;
    this.tokenExp = exp;
    this.wsUrl = `${this._wsBase}?token=${encodeURIComponent(token)}`;
    // The SSE link sends the token with every POST.
    if (this.socket instanceof SseLink) this.socket.token = token;
  }

  /** Whether the token's known `exp` is now or past (the server's rule, SPEC §2). */
  _tokenExpired() {
    return this.tokenExp !== null && this.tokenExp * 1000 <= this.now();
  }

  /** Asks `getToken` for a new token; the error it gives or throws is emitted, not thrown. */
  async _freshToken() {
    try {
      const token = await this.getToken();
      if (typeof token !== 'string' || token === '') throw new Error('getToken gave no token');
      return token;
    } catch (error) {
      this._emit('token', { status: 'refused', exp: this.tokenExp, code: 'NO_TOKEN', message: String(error?.message ?? error) });
      return null;
    }
  }

  _open() {
    this._reconnectTimer = null;
    this._setStatus(this._wasLive || this._attempt > 0 ? 'reconnecting' : 'connecting', {});
    if (this.getToken && (this._expiredToken === this.token || this._tokenExpired())) return this._openWithFreshToken();
    this._connect();
  }

  /** A (re)connect whose token has expired: a new one from `getToken` first, else stop. */
  async _openWithFreshToken() {
    this._opening = true;
    const token = await this._freshToken();
    this._opening = false;
    if (this._stopped) return; // stop() has said `closed`
    const exp = token === null ? null : tokenExp(token);
    if (token === null || token === this._expiredToken || (exp !== null && exp * 1000 <= this.now())) {
      this.lastClose = { code: 1008, reason: 'token expired' };
      this._dropProbe();
      return this._setStatus('closed', this.lastClose);
    }
    this._expiredToken = null;
    this._useToken(token, exp);
    this._connect();
  }

  _connect() {
    const socket =
      this.transport === 'sse'
        ? new SseLink({ streamUrl: this.sseUrl, messagesUrl: `${this.apiUrl}/messages`, token: this.token, fetch: this.fetch })
        : new this.WebSocket(this.wsUrl);
    this._attach(socket);
    if (this.transport === 'sse') this._scheduleProbe();
  }
  /** Makes `socket` the connection; messages and closes of any other are ignored. */
  _attach(socket) {
    this.socket = socket;
    socket.onmessage = (event) => {
      if (socket !== this.socket) return;
      const message = event.message ?? parseMessage(event.data);
      if (message) this._onMessage(message);
    };
    socket.onclose = (event) => {
      if (socket === this.socket) this._onClose(event.code, event.reason ?? '');
    };
  }

  _onClose(code, reason) {
    const wasLive = this.status === 'live';
    const resyncRestart = this._restartAfterClose;
    this._restartAfterClose = false;
    this.socket = null;
    this.lastClose = { code, reason };
    this._endResync();
    clearTimeout(this._answerTimer);
    this._answerTimer = null;
    this._buffer.clear();
    const lost = [...this._pending.values()];
    this._pending.clear();
    for (const p of lost) {
      p.reject(Object.assign(new Error('connection lost before the server confirmed'), { code: 'OFFLINE' }));
    }
    if (lost.length) this._publish('revert');
    const refreshes = [...this._refreshes.values()];
    this._refreshes.clear();
    for (const r of refreshes) r.reject(Object.assign(new Error('connection lost before the server answered'), { code: 'OFFLINE' }));
    if (refreshes.length) this._emit('token', { status: 'refused', exp: this.tokenExp, code: 'OFFLINE', message: 'connection lost before the server answered' });
    if (this._stopped) return this._setStatus('closed', { code, reason });
    // The server ended the session at its token's expiry (or refused a
    // handshake for it): with a hook that can give a new token, that is worth
    // a reconnect, which asks the hook first whatever this clock says.
    const expired = code === 1008 && String(reason).startsWith('token expired');
    if (expired && this.getToken) this._expiredToken = this.token;
    else if (!resyncRestart && !shouldReconnect(code, reason, wasLive)) {
      this._dropProbe();
      return this._setStatus('closed', { code, reason });
    }
    if (!wasLive && !resyncRestart && !expired) this._countFailure();
    const delayMs = resyncRestart ? 0 : backoffMs(this._attempt++, this.random);
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
    this._setStatus('reconnecting', { code, reason, delayMs });
    // A WebSocket tried meanwhile may already be in.
    if (this._probe?.connected) this._adoptProbe();
  }

  /**
   * A connection that failed before `connected`. A WebSocket that keeps
   * failing without the server ever saying why is taken for a network that
   * breaks them (a 1008 is the server answering: it stops the client before
   * it gets here).
   */
  _countFailure() {
    if (this.mode !== 'auto' || this.transport !== 'websocket') return;
    this._wsFailures += 1;
    if (this._wsFailures >= (this._wsWorked ? WS_FAILURES_AFTER_LIVE : WS_FAILURES_BEFORE_FALLBACK)) {
      this._wsFailures = 0;
      this.transport = 'sse';
    }
  }

  /** On the fallback, tries a WebSocket again every `probeIntervalMs`. */
  _scheduleProbe() {
    if (this.mode !== 'auto' || this._stopped || this._probe || this._probeTimer) return;
    this._probeTimer = setTimeout(() => this._startProbe(), this.probeIntervalMs);
  }

  _startProbe() {
    this._probeTimer = null;
    if (this._stopped || this.transport !== 'sse') return;
    const probe = { ws: new this.WebSocket(this.wsUrl), connected: null, queue: [] };
    this._probe = probe;
    probe.ws.onmessage = (event) => {
      if (this._probe !== probe) return;
      const message = parseMessage(event.data);
      if (!message) return;
      if (probe.connected) probe.queue.push(message);
      else if (message.type === 'connected') {
        probe.connected = message;
        this._adoptProbe();
      }
    };
    probe.ws.onclose = () => {
      if (this._probe !== probe) return;
      this._probe = null;
      this._scheduleProbe();
    };
  }

  /**
   * The probe WebSocket is in: it becomes the connection, and the SSE link
   * is closed. Not while a change of ours awaits its answer over the link
   * (that answer would be lost); the next answer or close comes back here.
   * The probe's own `connected` and what followed it bring the state.
   */
  _adoptProbe() {
    const probe = this._probe;
    if (this._stopped || !probe?.connected || this._pending.size > 0) return;
    this._probe = null;
    const old = this.socket;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._endResync();
    this.transport = 'websocket';
    this._attach(probe.ws);
    old?.close(1000, 'back on a WebSocket');
    this._onConnected(probe.connected);
    for (const message of probe.queue) this._onMessage(message);
  }

  _dropProbe() {
    clearTimeout(this._probeTimer);
    this._probeTimer = null;
    const probe = this._probe;
    this._probe = null;
    probe?.ws.close(1000, 'bye');
  }

  _onMessage(message) {
    switch (message.type) {
      case 'connected':
        return this._onConnected(message);
      case 'ack': {
        const pending = this._pending.get(message.id);
        if (!pending) return;
        this._pending.delete(message.id);
        pending.resolve({ version: message.version });
        this._sequence(message.version, pending.change, 'ack', null);
        if (this._probe?.connected) this._adoptProbe();
        return;
      }
      case 'error': {
        const refresh = this._refreshes.get(message.id);
        if (refresh) {
          this._refreshes.delete(message.id);
          refresh.reject(Object.assign(new Error(message.message), { code: message.code }));
          return this._emit('token', { status: 'refused', exp: this.tokenExp, code: message.code, message: message.message });
        }
        const pending = this._pending.get(message.id);
        if (pending) {
          this._pending.delete(message.id);
          pending.reject(Object.assign(new Error(message.message), { code: message.code }));
          this._publish('revert');
          if (this._probe?.connected) this._adoptProbe();
        }
        return this._emit('reply', { code: message.code, message: message.message, id: message.id });
      }
      case 'portal-view-update':
      case 'item-update':
      case 'sync-response': {
        const change = changeOf(message.type, message.payload);
        if (!change || typeof message.version !== 'number') return;
        return this._sequence(message.version, change, message.source === 'server' ? 'snapshot' : 'broadcast', message.from ?? null);
      }
      case 'request-sync':
        if (this.role === 'controller') this._scheduleSyncAnswer();
        return this._emit('request', { from: message.from ?? null });
      case 'presence':
        return this._onPresence(message);
      case 'token-expiring':
        this._emit('token', { status: 'expiring', exp: Number.isFinite(message.exp) ? message.exp : this.tokenExp, code: null, message: '' });
        if (this.getToken) this._renewBeforeExpiry();
        return undefined;
      case 'token-refreshed': {
        const refresh = this._refreshes.get(message.id);
        if (!refresh) return undefined;
        this._refreshes.delete(message.id);
        const exp = Number.isFinite(message.exp) ? message.exp : tokenExp(refresh.token);
        this._useToken(refresh.token, exp);
        this._expiredToken = null;
        refresh.resolve({ exp });
        return this._emit('token', { status: 'refreshed', exp, code: null, message: '' });
      }
      default:
        return undefined; // pong, and whatever later versions add
    }
  }

  /** The server's `token-expiring`: a token from the hook, sent as `refresh-token`
   * (or, if the connection dropped meanwhile, used for the next one). */
  async _renewBeforeExpiry() {
    const token = await this._freshToken();
    if (token === null || this._stopped) return;
    if (this.status === 'live') this.refreshToken(token).catch(() => {});
    else this._useToken(token, tokenExp(token));
  }

  _onConnected(message) {
    this.role = message.role;
    this.userId = message.userId;
    this.connectionId = message.connectionId;
    if (isObject(message.presence)) this.presence = message.presence;
    // We are told of others coming and going from now on; we know we are here.
    this.audience = new Map([[message.userId, message.role]]);
    this._buffer.clear();
    this.confirmed = isObject(message.state) ? message.state : {};
    this.version = message.version;
    this._attempt = 0;
    this._wasLive = true;
    if (this.transport === 'websocket') {
      this._wsFailures = 0;
      this._wsWorked = true;
    }
    this._setStatus('live', {});
    this._publish('connected');
    this._emit('presence', { joined: [], left: [] });
  }

  _onPresence(message) {
    if (isObject(message.presence)) this.presence = message.presence;
    const joined = Array.isArray(message.joined) ? message.joined : [];
    const left = Array.isArray(message.left) ? message.left : [];
    for (const { userId, role } of joined) this.audience.set(userId, role);
    for (const { userId } of left) this.audience.delete(userId);
    this._emit('presence', { joined, left });
  }

  /**
   * Applies the change that produced `version`, in version order. Versions we
   * already have are ignored; a full state (`replace`) is applied whatever came
   * before it; anything after a gap waits in the buffer while the client
   * re-syncs.
   */
  _sequence(version, change, cause, from) {
    if (this.version === null) return;
    if (change.kind === 'replace') return this._snapshot(change.state, version, cause, from);
    if (version <= this.version) return;
    if (version !== this.version + 1) {
      this._buffer.set(version, change);
      return this._startResync();
    }
    this.confirmed = applyChange(this.confirmed, change);
    this.version = version;
    this._drain();
    this._publish(cause, from);
  }

  /** A full state at `version` (a sync-response or a REST read). */
  _snapshot(state, version, cause, from) {
    if (version < this.version) return;
    this.confirmed = structuredClone(state);
    this.version = version;
    this._drain();
    this._publish(cause, from);
  }

  /** Applies buffered changes that now follow on; re-syncs again if a gap is left. */
  _drain() {
    while (this._buffer.has(this.version + 1)) {
      const change = this._buffer.get(this.version + 1);
      this._buffer.delete(this.version + 1);
      this.confirmed = applyChange(this.confirmed, change);
      this.version += 1;
    }
    for (const v of this._buffer.keys()) if (v <= this.version) this._buffer.delete(v);
    if (this._buffer.size === 0) this._endResync();
    else if (this._resync) {
      // The snapshot did not reach past the gap: ask again.
      this._endResync();
      this._startResync();
    }
  }

  /**
   * A state-changing message skipped a version. A viewer asks the controllers
   * (`request-sync`; with none online the server answers itself); a controller
   * reads the stored view over REST. If neither answers in time, reconnecting
   * brings the state with `connected`.
   */
  _startResync() {
    if (this._resync || !this.socket) return;
    const socket = this.socket;
    const timer = setTimeout(() => this._restart(socket, 'resync timed out'), RESYNC_TIMEOUT_MS);
    this._resync = { timer };
    this._emit('resync', { via: this.role === 'controller' ? 'rest' : 'request-sync' });
    if (this.role !== 'controller') {
      socket.send(JSON.stringify({ type: 'request-sync', id: this._nextId++ }));
      return;
    }
    this.fetch(this.apiUrl, {
      headers: { Authorization: `Bearer ${this.token}`, Accept: 'application/json' },
      cache: 'no-store',
    })
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`HTTP ${response.status}`))))
      .then((view) => {
        if (this.socket === socket && isObject(view.state)) this._snapshot(view.state, view.version, 'snapshot', null);
      })
      .catch(() => this._restart(socket, 'resync failed'));
  }

  /** Closes `socket` (if still ours) and reconnects at once: `connected` brings the state. */
  _restart(socket, reason) {
    if (this.socket !== socket) return;
    this._restartAfterClose = true;
    socket.close(RESYNC_CLOSE, reason);
  }

  _endResync() {
    if (!this._resync) return;
    clearTimeout(this._resync.timer);
    this._resync = null;
  }

  /** Answers viewers' `request-sync` with this presenter's state, once per burst,
   * and only while it is itself in sync (a stale answer would overwrite newer state). */
  _scheduleSyncAnswer() {
    if (this._answerTimer) return;
    this._answerTimer = setTimeout(() => {
      this._answerTimer = null;
      if (this.status === 'live' && !this._resync) this.sendFullSync().catch(() => {});
    }, SYNC_ANSWER_DELAY_MS);
  }

  /** Recomputes `state` (confirmed + pending) and tells the page. */
  _publish(cause, from = null) {
    let state = this.confirmed;
    for (const { change } of this._pending.values()) state = applyChange(state, change);
    this.state = state;
    this._emit('state', { cause, from });
  }

  _setStatus(status, { code = null, reason = '', delayMs = null }) {
    this.status = status;
    this._emit('status', { status, code, reason, delayMs, transport: this.transport });
  }

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}
