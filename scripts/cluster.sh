#!/usr/bin/env bash
# Starts N local portal-sync nodes (ports 3000, 3001, …) fanning out through
# one Redis, to try several nodes by hand with wscat or the browser: connect a
# presenter to one port and viewers to others. Ctrl-C stops them all.
#
#   scripts/cluster.sh [N]                    N nodes on one SQLite demo file (one machine)
#   scripts/cluster.sh --postgres [URL] [N]   N nodes on PostgreSQL, each started from an
#                                             empty working directory of its own with no
#                                             shared file: a stand-in for N machines
#   PORTAL_REDIS_URL=redis://host:6379 scripts/cluster.sh 2
#
# --postgres without a URL uses (and creates if missing) the database
# portal_sync_cluster on the local server, postgres://postgres@127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres=""
if [ "${1:-}" = "--postgres" ]; then
  shift
  if [[ "${1:-}" == postgres://* || "${1:-}" == postgresql://* ]]; then
    postgres="$1"
    shift
  else
    postgres="postgres://postgres@127.0.0.1:5432/portal_sync_cluster"
    if ! psql "postgres://postgres@127.0.0.1:5432/postgres" -Atqc \
      "SELECT 1 FROM pg_database WHERE datname = 'portal_sync_cluster'" | grep -q 1; then
      psql "postgres://postgres@127.0.0.1:5432/postgres" -qc "CREATE DATABASE portal_sync_cluster"
    fi
  fi
fi
n="${1:-3}"
export PORTAL_REDIS_URL="${PORTAL_REDIS_URL:-redis://127.0.0.1:6379}"
export PORTAL_REDIS_PREFIX="${PORTAL_REDIS_PREFIX:-portal-sync-cluster}"
export PORTAL_JWT_SECRET="${PORTAL_JWT_SECRET:-cluster-demo-secret}"
if [ -n "$postgres" ]; then
  export PORTAL_DB="$postgres"
else
  export PORTAL_DB="${PORTAL_DB:-portal-sync-demo.db}"
fi

cargo build --release --locked
bin="$PWD/target/release/portal-sync"

pids=()
dirs=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for dir in "${dirs[@]}"; do rm -rf "$dir"; done
}
trap stop INT TERM EXIT

# Starts a node in its working directory: with PostgreSQL an empty one of its
# own (so nothing but the database and Redis is shared), else this checkout.
start_node() {
  local dir="$PWD"
  if [ -n "$postgres" ]; then
    dir=$(mktemp -d -t portal-node-XXXXXX)
    dirs+=("$dir")
  fi
  (cd "$dir" && exec "$bin" "$@") &
  pids+=($!)
}

# The first node runs `demo`: it creates the demo users, library and view if
# missing and prints links and tokens (use them on any port).
start_node demo --addr 127.0.0.1:3000
sleep 1
for ((i = 1; i < n; i++)); do
  start_node serve --addr "127.0.0.1:$((3000 + i))"
done
shown="$PORTAL_DB"
[ -n "$postgres" ] && shown="${postgres%%://*}://…@${postgres##*@}"
echo "== $n nodes on ports 3000..$((3000 + n - 1)), database $shown, Redis $PORTAL_REDIS_URL (prefix $PORTAL_REDIS_PREFIX); Ctrl-C stops them"
wait
