#!/usr/bin/env python3
"""Checks a benchmark run (the JSON that scripts/bench/run.sh writes) against the targets of
the fast-reads issue, and prints one Markdown table: every figure, met or not.

    python3 scripts/bench/targets.py target/bench/results.json
"""

import json
import sys

SEQ = ("seq_read", "seq_read_direct")
ORDER = [
    "seq_read",
    "rand_read_4t",
    "rand_read_qd32",
    "seq_read_direct",
    "rand_read_4t_direct",
    "rand_read_qd32_direct",
]


def main(path):
    with open(path) as f:
        run = json.load(f)
    rows = {(r["job"], r["mode"], r["path"]): r for r in run["results"]}
    present = {r["job"] for r in run["results"]}
    jobs = [j for j in ORDER if j in present] + sorted(present - set(ORDER))
    checks = []

    def ratio(job, mode, path, base="direct"):
        a, b = rows.get((job, mode, path)), rows.get((job, mode, base))
        if not a or not b or not a["mib_s"] or not b["mib_s"]:
            return None
        return a["mib_s"] / b["mib_s"]

    def check(what, value, goal):
        met = value is not None and value >= goal
        shown = "-" if value is None else f"{value:.2f}"
        checks.append((what, shown, f">= {goal}", "met" if met else "**missed**"))

    for job in jobs:
        for mode in ("warm", "cold"):
            goal = 0.97 if job in SEQ else 0.92
            check(f"passthrough / direct, {job} {mode}", ratio(job, mode, "imgpool-passthrough"), goal)
    for job in jobs:
        check(f"cached / direct, {job} warm", ratio(job, "warm", "imgpool-cached"), 0.85)
    for job in SEQ:
        if job in jobs:
            check(f"cached / direct, {job} cold", ratio(job, "cold", "imgpool-cached"), 0.95)
    for job in jobs:
        for mode in ("warm", "cold"):
            check(
                f"cached / bindfs, {job} {mode}",
                ratio(job, mode, "imgpool-cached", base="bindfs"),
                1.5,
            )
    memory = {m["path"]: m for m in run.get("memory", [])}
    one, ten = memory.get("imgpool-cached"), memory.get("imgpool-10x")
    if one and ten:
        a = one["page_cache_plus_daemon_rss_mib"]
        b = ten["page_cache_plus_daemon_rss_mib"]
        met = b <= a * 1.05
        checks.append(
            (
                "ten replicas' memory / one reader's (page cache + daemon RSS)",
                f"{b:.0f} / {a:.0f} MiB",
                "<= 1 (5 % noise)",
                "met" if met else "**missed**",
            )
        )
    print("| target | measured | goal | |")
    print("|---|--:|---|---|")
    for what, shown, goal, verdict in checks:
        print(f"| {what} | {shown} | {goal} | {verdict} |")
    met = sum(1 for c in checks if c[3] == "met")
    print(f"\n{met} of {len(checks)} targets met.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    main(sys.argv[1])
