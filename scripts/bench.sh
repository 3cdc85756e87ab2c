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
#   acked      portal-sync only: N_ACKED viewers, one controller sending
#              ACKED_UPDATES updates with ids (WINDOW in flight): acked updates/s
#   scale      fanout at each N of SCALE_NS (latency, CPU per delivery, memory vs N)
#
# Environment (defaults in brackets): BENCH_PEERS_DIR [../shared/bench],
# RUNS [3], SERVERS, SCENARIOS, N_IDLE [10000], N_FANOUT [5000], N_BURST [5000],
# N_ACKED [1000], RATE [50], DURATION [10], BURST_UPDATES [200],
# ACKED_UPDATES [20000], WINDOW [512], CONNECT_CONCURRENCY [256],
# SCALE_NS ["1000 2000 5000 10000"], SQLITE_SYNCHRONOUS [full],
# PORT_BASE [29100], SKIP_BUILD [0], BASE_BIN (a portal-sync binary run as
# server `base`, to measure a change A/B in the same run), RUST_LOG (portal-sync's logging, default info
# as shipped), RESULTS (output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BENCH_PEERS_DIR=${BENCH_PEERS_DIR:-$ROOT/../shared/bench}
RUNS=${RUNS:-3}
SERVERS=${SERVERS:-"portal-sync limit fastify"}
SCENARIOS=${SCENARIOS:-"handshake fanout burst acked"}
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
SQLITE_SYNCHRONOUS=${SQLITE_SYNCHRONOUS:-full}
PORT_BASE=${PORT_BASE:-29100}  # below the ephemeral range (32768+), where outgoing sockets never sit
SKIP_BUILD=${SKIP_BUILD:-0}
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
      RUNS=1 N_IDLE=2000 N_FANOUT=1000 N_BURST=1000 N_ACKED=200
      DURATION=3 ACKED_UPDATES=5000 SCALE_NS="500 1000" ;;
    --report) REPORT_ONLY=$2; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
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

max_n=$N_IDLE
for n in $N_FANOUT $N_BURST $N_ACKED $SCALE_NS; do [ "$n" -gt "$max_n" ] && max_n=$n; done
FIXTURE=$BENCH/fixture-$max_n.db
if [ ! -f "$FIXTURE" ]; then
  python3 "$BENCH_PEERS_DIR/fixture.py" --db "$FIXTURE" --viewers "$max_n" --controllers 1 --views 1 >&2
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
  echo "sqlite_synchronous: $SQLITE_SYNCHRONOUS"
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$RESULTS/machine.txt"

SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT

wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
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

# start_server NAME LOG: a fresh server (and a fresh copy of the fixture).
start_server() {
  local name=$1 log=$2 port
  for p in $PORT_BASE $((PORT_BASE + 1)) $((PORT_BASE + 2)); do wait_port_free "$p"; done
  case "$name" in
    portal-sync|base)
      port=$PORT_BASE
      local bin=$PORTAL
      [ "$name" = base ] && bin=${BASE_BIN:?set BASE_BIN to the portal-sync binary to compare with}
      cp "$FIXTURE" "$BENCH/run.db"; rm -f "$BENCH/run.db-wal" "$BENCH/run.db-shm"
      "$bin" serve --db "$BENCH/run.db" --jwt-secret "$SECRET" --addr "127.0.0.1:$port" \
        --sqlite-synchronous "$SQLITE_SYNCHRONOUS" "${PORTAL_EXTRA[@]}" 2>"$log" &
      ;;
    fastify)
      port=$((PORT_BASE + 1))
      node "$FASTIFY/server.js" --port "$port" --db "$FIXTURE" --secret "$SECRET" 2>"$log" &
      ;;
    limit)
      port=$((PORT_BASE + 2))
      "$LIMIT" --addr "127.0.0.1:$port" 2>"$log" &
      ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  SERVER_PID=$!
  SERVER_URL=ws://127.0.0.1:$port
  wait_port "$port" || { echo "$name did not start; see $log" >&2; cat "$log" >&2; return 1; }
}

# run_one SCENARIO SERVER RUN [N]
run_one() {
  local scenario=$1 server=$2 run=$3 n=${4:-} args=() label
  case "$scenario" in
    handshake) n=$N_IDLE; args=(--mode idle) ;;
    fanout) n=$N_FANOUT; args=(--rate "$RATE" --duration "$DURATION") ;;
    scale) args=(--rate "$RATE" --duration "$DURATION") ;;
    burst) n=$N_BURST; args=(--rate 0 --updates "$BURST_UPDATES") ;;
    acked)
      [ "$server" = portal-sync ] || [ "$server" = base ] || return 0
      n=$N_ACKED; args=(--rate 0 --updates "$ACKED_UPDATES" --ids --window "$WINDOW") ;;
  esac
  label="$scenario/$server/$n/$run"
  local log=$RESULTS/${scenario}-${server}-${n}-${run}
  start_server "$server" "$log.server.log"
  local auth=()
  [ "$server" = limit ] || auth=(--secret "$SECRET")
  echo "== $label" >&2
  local out
  if out=$(timeout 300 "$LOADGEN" --server "$SERVER_URL" --server-pid "$SERVER_PID" \
      --viewers "$n" --connect-concurrency "$CONNECT_CONCURRENCY" "${auth[@]}" \
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

for run in $(seq "$RUNS"); do
  for scenario in $SCENARIOS; do
    for server in $SERVERS; do
      if [ "$scenario" = scale ]; then
        for n in $SCALE_NS; do run_one scale "$server" "$run" "$n"; done
      else
        run_one "$scenario" "$server" "$run"
      fi
    done
  done
done

echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RESULTS/machine.txt"
echo "results: $RESULTS" >&2
python3 scripts/bench-report.py "$RESULTS"
