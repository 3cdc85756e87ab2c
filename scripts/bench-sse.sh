#!/usr/bin/env bash
# The HTTP fallback against WebSockets (SPEC §7): N viewers on one view read
# either WebSockets or SSE streams while one WebSocket controller sends RATE
# updates/s for DUR s; runs interleaved (ws sse ws sse …), a fresh server and
# fixture per run, one loadgen JSON line per run on stdout. Needs
# target/bench/fixture-10000.db (scripts/bench.sh makes it) and a release build.
#   N=5000 RUNS=3 scripts/bench-sse.sh | python3 scripts/bench-sse-report.py
set -u
cd "$(dirname "$0")/.."
N=${N:-1000}; RATE=${RATE:-50}; DUR=${DUR:-10}; RUNS=${RUNS:-3}
SECRET=sse-bench
for run in $(seq $RUNS); do
  for t in ws sse; do
    cp target/bench/fixture-10000.db target/bench/sse-run.db; rm -f target/bench/sse-run.db-wal target/bench/sse-run.db-shm
    target/release/portal-sync serve --db target/bench/sse-run.db --jwt-secret $SECRET --addr 127.0.0.1:29150 \
      --rate-per-sec 1000000 --rate-burst 1000000 2>target/bench/sse-server.log &
    pid=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/29150) 2>/dev/null && break; sleep 0.05; done
    out=$(target/release/examples/loadgen --server ws://127.0.0.1:29150 --secret $SECRET --viewers $N \
      --rate $RATE --duration $DUR --transport $t --server-pid $pid --quiet --label $t 2>/dev/null | tail -1)
    echo "$run $t $out"
    kill -TERM $pid; wait $pid 2>/dev/null
  done
done
