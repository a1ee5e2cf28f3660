#!/usr/bin/env python3
"""Diagnostics for one conductord node: the start sequence once, step by step.

Same configuration sources as `conductord start` (defaults < BAA_* environment < flags).
Prints a human report, or JSON with --json. Exit codes: 0 leader or standby, 1 unexpected
failure, 2 usage or config error, 3 degraded. Equivalent to `conductord diagnose`.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from conductord.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["diagnose", *sys.argv[1:]]))
