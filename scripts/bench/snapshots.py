#!/usr/bin/env python3
"""Helper of scripts/bench/snapshots.sh (stdlib only): drives one mounted volume.

Snapshot requests go straight to the mount daemon's control socket (POST /v1/volumes/requests,
one connection each, as the CLI sends them), so that tens of thousands of snapshots, each after a
few writes through the mount, take minutes instead of one CLI process each. The volume's file is
held open meanwhile: the daemon takes requests only for a volume it has open.

  snapshots.py populate SOCKET VOLUME FILE --prefix P --start I --count N --blocks K --span BYTES
      N snapshots P<I>..P<I+N-1>, each after K 4 KiB writes at random blocks within SPAN
  snapshots.py spread SOCKET VOLUME FILE --prefix P --count N --span BYTES
      every block of SPAN written once, in random order, spread evenly over N snapshots
  snapshots.py latency SOCKET VOLUME FILE --prefix P --count N [--gap SEC]
      N creates, each timed from connect to answer; percentiles in ms
  snapshots.py cli-latency BIN STATE VOLUME --prefix P --count N
      N `imgpool snapshot create` processes, each timed (wall)
  snapshots.py fsync-latency DIR --count N
      N 4 KiB writes each followed by fdatasync, in a file in DIR (the disk's floor)
  snapshots.py wait-reclaim INDEX [--timeout SEC]
      seconds until the index has no reclaim window left
  snapshots.py run -- CMD...
      one command's wall time, as JSON (a failure ends the benchmark)
  snapshots.py report RAW.jsonl OUT.json [--meta key=value]...
      the tables of docs/benchmarks.md from the records snapshots.sh wrote

Every command prints one JSON object on stdout.
"""

import argparse
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid

BLOCK = 4096


def request(sock_path, volume, body):
    """One volume request; returns (HTTP status, decoded answer)."""
    payload = json.dumps({"volume": volume, "request": body}).encode()
    head = (
        "POST /v1/volumes/requests HTTP/1.1\r\nHost: imgpool\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(head + payload)
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def create(sock_path, volume, name):
    status, answer = request(
        sock_path,
        volume,
        {"create": {"name": name, "guid": str(uuid.uuid4()), "created": int(time.time())}},
    )
    if status != 200:
        sys.exit(f"snapshot {volume}@{name}: the daemon answered {status}: {answer}")


def percentiles(values):
    ordered = sorted(values)

    def at(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": at(0.50) * 1e3,
        "p99_ms": at(0.99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def cmd_populate(a):
    rng = random.Random(a.seed)
    blocks = a.span // BLOCK
    fd = os.open(a.file, os.O_RDWR)
    payload = os.urandom(BLOCK * 64)
    t0 = time.monotonic()
    try:
        for i in range(a.start, a.start + a.count):
            for _ in range(a.blocks):
                at = rng.randrange(blocks)
                off = rng.randrange(64) * BLOCK
                os.pwrite(fd, payload[off : off + BLOCK], at * BLOCK)
            create(a.socket, a.volume, f"{a.prefix}{i}")
    finally:
        os.close(fd)
    took = time.monotonic() - t0
    print(json.dumps({"snapshots": a.count, "seconds": took, "per_second": a.count / took}))


def cmd_spread(a):
    rng = random.Random(a.seed)
    order = list(range(a.span // BLOCK))
    rng.shuffle(order)
    fd = os.open(a.file, os.O_RDWR)
    payload = os.urandom(BLOCK * 64)
    t0 = time.monotonic()
    done = 0
    try:
        for i in range(a.count):
            # Snapshot i follows the writes up to its share of the blocks.
            upto = (i + 1) * len(order) // a.count
            while done < upto:
                off = rng.randrange(64) * BLOCK
                os.pwrite(fd, payload[off : off + BLOCK], order[done] * BLOCK)
                done += 1
            create(a.socket, a.volume, f"{a.prefix}{i}")
    finally:
        os.close(fd)
    took = time.monotonic() - t0
    print(json.dumps({"snapshots": a.count, "blocks": len(order), "seconds": took}))


def cmd_latency(a):
    times = []
    fd = os.open(a.file, os.O_RDONLY)
    try:
        for i in range(a.count):
            t0 = time.perf_counter()
            create(a.socket, a.volume, f"{a.prefix}{i}")
            times.append(time.perf_counter() - t0)
            time.sleep(a.gap)
    finally:
        os.close(fd)
    print(json.dumps(percentiles(times)))


def cmd_cli_latency(a):
    times = []
    for i in range(a.count):
        t0 = time.perf_counter()
        subprocess.run(
            [a.bin, "--state-dir", a.state, "snapshot", "create", f"{a.volume}@{a.prefix}{i}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - t0)
    print(json.dumps(percentiles(times)))


def cmd_fsync_latency(a):
    path = os.path.join(a.dir, ".fsync-latency")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    times = []
    try:
        for i in range(a.count):
            t0 = time.perf_counter()
            os.pwrite(fd, os.urandom(BLOCK), (i % 256) * BLOCK)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    print(json.dumps(percentiles(times)))


def cmd_wait_reclaim(a):
    t0 = time.monotonic()
    db = sqlite3.connect(f"file:{a.index}?mode=ro", uri=True, timeout=30)
    while True:
        windows = db.execute("SELECT COUNT(*) FROM reclaim").fetchone()[0]
        unpunched = db.execute("SELECT COUNT(*) FROM free_slots WHERE punched = 0").fetchone()[0]
        if windows == 0 and unpunched == 0:
            break
        if time.monotonic() - t0 > a.timeout:
            sys.exit(f"reclaim not done after {a.timeout} s: {windows} window(s) left")
        time.sleep(0.05)
    print(json.dumps({"seconds": time.monotonic() - t0}))


def cmd_run(a):
    t0 = time.perf_counter()
    done = subprocess.run(a.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(a.cmd)}: exit {done.returncode}: {done.stderr.decode()[:300]}")
    print(json.dumps({"seconds": took}))


def cmd_report(a):
    rows = [json.loads(line) for line in open(a.raw)]
    meta = dict(kv.split("=", 1) for kv in a.meta)
    med = statistics.median

    def of(case, **match):
        return [r for r in rows if r["case"] == case and all(r.get(k) == v for k, v in match.items())]

    def ms(v):
        return f"{v:.2f}"

    out = []
    say = out.append
    say(f"imgpool snapshot benchmark: {meta.get('command', '')}")
    say(
        f"{meta.get('nproc')} CPUs, kernel {meta.get('kernel')}, {meta.get('version')}; disk {meta.get('disk')}; "
        f"load {meta.get('load_before')} before, {meta.get('load_after')} after; took {meta.get('elapsed_s')} s; "
        f"median of {meta.get('repeat')} where repeated"
    )
    for r in of("populate") + of("spread"):
        s = r["stats"]
        say(f"populated {r['volume']}: {s['snapshots']} snapshots in {s['seconds']:.1f} s")
    results = {"meta": meta, "rows": rows}

    levels = sorted({r["level"] for r in of("create")})
    if levels:
        say("")
        say(
            "| snapshots on the volume | disk fdatasync p50 / p99 ms | socket, alone p50 / p99 ms | "
            "socket, fio writing p50 / p99 ms | CLI, fio writing p50 / p99 ms |"
        )
        say("|--:|--:|--:|--:|--:|")
        for level in levels:
            cells = []
            for path in ("fdatasync", "quiet", "socket", "cli"):
                runs = of("create", level=level, path=path)
                cells.append(f'{ms(med(r["stats"]["p50_ms"] for r in runs))} / {ms(med(r["stats"]["p99_ms"] for r in runs))}')
            say(f"| {level:,} | " + " | ".join(cells) + " |")

    levels = sorted({r["level"] for r in of("list")})
    if levels:
        say("")
        say("| snapshots listed | `snapshot list --json` s |")
        say("|--:|--:|")
        for level in levels:
            runs = of("list", level=level)
            say(f"| {runs[0]['listed']:,} | {med(r['stats']['seconds'] for r in runs):.3f} |")

    batches = of("delete_batch")
    if batches:
        loop = of("delete_loop")[0]
        per_rm = loop["stats"]["seconds"] / loop["count"]
        say("")
        say(f"Loop of single `snapshot rm`: {loop['count']:,} in {loop['stats']['seconds']:.1f} s ({per_rm * 1e3:.1f} ms each).")
        say("")
        say(
            "| snapshots | batch rm s | loop (extrapolated) s | batch speed-up | listed after | reclaimed after s | "
            "allocated before → after MiB | data file size | daemon writes MiB | read IOPS quiet → deleting | "
            "read p99 ms quiet → deleting | read p99.9 ms | read max ms |"
        )
        say("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for b in batches:
            v = b["volume"]
            count = b["count"]
            space = of("reclaim_space", volume=v)[0]
            quiet = of("reads_quiet", volume=v)[0]["stats"]
            busy = space["reads"]
            loop_s = per_rm * count
            say(
                f"| {count:,} | {b['stats']['seconds']:.2f} | {loop_s:,.0f} | {loop_s / b['stats']['seconds']:,.0f}x | "
                f"{of('listed_after_batch', volume=v)[0]['left']} | {b['stats']['seconds'] + of('reclaim', volume=v)[0]['stats']['seconds']:.1f} | "
                f"{space['allocated_before'] / 2**20:,.0f} → {space['allocated_after'] / 2**20:,.0f} | "
                f"{'unchanged' if space['data_size_before'] == space['data_size_after'] else 'changed'} | "
                f"{space['daemon_write_bytes'] / 2**20:,.1f} | {quiet['iops']:,.0f} → {busy['iops']:,.0f} | "
                f"{ms(quiet['p99_ms'])} → {ms(busy['p99_ms'])} | "
                f"{ms(quiet.get('p999_ms', float('nan')))} → {ms(busy.get('p999_ms', float('nan')))} | "
                f"{ms(quiet.get('max_ms', float('nan')))} → {ms(busy.get('max_ms', float('nan')))} |"
            )

    chains = sorted({r["snapshots"] for r in of("chain")})
    if chains:
        say("")
        say("| snapshots behind the data | random 4 KiB read IOPS | vs 1 snapshot | p99 ms |")
        say("|--:|--:|--:|--:|")
        base = med(r["reads"]["iops"] for r in of("chain", snapshots=chains[0]))
        for c in chains:
            runs = of("chain", snapshots=c)
            iops = med(r["reads"]["iops"] for r in runs)
            say(f"| {c:,} | {iops:,.0f} | {iops / base:.3f} | {ms(med(r['reads']['p99_ms'] for r in runs))} |")

    made = of("million_create")
    if made:
        m = made[0]
        size = of("million_size")[0]
        rm = of("million_delete")[0]
        rec = of("million_reclaim")[0]
        after = of("million_after")[0]
        say("")
        say("| a million | figure |")
        say("|---|--:|")
        say(f"| snapshots created | {m['count']:,} in {m['stats']['seconds']:,.0f} s ({m['stats']['per_second']:,.0f}/s) |")
        say(f"| index (index.db + WAL) | {size['index_bytes'] / 2**20:,.1f} MiB |")
        say(f"| state dir (store) | {size['state_bytes'] / 2**20:,.1f} MiB |")
        say(f"| data file allocated | {size['data_bytes'] / 2**20:,.1f} MiB |")
        say(f"| daemon RSS before → after | {m['rss_before_kb'] / 1024:,.0f} → {size['rss_kb'] / 1024:,.0f} MiB (peak {size['hwm_kb'] / 1024:,.0f}) |")
        say(f"| `snapshot list --json` | {med(r['stats']['seconds'] for r in of('million_list')):.2f} s |")
        say(f"| random 4 KiB reads (4 jobs, O_DIRECT) | {med(r['reads']['iops'] for r in of('million_reads')):,.0f} IOPS |")
        say(f"| `snapshot rm m@first%last` | {rm['stats']['seconds']:.2f} s; {rec['left']} left listed |")
        say(f"| reclaim after it | {rec['stats']['seconds']:.1f} s |")
        say(f"| after: daemon RSS, index | {after['rss_kb'] / 1024:,.0f} MiB, {after['index_bytes'] / 2**20:,.1f} MiB |")

    print("\n".join(out))
    json.dump(results, open(a.out, "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def volume_args(q, with_file=True):
        q.add_argument("socket")
        q.add_argument("volume")
        if with_file:
            q.add_argument("file")
        q.add_argument("--prefix", required=True)
        q.add_argument("--count", type=int, required=True)
        q.add_argument("--seed", type=int, default=1)

    q = sub.add_parser("populate")
    volume_args(q)
    q.add_argument("--start", type=int, default=0)
    q.add_argument("--blocks", type=int, default=2)
    q.add_argument("--span", type=int, required=True)
    q.set_defaults(run=cmd_populate)

    q = sub.add_parser("spread")
    volume_args(q)
    q.add_argument("--span", type=int, required=True)
    q.set_defaults(run=cmd_spread)

    q = sub.add_parser("latency")
    volume_args(q)
    q.add_argument("--gap", type=float, default=0.01)
    q.set_defaults(run=cmd_latency)

    q = sub.add_parser("cli-latency")
    q.add_argument("bin")
    q.add_argument("state")
    q.add_argument("volume")
    q.add_argument("--prefix", required=True)
    q.add_argument("--count", type=int, required=True)
    q.set_defaults(run=cmd_cli_latency)

    q = sub.add_parser("fsync-latency")
    q.add_argument("dir")
    q.add_argument("--count", type=int, default=200)
    q.set_defaults(run=cmd_fsync_latency)

    q = sub.add_parser("wait-reclaim")
    q.add_argument("index")
    q.add_argument("--timeout", type=float, default=600)
    q.set_defaults(run=cmd_wait_reclaim)

    q = sub.add_parser("report")
    q.add_argument("raw")
    q.add_argument("out")
    q.add_argument("--meta", nargs="*", default=[])
    q.set_defaults(run=cmd_report)

    q = sub.add_parser("run")
    q.add_argument("cmd", nargs=argparse.REMAINDER)
    q.set_defaults(run=cmd_run)

    a = p.parse_args()
    if getattr(a, "cmd", None) and a.cmd[0] == "--":
        a.cmd = a.cmd[1:]
    a.run(a)


if __name__ == "__main__":
    main()
