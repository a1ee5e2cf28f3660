"""The leader-only child of bench/chaos.py: `conductord start --exec "python chaos_child.py …"`.

A singleton service that checks it is one: at start it takes an exclusive, non-blocking `flock`
on one lock file shared by the whole fleet. Failing to get it means another node's child still
runs: an overlap, which it records (`overlap`) before retrying every tick until the other lets
go. While it holds the lock it appends `tick` lines to one shared log (O_APPEND, one `write` per
line, so lines of different processes never interleave), each carrying its fencing token:

    {"event": "start"|"tick"|"overlap"|"exit", "t": wall, "mono": monotonic, "node": ID,
     "term": N, "pid": PID, "pgid": PGID}

`term` and `node` come from CONDUCTORD_TERM and CONDUCTORD_NODE_ID (SPEC §14). bench/chaos.py
reads the log afterwards: an `overlap` line is a flock overlap; a `start`/`tick` line with a term
below one already written is a stale write.

SIGTERM writes `exit` and leaves (the lock goes with the process). It also leaves on its own after
`--max-seconds` or once the log's directory is gone, so a child whose guard failed cannot outlive
the run for long (bench/chaos.py kills what is left by process group anyway).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", required=True, help="the fleet's shared lock file")
    parser.add_argument("--log", required=True, help="the fleet's shared log (JSON lines)")
    parser.add_argument("--tick-ms", type=int, default=20, help="ms between log lines (20)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="lifetime bound (900)")
    args = parser.parse_args(argv)

    node = os.environ.get("CONDUCTORD_NODE_ID", "?")
    try:
        term = int(os.environ.get("CONDUCTORD_TERM", ""))
    except ValueError:
        term = -1  # recorded as is: a child without its fencing token is itself a finding
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lock_fd = os.open(args.lock, os.O_RDWR | os.O_CREAT, 0o600)
    pid, pgid = os.getpid(), os.getpgid(0)

    def write(event: str) -> None:
        line = {
            "event": event,
            "t": time.time(),
            "mono": time.monotonic(),
            "node": node,
            "term": term,
            "pid": pid,
            "pgid": pgid,
        }
        os.write(log_fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    run_dir = os.path.dirname(os.path.abspath(args.log))
    tick = args.tick_ms / 1000.0
    end = time.monotonic() + args.max_seconds
    held = False
    overlapped = False
    while not stopping and time.monotonic() < end and os.path.isdir(run_dir):
        if not held:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                write("start")
            except BlockingIOError:
                if not overlapped:
                    overlapped = True
                    write("overlap")
        else:
            write("tick")
        time.sleep(tick)
    if os.path.isdir(run_dir):
        write("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
