#!/usr/bin/env python3
"""Helper of scripts/bench/run.sh (stdlib only).

  report.py sum FIO_JSON...                 one line: aggregate MiB/s and IOPS of fio outputs
  report.py report --raw RAW.jsonl --json-out FILE [--meta key=value]...
                                            medians per path/job/mode, table on stdout, JSON file

RAW.jsonl holds one record per measurement, written by run.sh:
  {"kind": "fio", "path", "job", "mode", "rep", "readers", "outputs": [fio json files],
   "rcs": [exit codes], "wall_s", "daemon", "daemon_cpu_pct", "daemon_hwm_kb"}
  {"kind": "mem", "path", "rep", "readers", "cached_before_kb", "cached_after_kb", "daemon",
   "daemon_rss_kb", "daemon_hwm_kb", "copy_cached_bytes", "read_s"}
"""

import argparse
import json
import os
import statistics
import sys

MIB = 1024 * 1024


def load_fio(path):
    """Parse one fio --output-format=json file; fio may put warnings before the JSON."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON in fio output")
    return json.loads(text[start:])


def fio_sum(paths):
    """Aggregate read bandwidth (bytes/s) and IOPS over fio outputs (all jobs in each)."""
    bw = 0.0
    iops = 0.0
    for p in paths:
        for job in load_fio(p)["jobs"]:
            bw += job["read"]["bw_bytes"]
            iops += job["read"]["iops"]
    return bw, iops


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_num(v, digits=0):
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_mib(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def err_text(output_json):
    err = output_json[: -len(".json")] + ".err"
    try:
        with open(err, encoding="utf-8", errors="replace") as f:
            return f.read().strip()[:500]
    except OSError:
        return ""


def cmd_sum(args):
    bw, iops = fio_sum(args.files)
    print(f"{bw / MIB:,.0f} MiB/s, {iops:,.0f} IOPS")


def ordered(seq):
    seen = []
    for x in seq:
        if x not in seen:
            seen.append(x)
    return seen


# The runner shuffles the order of the paths; the table keeps one.
PATH_ORDER = [
    "direct",
    "bind",
    "bindfs",
    "imgpool-cached",
    "imgpool-cached-baseline",
    "imgpool-passthrough",
    "imgpool-passthrough-baseline",
]


def path_rank(path):
    return PATH_ORDER.index(path) if path in PATH_ORDER else len(PATH_ORDER)


def cmd_report(args):
    meta = {}
    for kv in args.meta:
        k, _, v = kv.partition("=")
        meta[k] = int(v) if v.isdigit() else v
    fio_recs, mem_recs = [], []
    with open(args.raw, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            (fio_recs if r["kind"] == "fio" else mem_recs).append(r)

    # Per record: aggregate bandwidth and IOPS, or the error.
    for r in fio_recs:
        r["errors"] = []
        if any(r["rcs"]):
            for out, rc in zip(r["outputs"], r["rcs"]):
                if rc:
                    r["errors"].append(f"{os.path.basename(out)}: exit {rc}: {err_text(out)}")
            r["mib_s"] = r["iops"] = None
            continue
        try:
            bw, iops = fio_sum(r["outputs"])
            r["mib_s"], r["iops"] = bw / MIB, iops
        except (OSError, ValueError, KeyError) as e:
            r["errors"].append(str(e))
            r["mib_s"] = r["iops"] = None

    jobs = ordered(r["job"] for r in fio_recs)
    paths = sorted(ordered(r["path"] for r in fio_recs), key=path_rank)
    modes = [m for m in ("warm", "cold") if any(r["mode"] == m for r in fio_recs)]

    results = []
    by_key = {}
    for job in jobs:
        for mode in modes:
            for path in paths:
                recs = [r for r in fio_recs if (r["job"], r["mode"], r["path"]) == (job, mode, path)]
                if not recs:
                    continue
                recs.sort(key=lambda r: r["rep"])
                hwm = median(r["daemon_hwm_kb"] for r in recs)
                row = {
                    "job": job,
                    "mode": mode,
                    "path": path,
                    "readers": recs[0]["readers"],
                    "daemon": recs[0]["daemon"],
                    "mib_s": median(r["mib_s"] for r in recs),
                    "iops": median(r["iops"] for r in recs),
                    "daemon_cpu_pct": median(r["daemon_cpu_pct"] for r in recs),
                    "daemon_peak_rss_mib": None if hwm is None else hwm / 1024,
                    "errors": [e for r in recs for e in r["errors"]],
                    "reps": [
                        {
                            "rep": r["rep"],
                            "mib_s": r["mib_s"],
                            "iops": r["iops"],
                            "daemon_cpu_pct": r["daemon_cpu_pct"],
                            "daemon_peak_rss_kb": r["daemon_hwm_kb"],
                            "wall_s": r["wall_s"],
                            "errors": r["errors"],
                        }
                        for r in recs
                    ],
                }
                results.append(row)
                by_key[(job, mode, path)] = row
    for row in results:
        base = by_key.get((row["job"], row["mode"], "direct"))
        if base and base["mib_s"] and row["mib_s"] is not None:
            row["ratio_to_direct"] = row["mib_s"] / base["mib_s"]
        else:
            row["ratio_to_direct"] = None

    memory = []
    for path in sorted(ordered(r["path"] for r in mem_recs), key=path_rank):
        recs = sorted((r for r in mem_recs if r["path"] == path), key=lambda r: r["rep"])
        deltas = [(r["cached_after_kb"] - r["cached_before_kb"]) / 1024 for r in recs]
        rss = median(r["daemon_rss_kb"] for r in recs)
        hwm = median(r["daemon_hwm_kb"] for r in recs)
        memory.append(
            {
                "path": path,
                "readers": recs[0]["readers"],
                "daemon": recs[0]["daemon"],
                "page_cache_growth_mib": median(deltas),
                "copy_file_cached_mib": median(r["copy_cached_bytes"] / MIB for r in recs),
                "daemon_rss_mib": None if rss is None else rss / 1024,
                "daemon_peak_rss_mib": None if hwm is None else hwm / 1024,
                "page_cache_plus_daemon_rss_mib": median(deltas) + (0 if rss is None else rss / 1024),
                "read_s": median(r["read_s"] for r in recs),
                "reps": recs,
            }
        )

    doc = {"meta": meta, "results": results, "memory": memory}
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    out = sys.stdout
    size = meta.get("size_bytes")
    out.write("\n")
    if meta:
        out.write(
            f"imgpool benchmark: {meta.get('command', '')}\n"
            f"image {fmt_num(size / MIB if size else None)} MiB random, {meta.get('runtime_s')} s per job, "
            f"median of {meta.get('repeat')} repeat(s); {meta.get('nproc')} CPUs, "
            f"{fmt_num(meta.get('mem_total_kb', 0) / 1024 / 1024, 1)} GiB RAM, kernel {meta.get('kernel')}, "
            f"{meta.get('workdir_fs')}; {meta.get('fio')}, {meta.get('bindfs')}, {meta.get('imgpool')} "
            f"({meta.get('git_commit')}); took {meta.get('elapsed_s')} s\n\n"
        )
    out.write("| job | cache | path | MiB/s | IOPS | ratio to direct | daemon CPU (% of a core) | daemon peak RSS (MiB) |\n")
    out.write("|---|---|---|--:|--:|--:|--:|--:|\n")
    for row in results:
        ratio = "-" if row["ratio_to_direct"] is None else f"{row['ratio_to_direct']:.2f}"
        name = row["path"]
        if row["readers"] > 1:
            name += f" ({row['readers']} readers, sum)"
        mib = fmt_mib(row["mib_s"]) if not row["errors"] else "ERR"
        out.write(
            f"| {row['job']} | {row['mode']} | {name} | {mib} | {fmt_num(row['iops'])} | {ratio} | "
            f"{fmt_num(row['daemon_cpu_pct'], 1)} | {fmt_num(row['daemon_peak_rss_mib'], 1)} |\n"
        )
    out.write(
        "\nMemory after reading the whole image once from dropped caches "
        "(several readers: all at once):\n\n"
        "| path | readers | page cache growth (MiB) | copy file in page cache (MiB) | daemon RSS (MiB) "
        "| page cache + daemon RSS (MiB) | read time (s) |\n|---|--:|--:|--:|--:|--:|--:|\n"
    )
    for m in memory:
        out.write(
            f"| {m['path']} | {m['readers']} | {fmt_num(m['page_cache_growth_mib'])} | "
            f"{fmt_num(m['copy_file_cached_mib'])} | {fmt_num(m['daemon_rss_mib'], 1)} | "
            f"{fmt_num(m['page_cache_plus_daemon_rss_mib'])} | {fmt_num(m['read_s'], 2)} |\n"
        )
    errors = [(row, e) for row in results for e in row["errors"]]
    if errors:
        out.write("\nErrors:\n")
        for row, e in errors:
            out.write(f"- {row['job']} {row['mode']} {row['path']}: {e}\n")
    out.flush()
    return 1 if errors else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sum")
    s.add_argument("files", nargs="+")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--json-out", required=True)
    r.add_argument("--meta", action="append", default=[])
    args = ap.parse_args()
    if args.cmd == "sum":
        cmd_sum(args)
        return 0
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
