#!/usr/bin/env python3
"""What readers see while the daemon restarts (an upgrade), measured on a throwaway pool.

    sudo scripts/bench/restart.py [--rounds 5]

The daemon runs as systemd runs it: `imgpool mount MNT --foreground` with NOTIFY_SOCKET set to
a socket this script listens on, so "started" means READY=1, as for `systemctl restart`.
Readers use a disk's bound path `<disk>/backing-images/<name>-<uuid>/backing`. Three cases:

  restart       SIGTERM, wait for the daemon to exit, start the new one, wait for READY=1
                (`systemctl restart imgpool` with no file held open). A reader that opens,
                reads 64 KiB and closes in a loop measures how long the path is gone.
  held file     the same, while a second reader holds the file open and reads it: it keeps
                reading through the old daemon, which exits only once that reader closes
                (here after 3 s), and only then can the new one start.
  crash         kill -9, then (after the unit's RestartSec=2s) a new daemon that first
                unmounts the dead mount and binds ("Transport endpoint is not connected").

Printed per case: the longest time the path was gone for the reopening reader (first failed
open to the next good one), the stop and start times, and the errors each reader saw by errno.
IMGPOOL_BIN=/path/to/imgpool uses that binary (default: target/release/imgpool). Everything
is unmounted and removed at the end, also on failure.
"""

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
IMAGE_SIZE = 64 * MIB
RESTART_SEC = 2.0  # the unit's RestartSec=, applied by systemd after a crash only
STOP_TIMEOUT = 30.0  # the unit's TimeoutStopSec=


class Reader(threading.Thread):
    """Reads 64 KiB at a time from `path`: reopening it for every read, or holding one file
    open (until `close_at`, a time.monotonic() value, if given). Records (time, errno or 0)."""

    def __init__(self, path, hold=False):
        super().__init__(daemon=True)
        self.path, self.hold = path, hold
        self.events = []
        self.stop = threading.Event()
        self.close_at = None

    def run(self):
        fd = None
        offset = 0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                if fd is None:
                    if self.hold and self.events:
                        time.sleep(0.001)  # a held file, closed: this reader is done
                        continue
                    fd = os.open(self.path, os.O_RDONLY)
                data = os.pread(fd, 64 * 1024, offset)
                if len(data) != 64 * 1024:
                    raise OSError(errno.EIO, "short read")
                self.events.append((now, 0))
            except OSError as e:
                self.events.append((now, e.errno))
                if fd is not None and self.hold:
                    os.close(fd)
                    fd = None
            offset = (offset + 7 * 64 * 1024) % IMAGE_SIZE
            if fd is not None and (not self.hold or (self.close_at and now >= self.close_at)):
                os.close(fd)
                fd = None
                if self.hold:
                    self.events.append((time.monotonic(), -1))  # closed on purpose
            time.sleep(0.001)

    def errors(self, since):
        return Counter(errno.errorcode.get(e, str(e)) for t, e in self.events if t >= since and e > 0)

    def longest_gap(self, since):
        """The longest stretch from a failed read to the next good one."""
        longest, first_failure = 0.0, None
        for t, e in self.events:
            if t < since:
                continue
            if e > 0 and first_failure is None:
                first_failure = t
            elif e == 0 and first_failure is not None:
                longest = max(longest, t - first_failure)
                first_failure = None
        return longest


class Daemon:
    """`imgpool mount --foreground` with a notify socket, as systemd runs it."""

    def __init__(self, binary, state, mnt, work):
        self.binary, self.state, self.mnt = binary, state, mnt
        self.notify_path = os.path.join(work, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.log = open(os.path.join(work, "daemon.log"), "a")
        self.process = None

    def start(self):
        """Starts it; returns the seconds until READY=1."""
        started = time.monotonic()
        env = dict(os.environ, IMGPOOL_STATE_DIR=self.state, NOTIFY_SOCKET=self.notify_path)
        self.process = subprocess.Popen(
            [self.binary, "mount", self.mnt, "--foreground"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        self.notify.settimeout(0.1)
        while time.monotonic() - started < 120:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.process.returncode}) before READY")
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return time.monotonic() - started
            except socket.timeout:
                pass
        raise RuntimeError("no READY=1 within 120 s")

    def stop(self):
        """SIGTERM, then SIGKILL after TimeoutStopSec like systemd; returns the seconds to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started

    def crash(self):
        self.process.kill()
        self.process.wait()


def mounts_under(directory):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == directory or p.startswith(directory + "/")]


def run(binary, state, *args):
    env = dict(os.environ, IMGPOOL_STATE_DIR=state)
    out = subprocess.run([binary, *args], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("restart.py: must run as root (FUSE and bind mounts)")
    binary = os.environ.get("IMGPOOL_BIN") or os.path.join(ROOT, "target", "release", "imgpool")
    work = tempfile.mkdtemp(prefix="imgpool-restart.")
    state, mnt = os.path.join(work, "state"), os.path.join(work, "mnt")
    disks = [os.path.join(work, f"d{n}") for n in (1, 2)]
    for d in [state, mnt, *disks]:
        os.mkdir(d)
    daemon = None
    results = {"restart": [], "held file": [], "crash": []}
    try:
        run(binary, state, "init")
        for n, d in enumerate(disks, 1):
            run(binary, state, "disk", "add", f"d{n}", d)
        source = os.path.join(work, "image.raw")
        with open(source, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))
        uuid = json.loads(run(binary, state, "image", "add", "golden", source, "--json"))["uuid"]
        path = os.path.join(disks[0], "backing-images", f"golden-{uuid}", "backing")
        daemon = Daemon(binary, state, mnt, work)
        daemon.start()
        for case in results:
            for _ in range(args.rounds):
                reopening = Reader(path)
                held = Reader(path, hold=True) if case == "held file" else None
                for reader in filter(None, [reopening, held]):
                    reader.start()
                time.sleep(0.5)
                begin = time.monotonic()
                if case == "crash":
                    daemon.crash()
                    stop = 0.0
                    time.sleep(RESTART_SEC)
                else:
                    if held:
                        held.close_at = begin + 3.0
                    stop = daemon.stop()
                start = daemon.start()
                time.sleep(0.5)
                for reader in filter(None, [reopening, held]):
                    reader.stop.set()
                    reader.join()
                results[case].append({
                    "gap": reopening.longest_gap(begin), "stop": stop, "start": start,
                    "reopening_errors": reopening.errors(begin),
                    "held_errors": held.errors(begin) if held else None,
                    "reads": sum(1 for t, e in reopening.events if t >= begin and e == 0),
                })
        print(f"{args.rounds} rounds per case, {binary}")
        print(f"{'case':10} {'path gone (max of rounds)':>26} {'median':>8} {'stop':>7} "
              f"{'start':>7}  errors (reopening reader | held file)")
        for case, rounds in results.items():
            gaps = [r["gap"] for r in rounds]
            errors = sum((r["reopening_errors"] for r in rounds), Counter())
            held = (sum((r["held_errors"] for r in rounds), Counter())
                    if rounds[0]["held_errors"] is not None else "-")
            print(f"{case:10} {max(gaps) * 1000:24.0f}ms {statistics.median(gaps) * 1000:6.0f}ms "
                  f"{statistics.median(r['stop'] for r in rounds):6.2f}s "
                  f"{statistics.median(r['start'] for r in rounds):6.2f}s  "
                  f"{dict(errors)} | {dict(held) if held != '-' else '-'}")
    finally:
        if daemon and daemon.process and daemon.process.poll() is None:
            daemon.stop()
        for m in sorted(mounts_under(work), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        if mounts_under(work):
            print(f"still mounted under {work}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
