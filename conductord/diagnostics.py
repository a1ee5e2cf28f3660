"""`conductord diagnose` / `scripts/run_once.py`: the start sequence once, explained.

Runs the same start sequence as `start --run-once` (releasing any lease it took), then reports
each checklist step with its outcome and time, the snapshot, the warnings and a verdict, as a
human report or one JSON document. It also shows the leader-only work settings (SPEC §14):
the `--exec` program (argv[0] only: arguments may hold secrets) and whether it resolves on
PATH, and the `--scheduler` / `--hooks` plug-ins; it never starts the `--exec` command.
The exit code is the lease state's (SPEC §7): 0 leader or standby, 3 degraded. Log lines go
to stderr, and only errors unless `--log-level debug`, so the report stays readable.

Every Control API URL (SPEC §17) is then checked on its own (`conductord.endpoints`): reachable
(the §4 error if not), which store answers, which lease it sees, and whether the URLs share one
store; a URL on SQLite among several, or URLs that see different leases, add a warning. These
checks inform; they never change the verdict or the exit code.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from conductord import endpoints, logs
from conductord.config import Config
from conductord.lease import LeaseState
from conductord.redact import clean
from conductord.runtime import EXIT_DEGRADED, EXIT_OK, Runtime


def run_diagnostics(config: Config, *, as_json: bool) -> int:
    log = logs.configure(
        level="debug" if config.log_level == "debug" else "error",
        stream=sys.stderr,
        secrets=[config.shared_token],
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
    add_endpoint_checks(report, config)
    # Redacted like a log line: a server could name the token as the lease holder.
    report = clean(report, [config.shared_token])
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
    if "control_api" in report:
        lines += format_endpoint_checks(report["control_api"])
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in report["notes"]]
    lines += ["", f"verdict: {report['verdict']} (exit {report['exit_code']})"]
    return "\n".join(lines)


# -- every Control API URL (SPEC §17) ------------------------------------------------------------


def add_endpoint_checks(report: dict[str, Any], config: Config) -> None:
    """Check each URL after the start sequence (its acquire, if any, has set the term the URLs
    are compared on) and put the section under `control_api`; its warnings join the report's."""
    section = endpoints.check_endpoints(
        config.control_api_bases,
        token=config.shared_token,
        timeout_ms=config.request_timeout_ms,
        in_use=report["snapshot"]["control_api"]["base_url"],
    )
    report["control_api"] = section
    report["warnings"] = [*report["warnings"], *section["warnings"]]
    down = [check for check in section["endpoints"] if check["error"]]
    if down and len(section["endpoints"]) > 1:
        report["notes"].append(
            f"{len(down)} of {len(section['endpoints'])} Control API URLs failed their check:"
            " the fleet has less of a spare than configured"
        )


def format_endpoint_checks(section: dict[str, Any]) -> list[str]:
    lines = ["", "control API URLs:"]
    for number, check in enumerate(section["endpoints"], start=1):
        marker = " (in use)" if check["in_use"] else ""
        lines.append(f"  {number}. {check['base_url']}{marker}")
        if check["reachable"]:
            store = check["store"] or "not said"
            seen = endpoints.lease_text(check) if check["lease_read"] else "lease not read"
            lines.append(f"     reachable, store {store}, {seen} ({check['duration_ms']:.1f} ms)")
        if check["error"]:
            lines.append(f"     error: {check['error']}")
    shared = {True: "yes", False: "NO", None: "cannot tell"}[section["shared_store"]]
    if len(section["endpoints"]) > 1:
        lines.append(f"  one shared store: {shared} ({section['shared_store_detail']})")
    return lines
