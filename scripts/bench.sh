#!/usr/bin/env bash
# Side-by-side benchmark: portal-sync against the two peers of
# ../shared/bench (limit: bare tokio-tungstenite broadcast, the ceiling of this
# stack; fastify: the usual Node way), driven by one load generator
# (examples/loadgen.rs), runs interleaved (A B C A B C …) with a fresh server
# per run, medians printed as a table (scripts/bench-report.py).
#
# Not part of scripts/test.sh: a full run takes several minutes.
#
#   scripts/bench.sh                       # everything, 3 runs
#   scripts/bench.sh --quick               # 1 run, small N: a smoke test
#   scripts/bench.sh --runs 5 --servers "portal-sync limit" --scenarios "fanout burst"
#   scripts/bench.sh --scenarios scale --scale "1000 2000 5000 10000"
#   scripts/bench.sh --report target/bench/results/20260101-120000   # table only
#
# Scenarios:
#   handshake  N_IDLE viewers connect (CONNECT_CONCURRENCY in flight): handshakes/s,
#              handshake p50/p99, server KiB per idle connection
#   fanout     N_FANOUT viewers on 1 view, RATE updates/s for DURATION s:
#              delivery p99, server CPU µs per delivery, order and loss
#   burst      N_BURST viewers on 1 view, BURST_UPDATES updates back to back: deliveries/s
#   acked      portal-sync servers only: N_ACKED viewers (a list runs each), one
#              controller sending ACKED_UPDATES updates with ids (WINDOW in
#              flight): acked updates/s
#   scale      fanout at each N of SCALE_NS (latency, CPU per delivery, memory vs N)
#   rooms      many small audiences: ROOMS_VIEWS views × ROOMS_VIEWERS viewers each,
#              one controller per view (ed0…), each sending ROOMS_RATE updates/s
#              for DURATION s: delivery p50/p99, server CPU µs per delivery
#
# Servers: portal-sync (one node, SQLite), base (BASE_BIN, the same), limit,
# fastify, and with PostgreSQL (PG_URL) and Redis (REDIS_URL):
#   portal-pg       one node on PostgreSQL: a fresh database per run, copied
#                   from a template database portal_bench_tpl_<N> made once
#   portal-pg2      two nodes on that database + Redis (a fresh --redis-prefix
#                   per run); viewers split over both, the controller on the first
#   portal-sqlite2  two nodes on one SQLite file + Redis, split the same way
#   base-pg         BASE_BIN as portal-pg (A/B of a change on PostgreSQL)
#
# Environment (defaults in brackets): BENCH_PEERS_DIR [../shared/bench],
# RUNS [3], SERVERS, SCENARIOS, N_IDLE [10000], N_FANOUT [5000], N_BURST [5000],
# N_ACKED ["1000"], RATE [50], DURATION [10], BURST_UPDATES [200],
# ACKED_UPDATES [20000], WINDOW [512], CONNECT_CONCURRENCY [256],
# SCALE_NS ["1000 2000 5000 10000"], ROOMS_VIEWS [100], ROOMS_VIEWERS [50],
# ROOMS_RATE [20], SQLITE_SYNCHRONOUS [full],
# PORT_BASE [29100], SKIP_BUILD [0], BASE_BIN (a portal-sync binary run as
# server `base`, to measure a change A/B in the same run), RUST_LOG (portal-sync's logging, default info
# as shipped), RESULTS (output folder), PG_URL [postgres://postgres@127.0.0.1:5432]
# (server and user, no database), PG_RUN_DB [portal_bench_run], REDIS_URL
# [redis://127.0.0.1:6379].
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BENCH_PEERS_DIR=${BENCH_PEERS_DIR:-$ROOT/../shared/bench}
RUNS=${RUNS:-3}
SERVERS=${SERVERS:-"portal-sync limit fastify"}
SCENARIOS=${SCENARIOS:-"handshake fanout rooms burst acked"}
N_IDLE=${N_IDLE:-10000}
N_FANOUT=${N_FANOUT:-5000}
N_BURST=${N_BURST:-5000}
N_ACKED=${N_ACKED:-1000}
RATE=${RATE:-50}
DURATION=${DURATION:-10}
BURST_UPDATES=${BURST_UPDATES:-200}
ACKED_UPDATES=${ACKED_UPDATES:-20000}
WINDOW=${WINDOW:-512}
CONNECT_CONCURRENCY=${CONNECT_CONCURRENCY:-256}
SCALE_NS=${SCALE_NS:-"1000 2000 5000 10000"}
ROOMS_VIEWS=${ROOMS_VIEWS:-100}
ROOMS_VIEWERS=${ROOMS_VIEWERS:-50}
ROOMS_RATE=${ROOMS_RATE:-20}
SQLITE_SYNCHRONOUS=${SQLITE_SYNCHRONOUS:-full}
PORT_BASE=${PORT_BASE:-29100}  # below the ephemeral range (32768+), where outgoing sockets never sit
SKIP_BUILD=${SKIP_BUILD:-0}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PG_RUN_DB=${PG_RUN_DB:-portal_bench_run}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
SECRET=bench-secret-$$
REPORT_ONLY=

while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --scale) SCALE_NS=$2; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --quick)
      RUNS=1 N_IDLE=2000 N_FANOUT=1000 N_BURST=1000
      DURATION=3 ACKED_UPDATES=5000 SCALE_NS="500 1000"
      N_ACKED="0 200" ROOMS_VIEWS=20 ROOMS_VIEWERS=20 ;;
    --report) REPORT_ONLY=$2; shift ;;
    -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$REPORT_ONLY" ]; then
  exec python3 scripts/bench-report.py "$REPORT_ONLY"
fi

if [ ! -f "$BENCH_PEERS_DIR/fixture.py" ]; then
  echo "no fixture.py in $BENCH_PEERS_DIR: set BENCH_PEERS_DIR to the shared bench folder" >&2
  exit 1
fi
BENCH_PEERS_DIR=$(cd "$BENCH_PEERS_DIR" && pwd)

BENCH=$ROOT/target/bench
RESULTS=${RESULTS:-$BENCH/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
PORTAL=$ROOT/target/release/portal-sync
LOADGEN=$ROOT/target/release/examples/loadgen
LIMIT=$BENCH/limit/release/limit
FASTIFY=$BENCH/fastify

# --- build ---------------------------------------------------------------
if [ "$SKIP_BUILD" != 1 ]; then
  echo "== building portal-sync and loadgen" >&2
  cargo build --release --locked --bin portal-sync --example loadgen
  if [[ " $SERVERS " == *" limit "* ]]; then
    echo "== building the limit peer (into target/bench/limit)" >&2
    cargo build --release --locked \
      --manifest-path "$BENCH_PEERS_DIR/peers/limit/Cargo.toml" --target-dir "$BENCH/limit"
  fi
  if [[ " $SERVERS " == *" fastify "* ]]; then
    # Copied, so that npm writes node_modules under target/, not into shared/.
    if ! cmp -s "$BENCH_PEERS_DIR/peers/fastify/package-lock.json" "$FASTIFY/package-lock.json" \
       || [ ! -d "$FASTIFY/node_modules" ]; then
      echo "== installing the fastify peer (npm ci, into target/bench/fastify)" >&2
      rm -rf "$FASTIFY"
      mkdir -p "$FASTIFY"
      cp "$BENCH_PEERS_DIR"/peers/fastify/{package.json,package-lock.json,server.js} "$FASTIFY/"
      (cd "$FASTIFY" && npm ci --no-audit --no-fund)
    else
      cp "$BENCH_PEERS_DIR/peers/fastify/server.js" "$FASTIFY/"
    fi
  fi
fi

# --- environment -----------------------------------------------------------
# Each side of 10,000 connections needs 10,000 descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "open files limit: $(ulimit -n)" >&2

uses() { [[ " $SERVERS " == *" $1 "* ]]; }
uses_pg() { uses portal-pg || uses portal-pg2 || uses base-pg; }
uses_redis() { uses portal-pg2 || uses portal-sqlite2; }
is_portal() { case "$1" in portal-sync|base|portal-pg|base-pg|portal-pg2|portal-sqlite2) return 0 ;; esac; return 1; }

ROOMS_N=$((ROOMS_VIEWS * ROOMS_VIEWERS))
max_n=$N_IDLE
for n in $N_FANOUT $N_BURST $N_ACKED $SCALE_NS $ROOMS_N; do [ "$n" -gt "$max_n" ] && max_n=$n; done
# Views pv0… and their controllers ed0… for the rooms scenario (the others use pv0 and ed0).
n_views=1
[[ " $SCENARIOS " == *" rooms "* ]] && n_views=$ROOMS_VIEWS
FIXTURE=$BENCH/fixture-$max_n.db
[ "$n_views" -gt 1 ] && FIXTURE=$BENCH/fixture-$max_n-p$n_views.db
if [ ! -f "$FIXTURE" ]; then
  python3 "$BENCH_PEERS_DIR/fixture.py" --db "$FIXTURE" --viewers "$max_n" --controllers "$n_views" --views "$n_views" >&2
fi

psql_on() {  # psql_on DATABASE ARGS…: quiet, stop at the first error
  local db=$1; shift
  psql -X -q -v ON_ERROR_STOP=1 -d "$PG_URL/$db" "$@"
}

# The PostgreSQL counterpart of the fixture file: a template database with the
# server's own schema (created by the binary under test, through an admin
# command) and the fixture's rows, copied table by table. Made once per fixture
# and binary (both hashed into the database's comment), under a temporary name
# renamed at the end, so an interrupted build is never used.
PG_TEMPLATE=portal_bench_tpl_$max_n
[ "$n_views" -gt 1 ] && PG_TEMPLATE=${PG_TEMPLATE}_p$n_views
pg_template() {
  local stamp current tmp=${PG_TEMPLATE}_tmp
  stamp="bin $(sha256sum "$PORTAL" | cut -c1-16) fixture $(sha256sum "$FIXTURE" | cut -c1-16)"
  current=$(psql_on postgres -Atc "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '$PG_TEMPLATE'")
  if [ "$current" = "$stamp" ]; then return 0; fi
  echo "== making the PostgreSQL template $PG_TEMPLATE from $FIXTURE" >&2
  psql_on postgres -c "DROP DATABASE IF EXISTS $tmp WITH (FORCE)" -c "CREATE DATABASE $tmp"
  "$PORTAL" --db "$PG_URL/$tmp" user list >/dev/null   # the server's schema
  local table cols
  for table in users libraries library_members portal_views; do
    case "$table" in
      users) cols="id, email, name" ;;
      libraries) cols="id, name, owner_id" ;;
      library_members) cols="library_id, user_id, role" ;;
      portal_views) cols="id, library_id, name, state, version, updated_at" ;;
    esac
    python3 -c 'import csv, sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(f"SELECT {sys.argv[3]} FROM {sys.argv[2]}")
csv.writer(sys.stdout).writerows(rows)' "$FIXTURE" "$table" "$cols" \
      | psql_on "$tmp" -c "\\copy $table ($cols) FROM STDIN WITH (FORMAT csv)"
  done
  # Planner statistics now, rather than from autovacuum in the middle of a run.
  psql_on "$tmp" -c "VACUUM ANALYZE"
  psql_on postgres -c "DROP DATABASE IF EXISTS $PG_TEMPLATE WITH (FORCE)" \
    -c "ALTER DATABASE $tmp RENAME TO $PG_TEMPLATE" \
    -c "COMMENT ON DATABASE $PG_TEMPLATE IS '$stamp'"
}

# A fresh copy of the template for each run, as SQLite runs get a fresh file.
fresh_pg() {
  psql_on postgres -c "DROP DATABASE IF EXISTS $PG_RUN_DB WITH (FORCE)" \
    -c "CREATE DATABASE $PG_RUN_DB TEMPLATE $PG_TEMPLATE"
}

if uses_pg; then
  command -v psql >/dev/null || { echo "portal-pg needs psql" >&2; exit 1; }
  pg_template
fi
if uses_redis; then
  command -v redis-cli >/dev/null || { echo "portal-pg2 and portal-sqlite2 need redis-cli" >&2; exit 1; }
  redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "no Redis at $REDIS_URL" >&2; exit 1; }
fi

PORTAL_EXTRA=()
if "$PORTAL" serve --help | grep -q -- --rate-per-sec; then
  # The bench's controllers send far more than 100 messages/s back to back.
  PORTAL_EXTRA+=(--rate-per-sec 1000000 --rate-burst 1000000)
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "kernel: $(uname -r)"
  echo "node: $(node --version 2>/dev/null || echo none)"
  echo "rustc: $(rustc --version)"
  echo "servers: $SERVERS"
  echo "sqlite_synchronous: $SQLITE_SYNCHRONOUS"
  if uses_pg; then
    echo "postgresql: $(psql_on postgres -Atc "SELECT concat_ws(', ', split_part(version(), ' on ', 1),
      'synchronous_commit=' || current_setting('synchronous_commit'), 'fsync=' || current_setting('fsync'),
      'wal_sync_method=' || current_setting('wal_sync_method'), 'shared_buffers=' || current_setting('shared_buffers'))")"
  fi
  if uses_redis; then
    echo "redis: $(redis-cli -u "$REDIS_URL" info server | tr -d '\r' | grep -m1 '^redis_version:')"
  fi
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$RESULTS/machine.txt"

SERVER_PIDS=()
REDIS_PREFIX=
stop_server() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
  if [ -n "$REDIS_PREFIX" ]; then
    # The nodes' presence hashes and heartbeat keys of this run.
    redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX:*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null || true
    REDIS_PREFIX=
  fi
}
cleanup() {
  stop_server
  if uses_pg; then psql_on postgres -c "DROP DATABASE IF EXISTS $PG_RUN_DB WITH (FORCE)" 2>/dev/null || true; fi
}
trap cleanup EXIT

# wait_port PORT PID: until the server listens, or has died.
wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# A previous server (ours or anyone's) may still hold the port for a moment.
wait_port_free() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0
    sleep 0.1
  done
  echo "port $1 stays busy: set PORT_BASE" >&2
  return 1
}

# portal_node BIN PORT LOG DB ARGS…: one portal-sync node, in the background.
portal_node() {
  local bin=$1 port=$2 log=$3 db=$4; shift 4
  "$bin" serve --db "$db" --jwt-secret "$SECRET" --addr "127.0.0.1:$port" \
    "${PORTAL_EXTRA[@]}" "$@" 2>"$log" &
  SERVER_PIDS+=($!)
  PORTS+=("$port")
  LOGS+=("$log")
}

fresh_sqlite() {
  cp "$FIXTURE" "$BENCH/run.db"; rm -f "$BENCH/run.db-wal" "$BENCH/run.db-shm"
}

RUN_SEQ=0
# start_server NAME LOG: a fresh server (and a fresh copy of the fixture).
# Sets SERVER_URL (the controller's), VIEWER_URLS (comma-separated, empty for
# one node) and PG_DB (the database whose backends' CPU counts, or empty).
start_server() {
  local name=$1 log=$2 p i
  local second=${log%.server.log}.server2.log
  local redis=()
  PORTS=() LOGS=() VIEWER_URLS= PG_DB=
  for p in $PORT_BASE $((PORT_BASE + 1)) $((PORT_BASE + 2)) $((PORT_BASE + 3)); do wait_port_free "$p"; done
  RUN_SEQ=$((RUN_SEQ + 1))
  if [[ "$name" == *2 ]]; then
    REDIS_PREFIX=portal-bench-$$-$RUN_SEQ
    redis=(--redis-url "$REDIS_URL" --redis-prefix "$REDIS_PREFIX")
  fi
  case "$name" in
    portal-sync|base)
      local bin=$PORTAL
      [ "$name" = base ] && bin=${BASE_BIN:?set BASE_BIN to the portal-sync binary to compare with}
      fresh_sqlite
      portal_node "$bin" "$PORT_BASE" "$log" "$BENCH/run.db" --sqlite-synchronous "$SQLITE_SYNCHRONOUS"
      ;;
    portal-sqlite2)
      fresh_sqlite
      portal_node "$PORTAL" "$PORT_BASE" "$log" "$BENCH/run.db" --sqlite-synchronous "$SQLITE_SYNCHRONOUS" "${redis[@]}"
      portal_node "$PORTAL" $((PORT_BASE + 3)) "$second" "$BENCH/run.db" --sqlite-synchronous "$SQLITE_SYNCHRONOUS" "${redis[@]}"
      ;;
    portal-pg|base-pg)
      local bin=$PORTAL
      [ "$name" = base-pg ] && bin=${BASE_BIN:?set BASE_BIN to the portal-sync binary to compare with}
      fresh_pg
      PG_DB=$PG_RUN_DB
      portal_node "$bin" "$PORT_BASE" "$log" "$PG_URL/$PG_RUN_DB"
      ;;
    portal-pg2)
      fresh_pg
      PG_DB=$PG_RUN_DB
      portal_node "$PORTAL" "$PORT_BASE" "$log" "$PG_URL/$PG_RUN_DB" "${redis[@]}"
      portal_node "$PORTAL" $((PORT_BASE + 3)) "$second" "$PG_URL/$PG_RUN_DB" "${redis[@]}"
      ;;
    fastify)
      node "$FASTIFY/server.js" --port $((PORT_BASE + 1)) --db "$FIXTURE" --secret "$SECRET" 2>"$log" &
      SERVER_PIDS+=($!) PORTS+=($((PORT_BASE + 1))) LOGS+=("$log")
      ;;
    limit)
      "$LIMIT" --addr "127.0.0.1:$((PORT_BASE + 2))" 2>"$log" &
      SERVER_PIDS+=($!) PORTS+=($((PORT_BASE + 2))) LOGS+=("$log")
      ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  SERVER_URL=ws://127.0.0.1:${PORTS[0]}
  if [ "${#PORTS[@]}" -gt 1 ]; then
    VIEWER_URLS=$(for p in "${PORTS[@]}"; do printf 'ws://127.0.0.1:%s,' "$p"; done)
    VIEWER_URLS=${VIEWER_URLS%,}
  fi
  for i in "${!PORTS[@]}"; do
    wait_port "${PORTS[$i]}" "${SERVER_PIDS[$i]}" \
      || { echo "$name did not start; see ${LOGS[$i]}" >&2; cat "${LOGS[$i]}" >&2; return 1; }
  done
}

# run_one SCENARIO SERVER RUN [N]
run_one() {
  local scenario=$1 server=$2 run=$3 n=${4:-} args=() label
  case "$scenario" in
    handshake) n=$N_IDLE; args=(--mode idle) ;;
    fanout) n=$N_FANOUT; args=(--rate "$RATE" --duration "$DURATION") ;;
    scale) args=(--rate "$RATE" --duration "$DURATION") ;;
    burst) n=$N_BURST; args=(--rate 0 --updates "$BURST_UPDATES") ;;
    rooms) n=$ROOMS_N; args=(--views "$ROOMS_VIEWS" --rate "$ROOMS_RATE" --duration "$DURATION") ;;
    acked)
      is_portal "$server" || return 0
      args=(--rate 0 --updates "$ACKED_UPDATES" --ids --window "$WINDOW") ;;
  esac
  label="$scenario/$server/$n/$run"
  local log=$RESULTS/${scenario}-${server}-${n}-${run}
  start_server "$server" "$log.server.log"
  local extra=()
  [ "$server" = limit ] || extra+=(--secret "$SECRET")
  [ -z "$VIEWER_URLS" ] || extra+=(--viewer-servers "$VIEWER_URLS")
  [ -z "$PG_DB" ] || extra+=(--pg-database "$PG_DB")
  echo "== $label" >&2
  local out pids
  pids=$(IFS=,; echo "${SERVER_PIDS[*]}")
  if out=$(timeout 300 "$LOADGEN" --server "$SERVER_URL" --server-pid "$pids" \
      --viewers "$n" --connect-concurrency "$CONNECT_CONCURRENCY" "${extra[@]}" \
      --label "$label" "${args[@]}" 2>"$log.loadgen.log"); then
    echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["scenario"],d["server_name"],d["n"],d["run"]=sys.argv[1:5]; print(json.dumps(d))' \
      "$scenario" "$server" "$n" "$run" >> "$RESULTS/results.jsonl"
    tail -n 1 "$log.loadgen.log" >&2
  else
    echo "   loadgen failed (see $log.loadgen.log)" >&2
    tail -n 3 "$log.loadgen.log" >&2
  fi
  stop_server
}

# Interleaved: each N of a scenario runs on every server before the next N,
# and every scenario once before the next run.
for run in $(seq "$RUNS"); do
  for scenario in $SCENARIOS; do
    case "$scenario" in
      scale) ns=$SCALE_NS ;;
      acked) ns=$N_ACKED ;;
      *) ns=- ;;
    esac
    for n in $ns; do
      for server in $SERVERS; do
        if [ "$n" = - ]; then run_one "$scenario" "$server" "$run"; else run_one "$scenario" "$server" "$run" "$n"; fi
      done
    done
  done
done

echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RESULTS/machine.txt"
echo "results: $RESULTS" >&2
python3 scripts/bench-report.py "$RESULTS"
