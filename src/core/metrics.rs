//! The server's Prometheus metrics (`GET /metrics`), one registry per server so
//! that several servers in one process (tests, embedders) keep separate counts.
//!
//! Hot paths touch only pre-resolved children (plain atomics): a label lookup
//! per delivered frame would cost more than the delivery.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::model::Role;

pub struct Metrics {
    registry: Registry,
    controllers_open: IntGauge,
    viewers_open: IntGauge,
    /// Sessions admitted (the `connected` message was queued).
    pub connects: IntCounter,
    /// Handshakes refused by a §3 check, by close code.
    pub refused: IntCounterVec,
    /// Handshakes refused, by a bounded reason (`core::connlog::reason`) and
    /// transport: SPEC §3's checks, the origin, shutdown, Socket.IO.
    pub refused_by_reason: IntCounterVec,
    /// Closes by who ended it: our close code, `peer` or `dropped`.
    pub closes: IntCounterVec,
    /// Inbound messages by type and outcome.
    pub inbound: IntCounterVec,
    /// State-change broadcasts (one per committed change).
    pub broadcasts: IntCounter,
    /// Frames of those broadcasts queued for a connection.
    pub deliveries: IntCounter,
    /// Frames discarded with a connection closed 1013.
    pub dropped_frames: IntCounter,
    pub slow_consumer_closes: IntCounter,
    /// From commit to the broadcast being queued for every connection of the view.
    pub fanout_seconds: Histogram,
    /// One SQLite write transaction (a batch of changes).
    pub sqlite_write_seconds: Histogram,
    pub sqlite_batch_size: Histogram,
    pub presence_events: IntCounter,
    pub revocation_closes: IntCounter,
    pub pings_timed_out: IntCounter,
    /// Open SSE streams (SPEC §7), also counted in `portal_connections`.
    pub sse_streams: IntGauge,
    /// Requests by method, route pattern and status (`http::route_label`);
    /// WebSocket upgrades and SSE streams are not requests that end.
    pub http_requests: HistogramVec,
    /// Connections dropped while waiting for a request head, to keep
    /// `--max-pending-conns` (the oldest goes first).
    pub pending_dropped: IntCounter,
    /// HTTP connections dropped because a response's writes stalled for
    /// `--http-write-timeout` (the peer does not read).
    pub http_write_timeouts: IntCounter,
    /// Views whose Redis channel this node is subscribed to (rooms, plus
    /// those lingering after their last connection left).
    pub redis_subscribed_views: IntGauge,
    /// Messages received from Redis, by channel kind (`view`, `presence`,
    /// `node`): what a node pays for the cluster.
    pub redis_received: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only reachable with a malformed metric name or a duplicate registration,
    // both fixed at compile time: a programming error, not a runtime condition.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = must($m);
                must(registry.register(Box::new(m.clone())));
                m
            }};
        }
        let latency = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ];
        // What any process exports: the build, and on Linux the `process_*`
        // family (CPU seconds, resident and virtual memory, open and maximum
        // file descriptors, start time).
        reg!(IntGaugeVec::new(
            Opts::new("portal_build_info", "The running build; always 1"),
            &["version"]
        ))
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        #[cfg(target_os = "linux")]
        must(registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        let connections = reg!(IntGaugeVec::new(
            Opts::new("portal_connections", "Open connections by role"),
            &["role"]
        ));
        Metrics {
            controllers_open: connections.with_label_values(&["controller"]),
            viewers_open: connections.with_label_values(&["viewer"]),
            connects: reg!(IntCounter::new(
                "portal_connects_total",
                "Connections admitted"
            )),
            refused: reg!(IntCounterVec::new(
                Opts::new(
                    "portal_handshakes_refused_total",
                    "Handshakes refused, by close code"
                ),
                &["code"]
            )),
            refused_by_reason: reg!(IntCounterVec::new(
                Opts::new(
                    "portal_handshakes_refused_by_reason_total",
                    "Handshakes refused, by reason and transport (ws, sse)"
                ),
                &["reason", "transport"]
            )),
            closes: reg!(IntCounterVec::new(
                Opts::new(
                    "portal_closes_total",
                    "Connections ended, by our close code, `peer` or `dropped`"
                ),
                &["code"]
            )),
            inbound: reg!(IntCounterVec::new(
                Opts::new(
                    "portal_inbound_messages_total",
                    "Inbound messages by type and outcome"
                ),
                &["type", "outcome"]
            )),
            broadcasts: reg!(IntCounter::new(
                "portal_broadcasts_total",
                "State changes broadcast"
            )),
            deliveries: reg!(IntCounter::new(
                "portal_deliveries_total",
                "Broadcast frames queued for connections"
            )),
            dropped_frames: reg!(IntCounter::new(
                "portal_queue_dropped_frames_total",
                "Queued frames discarded when a slow consumer was closed"
            )),
            slow_consumer_closes: reg!(IntCounter::new(
                "portal_slow_consumer_closes_total",
                "Connections closed 1013 slow consumer"
            )),
            fanout_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "portal_fanout_seconds",
                    "From a batch's commit until its broadcasts are queued for every connection"
                )
                .buckets(latency.clone())
            )),
            sqlite_write_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "portal_sqlite_write_seconds",
                    "One SQLite write transaction (a batch of changes)"
                )
                .buckets(latency.clone())
            )),
            sqlite_batch_size: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "portal_sqlite_batch_size",
                    "Changes committed per transaction"
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0
                ])
            )),
            presence_events: reg!(IntCounter::new(
                "portal_presence_events_total",
                "Presence events queued for controllers"
            )),
            revocation_closes: reg!(IntCounter::new(
                "portal_revocation_closes_total",
                "Connections closed 1008 access revoked"
            )),
            pings_timed_out: reg!(IntCounter::new(
                "portal_ping_timeouts_total",
                "Connections dropped for not answering a ping"
            )),
            sse_streams: reg!(IntGauge::new(
                "portal_sse_streams",
                "Open SSE streams (the HTTP fallback), also counted in portal_connections"
            )),
            http_requests: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "portal_http_request_seconds",
                    "HTTP requests until the response head, by method, route pattern and status \
                     (WebSocket upgrades and SSE streams are not counted)"
                )
                .buckets(latency),
                &["method", "route", "status"]
            )),
            pending_dropped: reg!(IntCounter::new(
                "portal_pending_dropped_total",
                "Connections dropped before a complete request head because --max-pending-conns were waiting (oldest first)"
            )),
            http_write_timeouts: reg!(IntCounter::new(
                "portal_http_write_timeouts_total",
                "HTTP connections dropped because a response made no progress for --http-write-timeout"
            )),
            redis_subscribed_views: reg!(IntGauge::new(
                "portal_redis_subscribed_views",
                "Views whose Redis channel this node is subscribed to"
            )),
            redis_received: reg!(IntCounterVec::new(
                Opts::new(
                    "portal_redis_messages_received_total",
                    "Messages received from Redis, by channel kind"
                ),
                &["channel"]
            )),
            registry,
        }
    }

    pub fn opened(&self, role: Role) {
        self.connects.inc();
        self.open_gauge(role).inc();
    }

    pub fn closed(&self, role: Role) {
        self.open_gauge(role).dec();
    }

    fn open_gauge(&self, role: Role) -> &IntGauge {
        match role {
            Role::Controller => &self.controllers_open,
            Role::Viewer => &self.viewers_open,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
