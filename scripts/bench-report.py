#!/usr/bin/env python3
"""Median tables from a scripts/bench.sh results folder (results.jsonl).

    python3 scripts/bench-report.py target/bench/results/<stamp> [--ratio-to SERVER]

Prints, per scenario, the median over runs for each server, the spread
(min–max) where it matters, and the ratio to `limit` measured in the same
results folder (the targets of issues 4 and 18 are ratios, because absolute numbers on a
shared 2-core machine drift between runs while ratios within a run hold). With
no `limit` in the results, ratios are to `portal-sync` (one node, SQLite: what
the PostgreSQL and two-node servers are compared with); `--ratio-to` picks
another. Columns no run reported (PostgreSQL's CPU without a PostgreSQL server)
are left out.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def get(d, path):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def spread(values, digits=1):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f" ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


# scenario -> columns: (title, json path, digits, ratio target: (op, factor) or None)
COLUMNS = {
    "handshake": [
        ("handshakes/s", "handshakes_per_sec", 0, (">=", 0.9)),
        ("handshake p50 ms", "handshake_ms.p50", 1, None),
        ("handshake p99 ms", "handshake_ms.p99", 1, None),
        ("server CPU µs/handshake", "server_cpu_us_per_handshake", 1, True),
        ("PG CPU µs/handshake", "pg_cpu_us_per_handshake", 1, None),
        ("KiB per idle conn", "server_kib_per_conn", 2, ("<=", 1.1)),
        ("failed", "connect_failed", 0, None),
    ],
    "fanout": [
        ("first delivery p50 ms", "first_delivery_ms.p50", 1, None),
        ("delivery p50 ms", "delivery_ms.p50", 1, ("<=", 1.2)),
        ("delivery p99 ms", "delivery_ms.p99", 1, ("<=", 1.2)),
        ("delivery max ms", "delivery_ms.max", 1, None),
        ("deliveries/s", "deliveries_per_sec", 0, None),
        ("server CPU µs/delivery", "server_cpu_us_per_delivery", 2, ("<=", 1.05)),
        ("PG CPU µs/delivery", "pg_cpu_us_per_delivery", 3, None),
        ("PG CPU µs/update", "pg_cpu_us_per_update", 1, None),
        ("loadgen CPU µs/delivery", "loadgen_cpu_us_per_delivery", 2, None),
        ("KiB/conn", "server_kib_per_conn", 2, None),
        ("missing", "deliveries_missing", 0, None),
        ("out of order", "deliveries_out_of_order", 0, None),
    ],
    "burst": [
        ("deliveries/s", "deliveries_per_sec", 0, (">=", 0.5)),
        ("delivery p99 ms", "delivery_ms.p99", 1, None),
        ("server CPU µs/delivery", "server_cpu_us_per_delivery", 2, None),
        ("PG CPU µs/delivery", "pg_cpu_us_per_delivery", 3, None),
        ("missing", "deliveries_missing", 0, None),
        ("out of order", "deliveries_out_of_order", 0, None),
    ],
    "acked": [
        ("acked updates/s", "acks_per_sec", 0, True),
        ("ack p50 ms", "ack_ms.p50", 1, None),
        ("ack p99 ms", "ack_ms.p99", 1, None),
        ("deliveries/s", "deliveries_per_sec", 0, None),
        ("delivery p99 ms", "delivery_ms.p99", 1, None),
        ("server CPU µs/ack", "server_cpu_us_per_ack", 1, True),
        ("PG CPU µs/ack", "pg_cpu_us_per_ack", 1, None),
        ("server CPU µs/delivery", "server_cpu_us_per_delivery", 2, None),
        ("missing", "deliveries_missing", 0, None),
        ("errors", "error_replies", 0, None),
    ],
}
COLUMNS["scale"] = COLUMNS["fanout"]
COLUMNS["rooms"] = COLUMNS["fanout"]
SERVER_ORDER = ["portal-sync", "base", "portal-sqlite2", "portal-pg", "base-pg", "portal-pg2", "limit", "fastify"]


def main():
    args = sys.argv[1:]
    ratio_to = None
    if "--ratio-to" in args:
        i = args.index("--ratio-to")
        ratio_to = args[i + 1]
        del args[i:i + 2]
    folder = Path(args[0] if args else ".")
    rows = [json.loads(l) for l in (folder / "results.jsonl").read_text().splitlines() if l.strip()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], int(r["n"]), r["server_name"])].append(r)
    names = {s for (_, _, s) in groups}
    if ratio_to is None:
        ratio_to = "limit" if "limit" in names or "portal-sync" not in names else "portal-sync"
    machine = folder / "machine.txt"
    if machine.exists():
        print(machine.read_text().strip())
        print()
    for scenario in ["handshake", "fanout", "rooms", "burst", "acked", "scale"]:
        keys = sorted({(n, s) for (sc, n, s) in groups if sc == scenario},
                      key=lambda k: (k[0], SERVER_ORDER.index(k[1]) if k[1] in SERVER_ORDER else 9))
        if not keys:
            continue
        cols = [c for c in COLUMNS[scenario]
                if any(get(r, c[1]) is not None for (sc, _, _), runs in groups.items()
                       if sc == scenario for r in runs)]
        print(f"### {scenario}")
        print()
        print("| N | server | runs | " + " | ".join(c[0] for c in cols) + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for n, server in keys:
            runs = groups[(scenario, n, server)]
            limit_runs = groups.get((scenario, n, ratio_to), [])
            cells = []
            for title, path, digits, target in cols:
                vals = [get(r, path) for r in runs]
                m = median(vals)
                cell = fmt(m, digits)
                if len(runs) > 1 and target:
                    cell += spread(vals, digits)
                if target and server != ratio_to and limit_runs:
                    lm = median([get(r, path) for r in limit_runs])
                    if m is not None and lm:
                        cell += f" **{m / lm:.2f}×**"
                cells.append(cell)
            print(f"| {n:,} | {server} | {len(runs)} | " + " | ".join(cells) + " |")
        print()
        reasons = defaultdict(int)
        for (sc, n, s), runs in groups.items():
            if sc == scenario:
                for r in runs:
                    for why, count in (r.get("reasons") or {}).items():
                        reasons[f"{s} n={n}: {why}"] += count
        if reasons:
            print("Connection problems seen: " + "; ".join(f"{k} ×{v}" for k, v in sorted(reasons.items())))
            print()
    print(f"Ratios (**x×**) are the median over the median of `{ratio_to}` at the same N in the same results.")


if __name__ == "__main__":
    main()
