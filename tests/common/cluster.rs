//! Nodes on one database and one real Redis (`PORTAL_REDIS_URL`), for the
//! cluster test files that came after tests/cluster.rs (whose own copies of
//! the first helpers are left in place there). Each cluster has its own
//! random channel prefix, so tests sharing the Redis stay apart.

use std::time::Duration;

use portal_sync::Config;

use super::{spawn_app_with, spawn_peer, Client, TestApp, WAIT};

/// The Redis URL, or `None` (after a note) when the cluster tests are off;
/// set but Redis does not answer: the test fails.
pub async fn redis_url() -> Option<String> {
    let Ok(url) = std::env::var("PORTAL_REDIS_URL") else {
        eprintln!("note: PORTAL_REDIS_URL is not set: skipping the cluster tests");
        return None;
    };
    let mut conn = redis_conn(&url).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("Redis answers PING");
    assert_eq!(pong, "PONG");
    Some(url)
}

pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("PORTAL_REDIS_URL is a Redis URL");
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("Redis answers in time")
    .expect("PORTAL_REDIS_URL is set but Redis does not answer")
}

pub fn random_prefix() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("portal-sync-test-{hex}")
}

/// `n` nodes on one database and the Redis channel prefix `prefix`.
pub async fn cluster_with(
    url: &str,
    n: usize,
    prefix: &str,
    tweak: impl Fn(&mut Config),
) -> Vec<TestApp> {
    let with_redis = |config: &mut Config| {
        config.redis_url = Some(url.to_string());
        config.redis_prefix = prefix.to_string();
        tweak(config);
    };
    let first = spawn_app_with(with_redis).await;
    let mut nodes = Vec::with_capacity(n);
    for _ in 1..n {
        let mut config = first.config.clone();
        with_redis(&mut config);
        nodes.push(spawn_peer(&first, config).await);
    }
    nodes.insert(0, first);
    for node in &nodes {
        wait_redis_up(node).await;
    }
    nodes
}

pub async fn wait_redis_up(node: &TestApp) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = super::health(node).await.1;
        if body["redis"] == "up" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node never reached Redis: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads state-change broadcasts after version `from` until `last`,
/// checking that they come in version order with no gap and no duplicate
/// (bounded by WAIT); returns their versions.
pub async fn versions_until(client: &mut Client, from: i64, last: i64) -> Vec<i64> {
    let mut version = from;
    let mut got = Vec::new();
    while version < last {
        let msg = client.recv().await;
        let Some(v) = msg["version"].as_i64() else {
            continue; // presence
        };
        if msg["type"] == "ack" {
            continue;
        }
        assert_eq!(v, version + 1, "after version {version}: {msg}");
        version = v;
        got.push(v);
    }
    got
}

/// A metric's value in `/metrics` (the whole line's name with labels, e.g.
/// `portal_redis_messages_received_total{channel="view"}`); 0 when absent.
pub async fn metric(node: &TestApp, name: &str) -> f64 {
    let text = super::metrics(node).await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// How many connections are subscribed to `channel` (PUBSUB NUMSUB).
pub async fn numsub(url: &str, channel: &str) -> i64 {
    let mut conn = redis_conn(url).await;
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .expect("PUBSUB NUMSUB");
    n
}

/// Polls until `check` holds (bounded by WAIT).
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of a Redis: what a node sends is held back by a
/// delay, and [`RedisProxy::cut`] drops every connection through it, as a
/// network fault would (affecting no other test on the same Redis).
pub struct RedisProxy {
    pub url: String,
    cut: tokio::sync::watch::Sender<u64>,
}

impl RedisProxy {
    /// Drops every connection open through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// A [`RedisProxy`] to the Redis at `url` that holds back everything a node
/// sends by `delay` (what Redis sends back passes at once): a node whose
/// SUBSCRIBE reaches Redis late, as on a slow link.
pub async fn redis_proxy(url: &str, delay: Duration) -> RedisProxy {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (cut, cuts) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            let (held, mut due) = tokio::sync::mpsc::unbounded_channel();
            let mut cuts = cuts.clone();
            cuts.mark_unchanged();
            let relay = async move {
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client_rx.read(&mut buf).await {
                        let at = tokio::time::Instant::now() + delay;
                        if n == 0 || held.send((at, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                };
                let delayed = async {
                    while let Some((at, bytes)) = due.recv().await {
                        tokio::time::sleep_until(at).await;
                        if server_tx.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut server_rx, &mut client_tx);
                tokio::select! {
                    _ = async { tokio::join!(up, delayed) } => {}
                    _ = down => {}
                    _ = cuts.changed() => {}
                }
            };
            tokio::spawn(relay);
        }
    });
    RedisProxy {
        url: format!("redis://{addr}"),
        cut,
    }
}
