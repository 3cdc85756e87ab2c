// The portal-sync browser client: one connection to one portal view, kept in
// sync across disconnects, gaps and restarts. Pages read `client.state`,
// `client.version`, `client.role`, `client.transport` and listen for events;
// they never touch the socket or the wire format themselves.
//
// The connection is a WebSocket, or, where a network breaks WebSockets, the
// HTTP fallback of SPEC §7: an SSE stream for what the server sends and one
// POST per message the other way (`SseLink`, which looks like a WebSocket to
// the rest of the client). See `WS_FAILURES_BEFORE_FALLBACK` for when.
//
// Events (CustomEvent, details in brackets):
//   status    the connection changed   {status, code, reason, delayMs, transport}
//   state     the state or version changed {cause, from}
//   presence  who is watching changed  {joined, left}
//   reply     the server refused a message {code, message, id}
//   request   a viewer asked for a sync (controllers only) {from}

/** First reconnect delay; doubles per failed attempt up to RECONNECT_CAP_MS. */
export const RECONNECT_BASE_MS = 500;
export const RECONNECT_CAP_MS = 15000;
/** How long a re-sync may take before the client reconnects instead. */
export const RESYNC_TIMEOUT_MS = 5000;
/** Controllers wait this long before answering `request-sync`, so that a burst
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
export const WS_FAILURES_AFTER_LIVE = 4;
/** How often a client on the fallback tries a WebSocket again. */
export const PROBE_INTERVAL_MS = 30_000;

/**
 * Whether a close is worth reconnecting after. 1008 is the server saying no
 * (bad or expired token, no access, too many connections, rate limit):
 * retrying would fail the same way, so the client stops and shows the reason.
 * The one 1008 that asks for a reconnect is `access revoked` on a live
 * connection (SPEC §4: the user "reconnect[s] with the new role"); if access
 * is gone for good, that reconnect gets `access denied` and stops there.
 * 1000 is a normal close (ours). Everything else (1001 shutdown, 1006 network,
 * 1011 server error, 1013 slow consumer, …) is temporary.
 */
export function shouldReconnect(code, reason, wasLive) {
  if (code === 1000) return false;
  if (code === 1008) return wasLive && String(reason).startsWith('access revoked');
  return true;
}

/** Exponential backoff with "equal jitter": half the delay fixed, half random,
 * so a room of clients dropped by one restart does not return in one wave. */
export function backoffMs(attempt, random = Math.random) {
  const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** attempt);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** RFC 7386 JSON Merge Patch, as the server applies it; returns a new value. */
export function mergePatch(target, patch) {
  if (!isObject(patch)) return structuredClone(patch);
  const result = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key], value);
  }
  return result;
}

/**
 * What a message of `type` with `payload` does to the state, or null when it
 * changes nothing. An item-update is the merge patch {items: {[id]: rest}}:
 * that is what "merge the rest into state.items[id]" means under RFC 7386.
 */
export function changeOf(type, payload) {
  switch (type) {
    case 'portal-view-update':
      return isObject(payload) ? { kind: 'merge', patch: payload } : null;
    case 'item-update': {
      if (!isObject(payload) || payload.itemId === undefined) return null;
      const { itemId, ...rest } = payload;
      return { kind: 'merge', patch: { items: { [String(itemId)]: rest } } };
    }
    case 'sync-response':
      return isObject(payload) ? { kind: 'replace', state: payload } : null;
    default:
      return null;
  }
}

/** A server message, or null for anything that is not a JSON object. */
function parseMessage(data) {
  try {
    const message = JSON.parse(data);
    return isObject(message) ? message : null;
  } catch {
    return null;
  }
}

function applyChange(state, change) {
  return change.kind === 'replace' ? structuredClone(change.state) : mergePatch(state, change.patch);
}

/**
 * Server-Sent Events, incrementally: `feed` takes the stream's text as it
 * arrives, in chunks cut anywhere, and returns the events it completed, as
 * `{data, id, event}` (the WHATWG rules: CR, LF or CRLF line ends, comments
 * start with a colon, one optional space after a field's colon).
 */
export class SseParser {
  constructor() {
    this._line = '';
    this._data = null;
    this._id = null;
    this._event = null;
    this._afterCr = false;
    /** Comment lines seen (the server's keep-alives). */
    this.comments = 0;
  }

  feed(chunk) {
    const events = [];
    let start = 0;
    for (let i = 0; i < chunk.length; i++) {
      const c = chunk.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      if (c === 10 && this._afterCr && i === start) {
        // The LF of a CRLF, its CR having ended the line already.
        this._afterCr = false;
        start = i + 1;
        continue;
      }
      this._line += chunk.slice(start, i);
      this._afterCr = c === 13;
      start = i + 1;
      const event = this._takeLine();
      if (event) events.push(event);
    }
    if (start < chunk.length) {
      this._line += chunk.slice(start);
      this._afterCr = false;
    }
    return events;
  }

  _takeLine() {
    const line = this._line;
    this._line = '';
    if (line === '') {
      if (this._data === null) return null;
      const event = { data: this._data.endsWith('\n') ? this._data.slice(0, -1) : this._data, id: this._id, event: this._event ?? 'message' };
      this._data = null;
      this._event = null;
      return event;
    }
    if (line.startsWith(':')) {
      this.comments += 1;
      return null;
    }
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (name === 'data') this._data = (this._data ?? '') + value + '\n';
    else if (name === 'id') this._id = value;
    else if (name === 'event') this._event = value;
    return null;
  }
}

/**
 * What a refused SSE request (SPEC §7: the checks of §3 as HTTP statuses)
 * would have been on a WebSocket: a refusal is 1008 and stops the client, a
 * shutdown is 1001, anything else (a 500, a proxy's 502) is worth a retry.
 */
export function closeOfStatus(status, message) {
  if ([401, 403, 404, 429].includes(status)) return { code: 1008, reason: message || `HTTP ${status}` };
  if (status === 503) return { code: 1001, reason: message || 'shutting down' };
  return { code: 1011, reason: message || `HTTP ${status}` };
}

/**
 * The HTTP fallback of SPEC §7 behind the WebSocket interface the client
 * uses (`send`, `close`, `onmessage`, `onclose`): the stream is read with
 * `fetch`, not `EventSource`, so the token travels in an Authorization
 * header rather than the URL, the client sees the HTTP status of a refusal,
 * and nothing reconnects behind the client's back. Messages go out one POST
 * at a time, in order, as frames would, each naming this stream in
 * `X-Connection-Id`; the POST's answer (an `ack`, an `error`, …) is handed
 * to `onmessage` as if the stream had carried it. Its message events carry
 * the parsed object as `message` rather than the text as `data`.
 */
export class SseLink {
  constructor({ streamUrl, messagesUrl, token, fetch: fetchImpl }) {
    this.url = streamUrl;
    this.messagesUrl = messagesUrl;
    this.token = token;
    this.fetch = fetchImpl;
    this.transport = 'sse';
    /** Ours, from the stream's `connected`. */
    this.connectionId = null;
    this.onmessage = null;
    this.onclose = null;
    this._abort = new AbortController();
    this._ended = false;
    this._posts = Promise.resolve();
    this._read();
  }

  send(text) {
    if (this._ended) return;
    this._posts = this._posts.then(() => this._post(text));
  }

  close(code = 1000, reason = '') {
    this._end(code, reason);
  }

  async _read() {
    let response;
    try {
      response = await this.fetch(this.url, {
        headers: { Authorization: `Bearer ${this.token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this._abort.signal,
      });
    } catch {
      return this._end(1006, '');
    }
    if (!response.ok) {
      const { code, reason } = closeOfStatus(response.status, errorMessage(await readJson(response)));
      return this._end(code, reason);
    }
    const parser = new SseParser();
    const decoder = new TextDecoder();
    let last = null;
    try {
      const reader = response.body.getReader();
      while (!this._ended) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const event of parser.feed(decoder.decode(value, { stream: true }))) {
          const message = parseMessage(event.data);
          if (message?.type === 'closed') last = message;
          else if (message) {
            if (message.type === 'connected') this.connectionId = message.connectionId ?? null;
            this._deliver(message);
          }
        }
      }
    } catch {
      // Aborted by `close`, or the network dropped the stream.
    }
    // A stream that ends without `closed` was cut, as a WebSocket's 1006.
    this._end(last?.code ?? 1006, last?.reason ?? '');
  }

  async _post(text) {
    if (this._ended) return;
    const headers = { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json', Accept: 'application/json' };
    if (this.connectionId) headers['X-Connection-Id'] = this.connectionId;
    let response;
    let body;
    try {
      response = await this.fetch(this.messagesUrl, { method: 'POST', headers, body: text, cache: 'no-store' });
      body = await readJson(response);
    } catch {
      // Whether the server got it is unknown: end the link, so unacked
      // changes are rejected and the next `connected` tells the truth.
      return this._end(1006, 'a message could not be sent');
    }
    if (isObject(body) && typeof body.type === 'string') return this._deliver(body);
    if (response.ok) return; // `{}`: a WebSocket would have been sent nothing
    // Not a protocol answer: the request itself was refused (the token, the
    // view, a stream this node does not hold) or the server failed.
    const { code, reason } = closeOfStatus(response.status, errorMessage(body));
    this._end(code, reason);
  }

  /** Hands on a message already parsed (as `event.message`), so it is parsed once. */
  _deliver(message) {
    if (!this._ended) this.onmessage?.({ message });
  }

  _end(code, reason) {
    if (this._ended) return;
    this._ended = true;
    this._abort.abort();
    // Like a WebSocket's close event: after the call that caused it returns.
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
}

async function readJson(response) {
  try {
    return JSON.parse(await response.text());
  } catch {
    return null;
  }
}

/** The message of a REST error body (`{"error":{"code","message"}}`). */
function errorMessage(body) {
  return isObject(body) && isObject(body.error) && typeof body.error.message === 'string' ? body.error.message : '';
}

export class PortalClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.view   the portal view id
   * @param {string} options.token  a JWT; sent as `?token=` on a WebSocket (browsers cannot set its
   *   headers), as `Authorization: Bearer` on everything else
   * @param {string} [options.origin]  http(s)://host:port of the server; defaults to the page's
   * @param {'auto'|'websocket'|'sse'} [options.transport]  `auto` (the default): a WebSocket, SSE +
   *   POST when WebSockets keep failing, and back when one works again; the others stick to one
   * @param {number} [options.probeIntervalMs]  on the fallback, how often to try a WebSocket again
   * @param {typeof WebSocket} [options.WebSocket]  for tests outside a browser
   * @param {typeof fetch} [options.fetch]
   * @param {() => number} [options.random]
   */
  constructor({ view, token, origin, transport, probeIntervalMs, WebSocket: WS, fetch: fetchImpl, random } = {}) {
    super();
    this.view = view;
    this.token = token;
    const base = new URL(origin ?? globalThis.location.origin);
    const wsScheme = base.protocol === 'https:' ? 'wss:' : 'ws:';
    this.wsUrl = `${wsScheme}//${base.host}/ws/portal-view/${encodeURIComponent(view)}?token=${encodeURIComponent(token)}`;
    this.apiUrl = `${base.origin}/api/portal-views/${encodeURIComponent(view)}`;
    this.sseUrl = `${base.origin}/sse/portal-view/${encodeURIComponent(view)}`;
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
    this._nextId = 1;
    /** id -> {change, resolve, reject}, in the order sent. */
    this._pending = new Map();
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

  /** Opens the connection; it then stays open until `stop()` or a 1008. */
  start() {
    this._stopped = false;
    if (!this.socket && !this._reconnectTimer) this._open();
    return this;
  }

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

  updateView(patch) {
    return this.send('portal-view-update', patch);
  }

  updateItem(itemId, fields) {
    return this.send('item-update', { ...fields, itemId });
  }

  /** Replaces the stored state with what this presenter shows (`sync-response`). */
  sendFullSync() {
    return this.send('sync-response', this.state);
  }

  // -------------------------------------------------------------------------

  _open() {
    this._reconnectTimer = null;
    this._setStatus(this._wasLive || this._attempt > 0 ? 'reconnecting' : 'connecting', {});
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
    if (this._stopped) return this._setStatus('closed', { code, reason });
    if (!resyncRestart && !shouldReconnect(code, reason, wasLive)) {
      this._dropProbe();
      return this._setStatus('closed', { code, reason });
    }
    if (!wasLive && !resyncRestart) this._countFailure();
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
      default:
        return undefined; // pong, and whatever later versions add
    }
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
