#!/usr/bin/python3
"""Render the Grafana dashboard's panels from a real run, without Grafana.

Grafana is not packaged for Debian and cannot be fetched here, so this script does what Grafana
and Prometheus would do, on a throwaway pool: it mounts the pool, reads it with fio for a minute
(random 4 KiB and sequential 1 MiB O_DIRECT reads through two disks' bound views), takes one disk
out of service for part of that minute (so the disk-state, image-state and repair panels move),
scrapes `GET /metrics` on the daemon's control socket every second, then evaluates every
panel's PromQL expressions from scripts/grafana/imgpool-dashboard.json over those scrapes
(rate, sum/max by, histogram_quantile and arithmetic, evaluated here: see `Evaluator`) and draws
one panel per dashboard panel, laid out by the dashboard's gridPos, into a PNG.

    scripts/dashboard-preview.py [--out docs/dashboard-preview.png] [--seconds 60]

IMGPOOL_BIN=/path/to/imgpool uses that binary (default: target/release/imgpool, built if
missing). Needs root (FUSE and bind mounts), fio and matplotlib: Debian's python3-matplotlib,
hence /usr/bin/python3; missing ones are installed with apt-get.
Everything it makes is under one temporary directory, unmounted and removed at the end, also on
failure.
"""

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "scripts", "grafana", "imgpool-dashboard.json")
# Grafana's $__rate_interval is four scrape intervals at least; we scrape every second.
RATE_INTERVAL = "5s"
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Scrapes: the Prometheus text format into {(name, labels): value}.

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_scrape(text):
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line!r}")
        labels = dict(LABEL.findall(m.group(2) or ""))
        series[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return series


def scrape(socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(socket_path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: imgpool\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"scrape failed: {head.decode(errors='replace')}")
    return body.decode()


# ---------------------------------------------------------------------------------------------
# PromQL: the subset the dashboard uses. An instant vector is {labels(frozenset): value}.

TOKEN = re.compile(r'\s*(?:(\d+\.?\d*(?:e[+-]?\d+)?)|([a-zA-Z_:][a-zA-Z0-9_:]*)|("(?:[^"\\]|\\.)*")'
                   r'|(=~|!~|!=|==|>=|<=|[-+*/(){}\[\],=<>]))')
AGGREGATIONS = {"sum", "max", "min", "count", "avg"}
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}


def tokenize(text):
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot parse {text[pos:]!r}")
        pos = m.end()
        number, ident, string, op = m.groups()
        if number is not None:
            tokens.append(("num", float(number)))
        elif ident is not None:
            tokens.append(("id", ident))
        elif string is not None:
            tokens.append(("str", json.loads(string)))
        else:
            tokens.append(("op", op))
    return tokens


class Evaluator:
    """Evaluates an expression at one scrape, given all scrapes before it (for rate)."""

    def __init__(self, history, at):
        self.history = history  # [(time, series)]
        self.at = at  # index into history

    def evaluate(self, expr):
        self.tokens, self.pos = tokenize(expr), 0
        value = self.comparison()
        if self.pos != len(self.tokens):
            raise ValueError(f"trailing input in {expr!r}")
        return value

    def peek(self, kind=None, text=None):
        if self.pos >= len(self.tokens):
            return False
        k, v = self.tokens[self.pos]
        return (kind is None or k == kind) and (text is None or v == text)

    def take(self, kind=None, text=None):
        if not self.peek(kind, text):
            raise ValueError(f"expected {text or kind} at {self.tokens[self.pos:]}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def comparison(self):
        left = self.additive()
        while self.peek("op") and self.tokens[self.pos][1] in COMPARISONS:
            op = self.take()
            left = binary(op, left, self.additive())
        return left

    def additive(self):
        left = self.multiplicative()
        while self.peek("op", "+") or self.peek("op", "-"):
            op = self.take()
            left = binary(op, left, self.multiplicative())
        return left

    def multiplicative(self):
        left = self.primary()
        while self.peek("op", "*") or self.peek("op", "/"):
            op = self.take()
            left = binary(op, left, self.primary())
        return left

    def primary(self):
        if self.peek("num"):
            return self.take()
        if self.peek("op", "("):
            self.take()
            value = self.comparison()
            self.take("op", ")")
            return value
        name = self.take("id")
        if name in AGGREGATIONS:
            by = []
            if self.peek("id", "by"):
                self.take()
                by = self.label_list()
            self.take("op", "(")
            value = self.comparison()
            self.take("op", ")")
            return aggregate(name, by, value)
        if name == "rate":
            self.take("op", "(")
            selector, window = self.selector(self.take("id"))
            self.take("op", ")")
            return self.rate(selector, window)
        if name == "histogram_quantile":
            self.take("op", "(")
            q = self.take("num")
            self.take("op", ",")
            buckets = self.comparison()
            self.take("op", ")")
            return histogram_quantile(q, buckets)
        selector, window = self.selector(name)
        if window is not None:
            raise ValueError("a range vector outside rate()")
        return self.select(self.history[self.at][1], selector)

    def label_list(self):
        self.take("op", "(")
        labels = [self.take("id")]
        while self.peek("op", ","):
            self.take()
            labels.append(self.take("id"))
        self.take("op", ")")
        return labels

    def selector(self, name):
        matchers = []
        if self.peek("op", "{"):
            self.take()
            while not self.peek("op", "}"):
                label = self.take("id")
                op = self.take("op")
                matchers.append((label, op, self.take("str")))
                if self.peek("op", ","):
                    self.take()
            self.take("op", "}")
        window = None
        if self.peek("op", "["):
            self.take()
            number = self.take("num")
            unit = self.take("id")
            self.take("op", "]")
            window = number * {"s": 1, "m": 60}[unit]
        return (name, matchers), window

    @staticmethod
    def select(series, selector):
        name, matchers = selector
        out = {}
        for (metric, labels), value in series.items():
            if metric != name:
                continue
            got = dict(labels)
            if all(matches(got.get(label, ""), op, want) for label, op, want in matchers):
                out[labels] = value
        return out

    def rate(self, selector, window):
        """Per-second increase over the window, as Prometheus computes it, without its
        extrapolation to the window's edges (the scrapes here are exactly 1 s apart)."""
        now = self.history[self.at][0]
        points = [(t, self.select(s, selector)) for t, s in self.history[: self.at + 1]
                  if now - window <= t <= now]
        if len(points) < 2:
            return {}
        out = {}
        for labels in points[-1][1]:
            values = [(t, v[labels]) for t, v in points if labels in v]
            if len(values) < 2:
                continue
            increase = 0.0
            for (_, a), (_, b) in zip(values, values[1:]):
                increase += b - a if b >= a else b  # a counter reset starts again from 0
            out[labels] = increase / (values[-1][0] - values[0][0])
        return out


def matches(value, op, want):
    if op == "=":
        return value == want
    if op == "!=":
        return value != want
    if op == "=~":
        return re.fullmatch(want, value) is not None
    if op == "!~":
        return re.fullmatch(want, value) is None
    raise ValueError(op)


def aggregate(name, by, vector):
    groups = {}
    for labels, value in vector.items():
        key = frozenset((k, v) for k, v in labels if k in by)
        groups.setdefault(key, []).append(value)
    reduce = {"sum": sum, "max": max, "min": min, "count": len,
              "avg": lambda v: sum(v) / len(v)}[name]
    return {key: float(reduce(values)) for key, values in groups.items()}


def apply(op, a, b):
    if op in COMPARISONS:
        return {"==": a == b, "!=": a != b, ">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]
    if op == "/":
        return a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a))
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def binary(op, left, right):
    """Scalar with scalar, scalar with vector, or vector with vector matched on all labels;
    a comparison filters (keeps the vector's value where it holds)."""
    if isinstance(left, float) and isinstance(right, float):
        return float(apply(op, left, right))
    if isinstance(left, float) or isinstance(right, float):
        vector, scalar_left = (right, True) if isinstance(left, float) else (left, False)
        scalar = left if scalar_left else right
        out = {}
        for labels, value in vector.items():
            a, b = (scalar, value) if scalar_left else (value, scalar)
            result = apply(op, a, b)
            if op in COMPARISONS:
                if result:
                    out[labels] = value
            else:
                out[labels] = result
        return out
    out = {}
    for labels, value in left.items():
        if labels in right:
            result = apply(op, value, right[labels])
            if op in COMPARISONS:
                if result:
                    out[labels] = value
            else:
                out[labels] = result
    return out


def histogram_quantile(q, buckets):
    """Linear interpolation inside the bucket the rank falls in, as Prometheus does."""
    groups = {}
    for labels, value in buckets.items():
        rest = frozenset((k, v) for k, v in labels if k != "le")
        le = float(dict(labels)["le"].replace("+Inf", "inf"))
        groups.setdefault(rest, []).append((le, value))
    out = {}
    for labels, points in groups.items():
        points.sort()
        total = points[-1][1]
        if total <= 0:
            continue
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for le, count in points:
            if count >= rank:
                if math.isinf(le):
                    out[labels] = lower_bound
                else:
                    width = count - lower_count
                    out[labels] = lower_bound + (le - lower_bound) * (
                        (rank - lower_count) / width if width else 1.0)
                break
            lower_bound, lower_count = le, count
    return out


def legend(template, labels):
    got = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: got.get(m.group(1), ""), template) or "value"


# ---------------------------------------------------------------------------------------------
# The run.

def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def mounts_under(directory):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == directory or p.startswith(directory + "/")]


def collect(binary_path, seconds):
    """Runs the load on a throwaway pool; returns [(t, series)] scraped every second."""
    work = tempfile.mkdtemp(prefix="imgpool-preview.")
    state = os.path.join(work, "state")
    mnt = os.path.join(work, "mnt")
    disks = [os.path.join(work, f"disk{n}") for n in (1, 2, 3)]
    for d in [state, mnt, *disks]:
        os.mkdir(d)
    fio = []
    mounted = False

    def imgpool(*args, capture=False):
        cmd = [binary_path, "--state-dir", state, *args]
        if capture:
            return run(cmd, stdout=subprocess.PIPE, text=True).stdout
        return run(cmd)

    try:
        imgpool("init")
        for n, d in enumerate(disks, 1):
            imgpool("disk", "add", f"disk{n}", d)
        source = os.path.join(work, "golden.raw")
        with open(source, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(MIB))
        added = json.loads(imgpool("image", "add", "golden", source, "--copies", "2", "--json",
                                   capture=True))
        uuid = added["uuid"]
        imgpool("ref", "add", "golden", "replica-1")
        imgpool("mount", mnt, "--cache-size", "64MiB")
        mounted = True
        status = json.loads(imgpool("status", "--json", capture=True))
        control = status["mounts"][0]["control_socket"]
        image = json.loads(imgpool("image", "show", "golden", "--json", capture=True))
        holders = [c["disk"] for c in image["copies"]]
        views = [os.path.join(work, d, "backing-images", f"golden-{uuid}", "backing")
                 for d in holders]
        imgpool("volume", "create", "vm1", "--image", "golden")
        common = ["--direct=1", "--ioengine=psync", "--readonly", "--time_based",
                  f"--runtime={seconds}", "--output-format=terse"]
        fio.append(subprocess.Popen(
            ["fio", "--name=random", "--rw=randread", "--bs=4k", "--numjobs=2",
             f"--filename={views[0]}", *common], stdout=subprocess.DEVNULL))
        fio.append(subprocess.Popen(
            ["fio", "--name=sequential", "--rw=read", "--bs=1M",
             f"--filename={views[1]}", *common], stdout=subprocess.DEVNULL))
        # A VM writing its volume: 4 KiB random writes, 4 MiB/s.
        fio.append(subprocess.Popen(
            ["fio", "--name=volume", "--rw=randwrite", "--bs=4k", "--rate=4m", "--direct=1",
             "--ioengine=psync", "--time_based", f"--runtime={seconds}",
             f"--filename={os.path.join(mnt, 'volumes', 'vm1')}", "--output-format=terse"],
            stdout=subprocess.DEVNULL))
        history, start = [], time.monotonic()
        failed_disk = holders[1]
        for second in range(seconds + 1):
            time.sleep(max(0.0, start + second - time.monotonic()))
            history.append((float(second), parse_scrape(scrape(control))))
            if second == seconds // 3:
                imgpool("disk", "fail", failed_disk, "--reason", "preview: taken out for the plot")
            if second == 2 * seconds // 3:
                imgpool("disk", "online", failed_disk)
            if second % 5 == 4:
                imgpool("snapshot", "create", f"vm1@s{second}")
            if second == 5 * seconds // 6:
                imgpool("snapshot", "rm", "vm1", "--keep-last", "2")
        for p in fio:
            if p.wait() != 0:
                raise RuntimeError("fio failed")
        return history
    finally:
        for p in fio:
            if p.poll() is None:
                p.kill()
                p.wait()
        if mounted:
            subprocess.run([binary_path, "--state-dir", state, "umount", mnt], check=False)
        for m in sorted(mounts_under(work), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        if mounts_under(work):
            print(f"still mounted under {work}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(work)


UNITS = {"bytes": ("MiB", MIB), "Bps": ("MiB/s", MIB), "s": ("ms", 1e-3),
         "percentunit": ("%", 0.01), "reqps": ("req/s", 1), "ops": ("/s", 1), "short": ("", 1)}
STATE_COLOURS = {"healthy": "#56a64b", "failed": "#e02f44", "evicting": "#ff9830",
                 "read-only": "#fade2a", "missing": "#8f3bb8", "wrong-label": "#8f3bb8"}


def render(dashboard, history, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(22, height * unit_h + 0.6))
    fig.suptitle("imgpool dashboard, evaluated from real scrapes (scripts/dashboard-preview.py)",
                 fontsize=14, y=1 - 0.25 / (height * unit_h + 0.6))
    total_h = height * unit_h + 0.6

    def box(g):
        """Axes for a panel's gridPos: 24 columns, `unit_h` inches a grid row, room for the
        title above and the tick labels below."""
        top = 0.6 + g["y"] * unit_h + 0.35
        h = g["h"] * unit_h - 0.8
        return [g["x"] / 24 + 0.03, 1 - (top + h) / total_h, g["w"] / 24 - 0.045, h / total_h]

    for panel in panels:
        g = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(0.01, 1 - (0.6 + g["y"] * unit_h + 0.3) / total_h, panel["title"],
                     fontsize=13, weight="bold")
            continue
        ax = fig.add_axes(box(g))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        label, scale = UNITS[unit]
        lines = {}
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace(
                "$instance", ".*")
            for i, (t, _) in enumerate(history):
                value = Evaluator(history, i).evaluate(expr)
                if isinstance(value, float):
                    value = {frozenset(): value}
                for labels, v in value.items():
                    key = legend(target.get("legendFormat", ""), labels)
                    lines.setdefault(key, ([], []))
                    lines[key][0].append(t)
                    lines[key][1].append(v / scale)
        if panel["type"] == "stat":
            ax.axis("off")
            last = [v[-1] for _, (_, v) in sorted(lines.items()) if v]
            shown = sum(last) if last else 0.0
            ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes,
                                       color="#56a64b" if shown < 1 else "#e02f44"))
            # The sparkline (graphMode "area"): what the stat was over the run.
            peak = max([max(v) for _, v in lines.values() if v] + [1.0])
            for ts, vs in lines.values():
                ax.fill_between([t / history[-1][0] for t in ts], [v / peak * 0.8 for v in vs],
                                color="white", alpha=0.35, transform=ax.transAxes)
            ax.text(0.5, 0.45, f"{shown:g}", ha="center", va="center", fontsize=28,
                    color="white", weight="bold", transform=ax.transAxes)
        elif panel["type"] == "state-timeline":
            rows = sorted({key.rsplit(" ", 1)[0] for key in lines})
            for key, (ts, _) in lines.items():
                disk, state = key.rsplit(" ", 1)
                ax.broken_barh([(t - 0.5, 1) for t in ts], (rows.index(disk) - 0.4, 0.8),
                               color=STATE_COLOURS.get(state, "grey"))
            ax.set_yticks(range(len(rows)), rows)
            handles = [plt.Rectangle((0, 0), 1, 1, color=STATE_COLOURS[s])
                       for s in sorted({k.rsplit(" ", 1)[1] for k in lines})]
            ax.legend(handles, sorted({k.rsplit(" ", 1)[1] for k in lines}), fontsize=8,
                      loc="upper right")
            ax.set_xlim(0, history[-1][0])
        else:
            for key, (ts, vs) in sorted(lines.items()):
                # Series that stayed at zero are drawn but left out of the legend (Grafana's
                # legend "hide series with only zeros"), or a dozen idle FUSE operations would
                # crowd out the few that moved.
                moved = any(vs) or len(lines) <= 4
                ax.plot(ts, vs, label=key if moved else None, linewidth=1.4)
            if lines:
                ax.legend(fontsize=8, loc="upper left", ncol=2)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                        color="grey")
            ax.set_ylabel(label, fontsize=9)
            ax.set_xlim(0, history[-1][0])
            ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if panel["type"] != "stat":
            ax.set_xlabel("seconds", fontsize=8)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "dashboard-preview.png"))
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("dashboard-preview: must run as root (FUSE and bind mounts)")
    missing = [] if shutil.which("fio") else ["fio"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("python3-matplotlib")
    if missing:
        run(["apt-get", "install", "-y", "-q", *missing])
    binary_path = os.environ.get("IMGPOOL_BIN") or os.path.join(ROOT, "target", "release",
                                                                "imgpool")
    if not os.environ.get("IMGPOOL_BIN"):
        run(["cargo", "build", "--release", "--locked"], cwd=ROOT)
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    history = collect(binary_path, args.seconds)
    render(dashboard, history, args.out)


if __name__ == "__main__":
    main()
