#!/usr/bin/env bash
# Starts N local portal-sync nodes (ports 3000, 3001, …) on one demo database
# and one Redis, to try the multi-node fan-out by hand with wscat or the
# browser: connect a presenter to one port and viewers to others. Ctrl-C stops
# them all.
#
#   scripts/cluster.sh [N]              (default 3 nodes)
#   PORTAL_REDIS_URL=redis://host:6379 scripts/cluster.sh 2
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-3}"
export PORTAL_REDIS_URL="${PORTAL_REDIS_URL:-redis://127.0.0.1:6379}"
export PORTAL_REDIS_PREFIX="${PORTAL_REDIS_PREFIX:-portal-sync-cluster}"
export PORTAL_DB="${PORTAL_DB:-portal-sync-demo.db}"
export PORTAL_JWT_SECRET="${PORTAL_JWT_SECRET:-cluster-demo-secret}"

cargo build --release --locked
bin=target/release/portal-sync

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

# The first node runs `demo`: it creates the demo database if missing and
# prints links and tokens (use them on any port).
"$bin" demo --addr 127.0.0.1:3000 &
pids+=($!)
sleep 1
for ((i = 1; i < n; i++)); do
  "$bin" serve --addr "127.0.0.1:$((3000 + i))" &
  pids+=($!)
done
echo "== $n nodes on ports 3000..$((3000 + n - 1)), database $PORTAL_DB, Redis $PORTAL_REDIS_URL (prefix $PORTAL_REDIS_PREFIX); Ctrl-C stops them"
wait
