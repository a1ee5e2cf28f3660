"""`conductord fleet`: who leads, who is healthy and who led before, from one terminal (SPEC §16).

Three GETs to one Control API: `/v1/controllers` (every controller with its seconds since
heartbeat, its instances and a `duplicate` flag), `/v1/leader` (the lease, live or not, and its
seconds left on the server's decision clock) and `/v1/leader/history?limit=10`. Printed as a
table, or with `--json` as one document. A Control API without history (404, an older server)
is shown without it.

Settings come from the node's own rows (`config.SETTINGS`), so a node's environment works as
it is: `--control-api-base` / `BAA_CONTROL_API_BASE` (comma-separated, SPEC §17),
`--shared-token` / `--shared-token-file` / `BAA_SHARED_TOKEN[_FILE]`, and
`--request-timeout-ms` / `BAA_CONDUCTOR_REQUEST_TIMEOUT_MS` bounding each GET as a whole. With
several URLs the first that answers (all three GETs, each a Control API answer) is used, in
order; a 401 stops at once, since the URLs share one configuration.

Exit codes: 0 a live leader and no duplicate id; 3 no live leader, or a controller id with two
instances heartbeating within the last TTL (two processes share one node id); 1 no Control API
answered, or it refused the token (one line on stderr, no token in it); 2 usage or settings
error. The GETs are `ControlApiClient.get`: the client's session (no proxy from the
environment, no `.netrc`), whole-call deadline, body cap, SPEC §4 texts and redaction. What is
printed is a server's text: every value is redacted of the token and of every piece of it of 8
characters or more before it is shown (SPEC §3).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from marshmallow import Schema, post_load

from conductord.argparsing import ArgumentParser, UsageError, fail
from conductord.client import ControlApiClient
from conductord.config import SETTINGS_BY_NAME, ConfigError, Setting, SettingsTable
from conductord.redact import clean, redact
from conductord.wire import CONTROLLERS_PATH, HISTORY_PATH, LEADER_PATH, ControlApiError

__all__ = ["EXIT_NO_LEADER", "HISTORY_SHOWN", "FleetError", "FleetView", "fetch_fleet", "main"]

EXIT_NO_LEADER = 3
HISTORY_SHOWN = 10

_ROWS: Final[tuple[Setting, ...]] = (
    SETTINGS_BY_NAME["control_api_base"],
    SETTINGS_BY_NAME["shared_token"],
    SETTINGS_BY_NAME["shared_token_file"],
    dataclasses.replace(
        SETTINGS_BY_NAME["request_timeout_ms"],
        help="bound on each GET, per URL",
        rule="integer >= 1",
    ),
)


@dataclass(frozen=True)
class FleetSettings:
    bases: tuple[str, ...]
    token: str | None = dataclasses.field(default=None, repr=False)
    timeout_ms: int = 5000


class _FleetRules(Schema):
    @post_load
    def _build(self, data: dict[str, Any], **_kwargs: Any) -> FleetSettings:
        return FleetSettings(
            data["control_api_bases"], data.get("shared_token"), data["request_timeout_ms"]
        )


FLEET_SETTINGS: Final = SettingsTable(_ROWS, _FleetRules)


class FleetError(Exception):
    """No Control API gave the fleet's view; `str()` is one line without the token."""


class _NoAnswer(Exception):
    """This URL gave no Control API answer; the next one may."""


@dataclass(frozen=True)
class FleetView:
    """What one Control API said about the fleet (the `data` of its three answers)."""

    base_url: str
    controllers: list[dict[str, Any]]
    leader: dict[str, Any]  # GET /v1/leader: lease, is_live, expires_in_sec, server_time
    history: list[dict[str, Any]] | None  # None: this Control API keeps no history

    @property
    def lease(self) -> dict[str, Any] | None:
        lease = self.leader.get("lease")
        return lease if isinstance(lease, dict) else None

    @property
    def has_leader(self) -> bool:
        return self.leader.get("is_live") is True and self.lease is not None

    @property
    def duplicates(self) -> list[str]:
        return [c["controller_id"] for c in self.controllers if c.get("duplicate") is True]

    @property
    def healthy(self) -> bool:
        return self.has_leader and not self.duplicates

    def document(self) -> dict[str, Any]:
        """The `--json` document."""
        lease = self.lease
        current = None
        if lease is not None:
            current = {
                "holder_id": lease.get("holder_id"),
                "holder_host": lease.get("holder_host"),
                "term": lease.get("term"),
                "live": self.has_leader,
                "seconds_left": self.leader.get("expires_in_sec") if self.has_leader else 0,
                "holder_instance_id": lease.get("holder_instance_id"),
            }
        return {
            "control_api": self.base_url,
            "ok": self.healthy,
            "leader": current,
            "duplicates": self.duplicates,
            "controllers": self.controllers,
            "history": self.history,
            "server_time": self.leader.get("server_time"),
        }


def fetch_fleet(bases: Sequence[str], *, token: str | None, timeout_ms: int = 5000) -> FleetView:
    """The fleet as the first of `bases` that answers sees it; raises `FleetError`."""
    problems: list[str] = []
    with ControlApiClient(bases, token=token, timeout_ms=timeout_ms) as client:
        for base in client.base_urls:
            try:
                return _fetch_from(client, base)
            except ControlApiError as err:
                if err.status == 401:
                    raise FleetError(
                        f"{base} refused the token (401 unauthorized): check"
                        " --shared-token-file / BAA_SHARED_TOKEN_FILE"
                    ) from None
                problems.append(f"{base}: {err}")
            except _NoAnswer as exc:
                problems.append(f"{base}: {exc}")
    raise FleetError("no Control API answered: " + "; ".join(problems))


def _fetch_from(client: ControlApiClient, base: str) -> FleetView:
    controllers = client.get(CONTROLLERS_PATH, base_url=base)
    if not (isinstance(controllers, dict) and isinstance(controllers.get("controllers"), list)):
        raise _NoAnswer(f"{CONTROLLERS_PATH} is not a Control API answer")
    leader = client.get(LEADER_PATH, base_url=base)
    if not isinstance(leader, dict):
        raise _NoAnswer(f"{LEADER_PATH} is not a Control API answer")
    try:
        history = client.get(HISTORY_PATH, params={"limit": HISTORY_SHOWN}, base_url=base)
    except ControlApiError as err:
        if err.status != 404:  # 404: a Control API that keeps no history (an older server)
            raise
        history = None
    entries = history.get("entries") if isinstance(history, dict) else None
    rows = [row for row in controllers["controllers"] if isinstance(row, dict)]
    return FleetView(base, rows, leader, entries if isinstance(entries, list) else None)


# -- the table --------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _seconds(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, int | float) else "-"


def _ago(value: Any) -> str:
    return f"{value:.1f}s ago" if isinstance(value, int | float) else "-"


def _short(instance_id: Any) -> str:
    text = _text(instance_id)
    return text if len(text) <= 12 else text[:12] + "…"


def _when(at: Any) -> str:
    if not isinstance(at, int | float):
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def render(view: FleetView) -> str:
    """The fleet as text: a verdict line, the lease, the controllers, the recent history."""
    lease = view.lease
    if view.has_leader and lease is not None:
        verdict = (
            f"leader {_text(lease.get('holder_id'))} on {_text(lease.get('holder_host'))},"
            f" term {_text(lease.get('term'))}, {_seconds(view.leader.get('expires_in_sec'))} left"
        )
    elif lease is not None:
        verdict = (
            f"NO LEADER (the lease of term {_text(lease.get('term'))}, last held by"
            f" {_text(lease.get('holder_id'))}, is released or expired)"
        )
    else:
        verdict = "NO LEADER (the lease was never granted)"
    lines = [f"fleet: {verdict}", f"control api: {view.base_url}"]
    for controller_id in view.duplicates:
        lines.append(
            f"DUPLICATE node id {controller_id}: two processes heartbeat under it;"
            " stop one or give it its own BAA_NODE_ID"
        )

    lines += ["", f"controllers ({len(view.controllers)})"]
    rows = []
    for c in view.controllers:
        flag = ""
        if c.get("duplicate") is True:
            instances = c.get("instances") or []
            flag = "DUPLICATE: " + ", ".join(
                f"{_short(i.get('instance_id'))} on {_text(i.get('host'))}"
                for i in instances
                if isinstance(i, dict)
            )
        rows.append(
            [
                _text(c.get("controller_id")),
                _text(c.get("host")),
                _text(c.get("role")),
                _text(c.get("status")),
                _ago(c.get("seconds_since_heartbeat")),
                _text(c.get("version")),
                _short(c.get("instance_id")),
                flag,
            ]
        )
    if rows:
        header = ["ID", "HOST", "ROLE", "STATE", "LAST HEARTBEAT", "VERSION", "INSTANCE", ""]
        lines += _table(header, rows)
    else:
        lines.append("  none has sent a heartbeat")

    if view.history is None:
        lines += ["", "history: not kept by this Control API"]
    else:
        lines += ["", f"history (newest {len(view.history)})"]
        rows = [
            [
                _when(e.get("at")),
                _text(e.get("term")),
                _text(e.get("reason")),
                _text(e.get("holder_id")),
                _text(e.get("holder_host")),
                _text(e.get("previous_holder_id")),
            ]
            for e in view.history
            if isinstance(e, dict)
        ]
        if rows:
            lines += _table(["AT (UTC)", "TERM", "REASON", "HOLDER", "HOST", "PREVIOUS"], rows)
        else:
            lines.append("  no changes recorded yet")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------


def usage_text() -> str:
    usage = FLEET_SETTINGS.usage_lines("fleet", "[--json]")
    return "\n".join(
        [
            *usage,
            "",
            "Show the controllers, the current lease and the recent lease history, as one",
            "Control API sees them (the first of the URLs that answers).",
            "Precedence: default < environment < flag; an empty or blank value counts as unset.",
            *FLEET_SETTINGS.help_lines(),
            "  --json                                 print one JSON document",
            "",
            "exit codes: 0 a leader and no duplicate node id, 1 unreachable or unauthorized,",
            "2 usage error, 3 no leader or a duplicate node id",
        ]
    )


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="conductord fleet")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--json", action="store_true")
    FLEET_SETTINGS.add_arguments(parser)
    return parser


def main(argv: list[str], env: Mapping[str, str]) -> int:
    """`conductord fleet [options] [--json]`; returns the exit status."""
    try:
        options = _parser().parse_args(list(argv))
    except UsageError as err:
        return fail(str(err), 2)
    if options.help:
        sys.stdout.write(usage_text() + "\n")
        return 0
    try:
        settings: FleetSettings = FLEET_SETTINGS.resolve(FLEET_SETTINGS.flags(options), env)
    except ConfigError as err:
        for problem in err.problems:
            fail(problem)
        return 2
    secrets = [settings.token] if settings.token else []
    try:
        view = fetch_fleet(settings.bases, token=settings.token, timeout_ms=settings.timeout_ms)
    except FleetError as err:
        return fail(clean(str(err), secrets), 1)
    # Everything shown is a server's text (ids, hosts, versions, history): made valid and
    # redacted of the token and of every piece of it of 8 characters or more (SPEC §3), value
    # by value (a JSON escape cannot hide a piece), then the whole text once more (a piece a
    # table cell was cut from).
    view = dataclasses.replace(
        view,
        controllers=clean(view.controllers, secrets),
        leader=clean(view.leader, secrets),
        history=None if view.history is None else clean(view.history, secrets),
    )
    if options.json:
        text = json.dumps(view.document(), indent=2, ensure_ascii=False)
    else:
        text = render(view)
    sys.stdout.write(redact(text, secrets) + "\n")
    sys.stdout.flush()
    return 0 if view.healthy else EXIT_NO_LEADER
