"""`conductord status`: read a running node's local status endpoint and summarize it (SPEC §7).

One short GET of `{local_api_base}/v1/status`, bounded as a whole by 2 s (a `gevent.Timeout`:
the entry point runs monkey-patched), its body capped like a Control API answer, with no proxy
and no .netrc: the endpoint is on this machine. The transport is the client's
(`client.capped_get`); the snapshot is no Control API envelope, so the texts are this
command's. The URL is checked by the node's own `--local-api` rule, so the command cannot be
pointed anywhere the node itself would not serve. Prints one logfmt summary line, or the whole
snapshot with `--json`.

Exit codes: 0 leader or standby, 1 unreachable (or not a status endpoint), 2 usage error,
3 degraded.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from conductord.argparsing import ArgumentParser, UsageError, fail
from conductord.client import TransportError, capped_get
from conductord.config import SETTINGS_BY_NAME, validate_local_api
from conductord.lease import LeaseState

__all__ = ["STATUS_TIMEOUT_S", "StatusFetchError", "fetch_status", "main", "summary_line"]

STATUS_TIMEOUT_S = 2.0

_LOCAL_API = SETTINGS_BY_NAME["local_api_base"]

_USAGE = """\
usage: conductord status [--local-api URL] [--json]

Read a running node's local status endpoint (URL/v1/status) and print one summary line,
or with --json the whole snapshot.

  --local-api URL   the node's local_api_base (default: BAA_CONDUCTOR_LOCAL_API)
  --json            print the snapshot as JSON

exit codes: 0 leader or standby, 1 unreachable, 2 usage error, 3 degraded"""


class StatusFetchError(Exception):
    """`/v1/status` could not be read; `str()` is one line, `.unreachable` tells which kind."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def fetch_status(base_url: str, *, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """GET `{base_url}/v1/status` and return the snapshot; raises `StatusFetchError`."""
    url = f"{base_url}/v1/status"
    timeout_ms = round(timeout_s * 1000)
    try:
        answer = capped_get(url, timeout_ms=timeout_ms)
    except TransportError as err:
        if err.kind == "too_large":
            raise StatusFetchError(
                f"{url} did not answer with a conductord status snapshot ({err.detail})",
                unreachable=False,
            ) from None
        detail = f"timed out after {timeout_ms} ms" if err.kind == "timeout" else err.detail
        raise StatusFetchError(f"cannot reach {base_url}: {detail}", unreachable=True) from None
    if answer.status != 200:
        raise StatusFetchError(
            f"{url} answered HTTP {answer.status}; is a conductord status endpoint"
            " listening there?",
            unreachable=False,
        )
    _parsed, snapshot = answer.json()
    daemon = snapshot.get("daemon") if isinstance(snapshot, dict) else None
    if not isinstance(daemon, dict) or "lease_state" not in daemon:
        raise StatusFetchError(
            f"{url} did not answer with a conductord status snapshot", unreachable=False
        )
    return snapshot


def _logfmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    if any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def summary_line(snapshot: Mapping[str, Any], *, now: float) -> str:
    """One logfmt line: identity, state, leader, term, lease expiry (seconds from `now`),
    last error."""
    daemon = snapshot.get("daemon", {})
    expires_at = daemon.get("lease_expires_at")
    expires_in = "-" if expires_at is None else f"{round(expires_at - now)}s"
    fields = [
        ("state", daemon.get("lease_state")),
        ("leader", daemon.get("current_leader_id")),
        ("term", daemon.get("current_term")),
        ("lease_expires_in", expires_in),
        ("last_error", daemon.get("last_error")),
    ]
    identity = _logfmt(snapshot.get("identity"))
    return identity + " " + " ".join(f"{key}={_logfmt(value)}" for key, value in fields)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="conductord status")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--local-api", dest="local_api", metavar="URL")
    parser.add_argument("--json", action="store_true")
    return parser


def _resolve_local_api(flag: str | None, env: Mapping[str, str]) -> str:
    """The node's local API base, validated as the node's own config validates it."""
    value = (flag or "").strip() or env.get(_LOCAL_API.env, "").strip()
    if not value:
        raise UsageError(
            f"{_LOCAL_API.label} is not set: pass the node's status URL,"
            " e.g. --local-api http://127.0.0.1:4317"
        )
    try:
        return validate_local_api(value)
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: list[str], env: Mapping[str, str]) -> int:
    """`conductord status [--local-api URL] [--json]`; returns the exit status."""
    try:
        options = _parser().parse_args(list(argv))
        if options.help:
            sys.stdout.write(_USAGE + "\n")
            return 0
        base_url = _resolve_local_api(options.local_api, env)
    except UsageError as err:
        return fail(str(err), 2)
    try:
        snapshot = fetch_status(base_url)
    except StatusFetchError as err:
        return fail(str(err), 1)
    if options.json:
        sys.stdout.write(json.dumps(snapshot, indent=2) + "\n")
    else:
        sys.stdout.write(summary_line(snapshot, now=time.time()) + "\n")
    sys.stdout.flush()
    return 3 if snapshot["daemon"]["lease_state"] == LeaseState.DEGRADED else 0
