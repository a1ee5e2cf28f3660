"""`conductord diagnose` / `scripts/run_once.py`: the start sequence once, explained.

Runs the same start sequence as `start --run-once` (releasing any lease it took), then reports
each checklist step with its outcome and time, the snapshot, the warnings and a verdict, as a
human report or one JSON document. It also shows the leader-only work settings (SPEC §14):
the `--exec` program (argv[0] only: arguments may hold secrets) and whether it resolves on
PATH, and the `--scheduler` / `--hooks` plug-ins; it never starts the `--exec` command.
The exit code is the lease state's (SPEC §7): 0 leader or standby, 3 degraded. Log lines go
to stderr, and only errors unless `--log-level debug`, so the report stays readable.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from conductord import logs
from conductord.config import Config
from conductord.lease import LeaseState
from conductord.runtime import EXIT_DEGRADED, EXIT_OK, Runtime


def run_diagnostics(config: Config, *, as_json: bool) -> int:
    log = logs.configure(
        level="debug" if config.log_level == "debug" else "error",
        stream=sys.stderr,
        secrets=[config.shared_token] if config.shared_token else [],
        node_id=config.node_id,
        host=config.host,
        role=config.role,
    )
    # A one-shot run: a fresh instance, no lock, and it releases only a term granted to it,
    # so running diagnostics beside a live leader never ends that leader's lease (SPEC §15).
    runtime = Runtime(config, log=log, one_shot=True)
    try:
        runtime.start(loops=False)
        snapshot = runtime.snapshot()
    finally:
        runtime.stop()  # release whatever the start sequence took, even if a step raised

    report = build_report(runtime.steps, snapshot)
    report["work"] = work_settings(config)
    report["notes"] += work_notes(report["work"])
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
    sys.stdout.flush()
    return report["exit_code"]


def build_report(steps: list[dict[str, Any]], snapshot: dict[str, Any]) -> dict[str, Any]:
    daemon = snapshot["daemon"]
    state = daemon["lease_state"]
    degraded = state == str(LeaseState.DEGRADED)
    notes = []
    if daemon["consecutive_heartbeat_failures"]:
        notes.append("the registration heartbeat failed (the lease state does not depend on it)")
    if degraded:
        verdict = f"degraded: {daemon['last_error'] or 'unknown error'}"
    elif state == str(LeaseState.LEADER):
        verdict = f"healthy: leader of term {daemon['current_term']}"
    else:
        verdict = f"healthy: standby (leader {daemon['current_leader_id'] or 'none'})"
    return {
        "verdict": verdict,
        "exit_code": EXIT_DEGRADED if degraded else EXIT_OK,
        "notes": notes,
        "steps": steps,
        "warnings": snapshot["warnings"],
        "snapshot": snapshot,
    }


def work_settings(config: Config) -> dict[str, Any]:
    """The leader-only work settings (SPEC §14), safe to show: argv[0] of --exec only."""
    program = config.exec_argv[0] if config.exec_argv else None
    return {
        "exec": {
            "command": program,
            "resolves_to": shutil.which(program) if program else None,
            "every_ms": config.exec_every_ms,
            "stop_grace_ms": config.exec_stop_grace_ms,
        },
        "scheduler": config.scheduler,
        "scheduler_interval_ms": config.scheduler_interval_ms,
        "hooks": config.hooks,
    }


def work_notes(work: dict[str, Any]) -> list[str]:
    program = work["exec"]["command"]
    if program is not None and work["exec"]["resolves_to"] is None:
        return [f"the --exec program {program} is not an executable found on PATH"]
    return []


def _work_lines(work: dict[str, Any]) -> list[str]:
    exe = work["exec"]
    if exe["command"] is None:
        exec_line = "-"
    else:
        found = exe["resolves_to"] or "NOT FOUND on PATH"
        mode = f"every {exe['every_ms']} ms" if exe["every_ms"] else "service"
        exec_line = (
            f"{exe['command']} ({found}); {mode}, stop grace {exe['stop_grace_ms']} ms"
            " (never started by diagnose)"
        )
    scheduler = work["scheduler"]
    if scheduler is not None:
        scheduler = f"{scheduler} every {work['scheduler_interval_ms']} ms"
    return [
        f"exec:               {exec_line}",
        f"scheduler:          {scheduler or '-'}",
        f"hooks:              {work['hooks'] or '-'}",
    ]


def format_report(report: dict[str, Any]) -> str:
    snapshot = report["snapshot"]
    daemon = snapshot["daemon"]
    lines = [
        f"conductord diagnostics for {snapshot['identity']}",
        f"control API: {snapshot['control_api']['base_url']}",
        "",
        "start sequence:",
    ]
    width = max(len(step["key"]) for step in report["steps"])
    for number, step in enumerate(report["steps"], start=1):
        detail = f"  {step['detail']}" if step["detail"] else ""
        lines.append(
            f"  {number}. {step['key']:<{width}}  {step['outcome']:<7}"
            f" {step['duration_ms']:>8.1f} ms{detail}"
        )
    lines += [
        "",
        f"lease state:        {daemon['lease_state']}",
        f"leader:             {daemon['current_leader_id'] or '-'}"
        f" (term {daemon['current_term'] if daemon['current_term'] is not None else '-'})",
        f"heartbeat failures: {daemon['consecutive_heartbeat_failures']}",
        f"renew failures:     {daemon['consecutive_renew_failures']}",
        f"last error:         {daemon['last_error'] or '-'}",
    ]
    if "work" in report:
        lines += ["", *_work_lines(report["work"])]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in report["notes"]]
    lines += ["", f"verdict: {report['verdict']} (exit {report['exit_code']})"]
    return "\n".join(lines)
