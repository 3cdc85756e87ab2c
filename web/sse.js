// The HTTP fallback of SPEC §7 for web/client.js: an SSE stream for what the
// server sends and one POST per message the other way, behind the WebSocket
// interface the client uses (`SseLink`), plus the stream's parser and what a
// refused request means as a close. Internal to the package: client.js
// re-exports what is public.

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** A server message, or null for anything that is not a JSON object. */
export function parseMessage(data) {
  try {
    const message = JSON.parse(data);
    return isObject(message) ? message : null;
  } catch {
    return null;
  }
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

