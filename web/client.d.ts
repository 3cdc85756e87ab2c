// TypeScript declarations of web/client.js (the `portal-sync-client` package).
// tests/browser/package.test.js checks them against the module's exports and
// compiles tests/browser/types-example.ts against them.

/** A client message's answer or refusal; `code` is the server's error code, or `OFFLINE`. */
export interface PortalError extends Error {
  code: 'FORBIDDEN' | 'UNKNOWN_TYPE' | 'BAD_REQUEST' | 'RATE_LIMITED' | 'OFFLINE' | string;
}

export type Role = 'controller' | 'viewer';
export type Status = 'idle' | 'connecting' | 'live' | 'reconnecting' | 'closed';
export type Transport = 'websocket' | 'sse';
export type JsonObject = { [key: string]: unknown };

export interface Presence {
  controllers: number;
  viewers: number;
  connections: number;
}

/** Who sent a broadcast (`connectionId` is absent for REST changes). */
export interface From {
  userId: string;
  connectionId?: string;
}

export interface StatusDetail {
  status: Status;
  code: number | null;
  reason: string;
  delayMs: number | null;
  transport: Transport;
}
export interface StateDetail {
  cause: 'connected' | 'local' | 'ack' | 'broadcast' | 'snapshot' | 'revert';
  from: From | null;
}
export interface PresenceDetail {
  joined: { userId: string; role: Role }[];
  left: { userId: string; role: Role }[];
}
export interface ReplyDetail {
  code: string;
  message: string;
  id?: string | number;
}
export interface RequestDetail {
  from: From | null;
}
export interface ResyncDetail {
  via: 'rest' | 'request-sync';
}
export interface TokenDetail {
  status: 'expiring' | 'refreshing' | 'refreshed' | 'refused';
  /** The session's token expiry in seconds since the epoch, as far as the client knows. */
  exp: number | null;
  code: string | null;
  message: string;
}

export interface PortalClientEventMap {
  status: CustomEvent<StatusDetail>;
  state: CustomEvent<StateDetail>;
  presence: CustomEvent<PresenceDetail>;
  reply: CustomEvent<ReplyDetail>;
  request: CustomEvent<RequestDetail>;
  resync: CustomEvent<ResyncDetail>;
  token: CustomEvent<TokenDetail>;
}

export interface PortalClientOptions {
  /** The portal view id. */
  view: string;
  /** A JWT: `?token=` on a WebSocket, `Authorization: Bearer` on everything else. */
  token: string;
  /** Gives a fresh token: on `token-expiring` (then sent as `refresh-token`) and before a
   * (re)connect whose token has expired. */
  getToken?: () => string | Promise<string>;
  /** http(s)://host:port of the server; defaults to the page's origin. */
  origin?: string;
  /** `auto` (default): WebSocket, SSE + POST when WebSockets keep failing. */
  transport?: 'auto' | Transport;
  /** On the fallback, how often (ms) to try a WebSocket again. */
  probeIntervalMs?: number;
  /** For tests outside a browser. */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  random?: () => number;
  now?: () => number;
}

/** One connection to one portal view, kept in sync across disconnects, gaps and restarts. */
export class PortalClient extends EventTarget {
  constructor(options: PortalClientOptions);
  readonly view: string;
  /** The token in use (changes on a successful refresh). */
  readonly token: string;
  /** The token's expiry, seconds since the epoch (null if unknown). */
  readonly tokenExp: number | null;
  readonly wsUrl: string;
  readonly apiUrl: string;
  readonly sseUrl: string;
  readonly mode: 'auto' | Transport;
  readonly transport: Transport;
  readonly status: Status;
  readonly lastClose: { code: number; reason: string } | null;
  readonly role: Role | null;
  readonly userId: string | null;
  readonly connectionId: string | null;
  readonly presence: Presence;
  /** userId → role of the people known to be here. */
  readonly audience: Map<string, Role>;
  /** The state as stored at `version`. */
  readonly confirmed: JsonObject;
  readonly version: number | null;
  /** `confirmed` plus this client's changes not yet acknowledged: what a page shows. */
  readonly state: JsonObject;
  getToken: (() => string | Promise<string>) | null;

  start(): this;
  stop(): void;
  send(type: string, payload?: unknown): Promise<{ version?: number }>;
  updateView(patch: JsonObject): Promise<{ version: number }>;
  updateItem(itemId: string | number, fields: JsonObject): Promise<{ version: number }>;
  sendFullSync(): Promise<{ version: number }>;
  refreshToken(token: string): Promise<{ exp: number }>;

  addEventListener<K extends keyof PortalClientEventMap>(
    type: K,
    listener: (this: PortalClient, event: PortalClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof PortalClientEventMap>(
    type: K,
    listener: (this: PortalClient, event: PortalClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

export const RECONNECT_BASE_MS: number;
export const RECONNECT_CAP_MS: number;
export const RESYNC_TIMEOUT_MS: number;
export const SYNC_ANSWER_DELAY_MS: number;
export const WS_FAILURES_BEFORE_FALLBACK: number;
export const WS_FAILURES_AFTER_LIVE: number;
export const PROBE_INTERVAL_MS: number;

export function shouldReconnect(code: number, reason: string, wasLive: boolean): boolean;
export function backoffMs(attempt: number, random?: () => number): number;
export function tokenExp(token: string): number | null;
export function mergePatch(target: unknown, patch: unknown): unknown;
export function changeOf(
  type: string,
  payload: unknown,
): { kind: 'merge'; patch: JsonObject } | { kind: 'replace'; state: JsonObject } | null;
export function closeOfStatus(status: number, message?: string): { code: number; reason: string };

export interface SseEvent {
  data: string;
  id: string | null;
  event: string;
}
/** Server-Sent Events, incrementally, by the WHATWG rules. */
export class SseParser {
  /** Comment lines seen (the server's keep-alives). */
  comments: number;
  feed(chunk: string): SseEvent[];
}

/** The HTTP fallback (SSE + POST) behind a WebSocket-like interface. */
export class SseLink {
  constructor(options: { streamUrl: string; messagesUrl: string; token: string; fetch: typeof fetch });
  readonly transport: 'sse';
  url: string;
  messagesUrl: string;
  token: string;
  connectionId: string | null;
  onmessage: ((event: { message: JsonObject }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}
