#!/usr/bin/env python3
"""Medians of scripts/bench-sse.sh's runs (stdin), one row per transport."""
import json
import statistics
import sys

runs = {}
for line in sys.stdin:
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[2].startswith("{"):
        runs.setdefault(parts[1], []).append(json.loads(parts[2]))

print("| transport | runs | missing | out of order | first delivery p50 ms | delivery p50 ms | delivery p99 ms (min–max) | server CPU µs/delivery | server KiB/conn |")
print("|---|---|---|---|---|---|---|---|---|")
for transport, ds in runs.items():
    def med(get):
        return statistics.median(get(d) for d in ds)
    p99 = [d["delivery_ms"]["p99"] for d in ds]
    print(
        f"| {transport} | {len(ds)} | {sum(d['deliveries_missing'] for d in ds)} "
        f"| {sum(d['deliveries_out_of_order'] for d in ds)} "
        f"| {med(lambda d: d['first_delivery_ms']['p50']):.1f} "
        f"| {med(lambda d: d['delivery_ms']['p50']):.1f} "
        f"| {statistics.median(p99):.1f} ({min(p99):.1f}–{max(p99):.1f}) "
        f"| {med(lambda d: d.get('server_cpu_us_per_delivery', 0)):.2f} "
        f"| {med(lambda d: d.get('server_kib_per_conn', 0)):.1f} |"
    )
