#!/usr/bin/env python3
"""Embed conductord in your own program: a Python scheduler that runs on the leader only.

    BAA_SHARED_TOKEN_FILE=/etc/conductord/token \\
        python examples/embedded_scheduler.py http://127.0.0.1:8787 --node-id mini-a

Start it on two or three machines (or twice on one, with different `--node-id`s): one leads
and logs `example.pass` every `--interval-ms` with its term; stop it (Ctrl-C, SIGTERM) and
another takes over. Every other setting comes from the `BAA_*` variables, as for
`conductord start` (the token never on the command line). JSON log lines on stdout; exit 0 on a
clean stop, 1 after a crash, 2 on a configuration error. docs/embedding.md explains the API.
"""

from gevent import monkey

monkey.patch_all()  # first, before anything imports requests (or socket, ssl, threading)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import conductord  # noqa: E402
from conductord import identity, logs  # noqa: E402
from conductord.config import ConfigError, resolve_config  # noqa: E402
from conductord.runtime import install_signal_handlers  # noqa: E402


def make_pass(log: Any):
    """The scheduler pass: called every interval in its own greenlet, on the leader only."""
    runs = 0

    def schedule(ctx: conductord.SchedulerContext) -> None:
        nonlocal runs
        runs += 1
        # Re-check right before an act that must not outlive leadership, and send the term
        # with it so whatever it touches can refuse a stale leader (fencing).
        if not ctx.still_leader():
            return
        log.info("example.pass", run=runs, term=ctx.term, controller_id=ctx.controller_id)

    return schedule


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("control_api_base", help="the Control API URL (several: comma-joined)")
    parser.add_argument("--node-id", help="this node's id (default: BAA_NODE_ID or the host)")
    parser.add_argument("--interval-ms", default="1000", help="ms between passes (1000)")
    args = parser.parse_args(argv)

    flags = {
        "control_api_base": args.control_api_base,
        "node_id": args.node_id,
        "scheduler_interval_ms": args.interval_ms,
    }
    try:
        config = resolve_config(flags, os.environ)
        instance = identity.claim(config.paths.state_dir)  # one process per node id
    except (ConfigError, identity.InstanceLockError) as err:
        for line in getattr(err, "problems", [str(err)]):
            sys.stderr.write(f"embedded_scheduler: error: {line}\n")
        return 2
    log = logs.configure(
        level=config.log_level,
        stream=sys.stdout,
        secrets=[config.shared_token] if config.shared_token else [],
        node_id=config.node_id,
        host=config.host,
        role=config.role,
    )

    runtime = conductord.Runtime(config, log=log, instance=instance, scheduler=make_pass(log))
    runtime.on_lease_state_change(
        lambda snapshot: log.info("example.state", state=snapshot["daemon"]["lease_state"])
    )
    install_signal_handlers(runtime)  # SIGTERM/SIGINT: stop; a second one: exit at once
    try:
        snapshot = runtime.start()  # the start sequence, the loops, the scheduler greenlet
        log.info("example.started", lease_state=snapshot["daemon"]["lease_state"])
        runtime.stop_requested.wait()  # a signal, or a crash (logged as conductor.crashed)
    finally:
        runtime.stop()  # scheduler off, loops stopped, lease released
    return 1 if runtime.crashed is not None else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
