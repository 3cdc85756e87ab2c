// The client's rules that need no connection: what a message does to the
// state (RFC 7386 merge patch), when a close is worth a reconnect and after
// how long, and when a token expires. Pure functions, so tests run them
// alone; internal to the package (client.js re-exports them).

/** First reconnect delay (ms); doubles per failed attempt up to `RECONNECT_CAP_MS`. */
export const RECONNECT_BASE_MS = 500;
/** The longest reconnect delay (ms), before jitter halves part of it. */
export const RECONNECT_CAP_MS = 15000;

/**
 * Whether a close is worth reconnecting after. 1008 is the server saying no
 * (bad or expired token, no access, too many connections, rate limit):
 * retrying would fail the same way, so the client stops and shows the reason.
 * The one 1008 that asks for a reconnect is `access revoked` on a live
 * connection (SPEC §4: the user "reconnect[s] with the new role"); if access
 * is gone for good, that reconnect gets `access denied` and stops there.
 * (A `token expired` is retried too when the client has a `getToken` hook
 * that can give it a new token: `PortalClient` decides that, not this.)
 * 1000 is a normal close (ours). Everything else (1001 shutdown, 1006 network,
 * 1011 server error, 1013 slow consumer, …) is temporary.
 * @param {number} code the close code
 * @param {string} reason the close reason
 * @param {boolean} wasLive whether the connection had reached `connected`
 * @returns {boolean}
 */
export function shouldReconnect(code, reason, wasLive) {
  if (code === 1000) return false;
  if (code === 1008) return wasLive && String(reason).startsWith('access revoked');
  return true;
}

/**
 * Exponential backoff with "equal jitter": half the delay fixed, half random,
 * so a room of clients dropped by one restart does not return in one wave.
 * @param {number} attempt failed attempts so far (0 for the first retry)
 * @param {() => number} [random] a number in [0, 1)
 * @returns {number} the delay in ms
 */
export function backoffMs(attempt, random = Math.random) {
  const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** attempt);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/**
 * The `exp` claim of a JWT (seconds since the epoch), read without checking
 * the signature: the client only uses it to know when to ask for a new
 * token; the server decides whether a token is valid. Null when the token
 * is not a JWT or has no numeric `exp`.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExp(token) {
  const part = typeof token === 'string' ? token.split('.')[1] : undefined;
  if (!part) return null;
  try {
    const base64 = part.replaceAll('-', '+').replaceAll('_', '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const claims = JSON.parse(atob(base64));
    return isObject(claims) && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch {
    return null;
  }
}

export function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/**
 * RFC 7386 JSON Merge Patch, as the server applies it.
 * @param {unknown} target
 * @param {unknown} patch
 * @returns {unknown} a new value; `target` is not changed
 */
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
 * @param {string} type
 * @param {unknown} payload
 * @returns {{kind: 'merge', patch: object} | {kind: 'replace', state: object} | null}
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

/** The state after `change` (from `changeOf`); `state` is not changed. */
export function applyChange(state, change) {
  return change.kind === 'replace' ? structuredClone(change.state) : mergePatch(state, change.patch);
}
