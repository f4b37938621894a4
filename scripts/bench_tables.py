#!/usr/bin/env python3
"""Markdown tables (medians per shard count) from loadgen results.

Usage: scripts/bench_tables.py RESULTS_DIR
where RESULTS_DIR holds one sub-directory per scenario with a results.jsonl
(as scripts/loadgen.sh and scripts/bench-all.sh write them).
"""
import json, os, statistics, sys
if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    print(__doc__.strip())
    sys.exit(0 if len(sys.argv) == 2 else 2)
out = sys.argv[1]
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def fmt(v, nd=0):
    return "-" if v is None else (f"{v:,.{nd}f}")
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "results.jsonl")
    if not os.path.isfile(path):
        continue
    rows = [json.loads(l) for l in open(path) if l.strip()]
    # Open-loop runs also report how late the generator itself sent.
    open_loop = any(r.get("send_lag") for r in rows)
    lag_head, lag_rule = (" send lag p50 µs |", "---|") if open_loop else ("", "")
    print(f"\n### {name}\n")
    print(f"| shards | runs | removed msg/s | e2e p50 µs | e2e p99 µs | e2e p99.9 µs | add p50 µs |{lag_head} poll p50 µs | server CPU µs/msg | peak RSS MiB | dup | lost | err |")
    print(f"|---|---|---|---|---|---|---|{lag_rule}---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault(r["shards"], []).append(r)
    for shards, rs in sorted(by.items()):
        lag = " {} |".format(fmt(med([(r.get("send_lag") or {}).get("p50_us") for r in rs]))) if open_loop else ""
        print("| {} | {} | {} | {} | {} | {} | {} |{} {} | {} | {} | {} | {} | {} |".format(
            shards, len(rs),
            fmt(med([r["removed_per_s"] for r in rs])),
            fmt(med([r["end_to_end"]["p50_us"] for r in rs])),
            fmt(med([r["end_to_end"]["p99_us"] for r in rs])),
            fmt(med([r["end_to_end"]["p999_us"] for r in rs])),
            fmt(med([r["add"]["p50_us"] for r in rs])),
            lag,
            fmt(med([r["poll"]["p50_us"] for r in rs])),
            fmt(med([r["server_cpu_us_per_msg"] for r in rs]), 1),
            fmt(med([(r["server_peak_rss_kib"] or 0) / 1024 for r in rs])),
            sum(r["duplicates"] for r in rs), sum(r["lost"] for r in rs), sum(r["errors"] for r in rs)))
