"""The Control API URLs of one node checked as one control plane (SPEC §17).

A node given several base URLs relies on them sharing one store: only then is there one lease.
This module asks each URL what it is, for `diagnose` and for the daemon's one look at start.

- `check_endpoints(urls, …)`: for every URL at once (a greenlet each), `GET /healthz` (no
  token: is it up, which store answers) and then `GET /v1/leader` (with the token: does it
  accept ours, which lease does it see). Each call is bounded by the request timeout as a
  whole (`gevent.Timeout`); a failure is the SPEC §4 text (`Control API {path}: connection
  failed: …`, `… timed out after N ms`, `Control API {status} {path}: {error}: {message}`),
  with the token and any piece of it redacted. Then `judge()` says whether they share a store.
- `store_kinds(urls, …)` is the `GET /healthz` part alone; `warn_about_stores(runtime)` runs it
  once in its own greenlet when the daemon starts with several URLs and logs a
  `config.warning` for each URL on SQLite (see docs/postgres.md for why once, and why a
  warning rather than a refusal).

"They share one store" is judged from what the URLs say, not proven:
- several URLs, one of them on SQLite: not shared (a SQLite file belongs to one process; two
  names of that one process are the exception, and they would show the same lease);
- every URL that answered sees the same lease (term and holder): shared. Two separate stores
  holding the same term and holder are possible (two fresh stores after the same first grant),
  so this is evidence, strongest after the start sequence's own acquire has moved the term;
- they see different leases: not shared, unless the lease changed between the reads, so the
  reads are made once more before concluding.

These are diagnostics' reads: GETs only, nothing here sends a lease or heartbeat call. They go
through `ControlApiClient.get` (a client of their own, not the daemon's: its call counts and
URL in use stay the lease loop's), so the transport, the deadline, the body cap, the §4 texts
and the redaction are the client's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

import gevent

from conductord.client import ControlApiClient
from conductord.redact import server_text
from conductord.wire import HEALTHZ_PATH, LEADER_PATH, ControlApiError

__all__ = [
    "HEALTHZ_PATH",
    "LEADER_PATH",
    "EndpointCheck",
    "check_endpoints",
    "judge",
    "lease_text",
    "sqlite_warnings",
    "store_kinds",
    "warn_about_stores",
]

_TEXT_CHARS: Final = 1000
_SETTING: Final = "--control-api-base / BAA_CONTROL_API_BASE"


@dataclass(frozen=True)
class EndpointCheck:
    """What one base URL said. `store` is `sqlite`, `postgresql`, or None (not said)."""

    base_url: str
    in_use: bool = False
    reachable: bool = False
    error: str | None = None
    store: str | None = None
    lease_read: bool = False  # GET /v1/leader answered (with our token)
    term: int | None = None
    holder_id: str | None = None
    lease_live: bool | None = None  # the lease binds others now (False: released or expired)
    duration_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _store_of(data: Any) -> str | None:
    store = data.get("store") if isinstance(data, dict) else None
    # Shown as it is only when it is one we know; anything else is a server's text.
    if store in ("sqlite", "postgresql"):
        return store
    return server_text(store, (), 40) if isinstance(store, str) and store else None


def _check_health(client: ControlApiClient, base_url: str) -> EndpointCheck:
    """`GET /healthz` of one URL, without the token (it needs none): up, and which store."""
    try:
        health = client.get(HEALTHZ_PATH, base_url=base_url, authorized=False)
    except ControlApiError as err:
        return EndpointCheck(base_url, error=str(err))
    return EndpointCheck(base_url, reachable=True, store=_store_of(health))


def _check_one(client: ControlApiClient, base_url: str, token: str | None) -> EndpointCheck:
    began = time.monotonic()
    check = _check_health(client, base_url)
    if check.reachable:
        try:
            check = _read_lease(client, check, token)
        except ControlApiError as err:
            check = replace(check, error=str(err))
    return replace(check, duration_ms=round((time.monotonic() - began) * 1000, 1))


def _read_lease(client: ControlApiClient, check: EndpointCheck, token: str | None) -> EndpointCheck:
    data = client.get(LEADER_PATH, base_url=check.base_url)
    lease = data.get("lease") if isinstance(data, dict) else None
    if not isinstance(lease, dict):
        return replace(check, lease_read=True, term=None, holder_id=None, lease_live=None)
    term = lease.get("term")
    holder = lease.get("holder_id")
    live = data.get("is_live")
    return replace(
        check,
        lease_read=True,
        term=term if isinstance(term, int) and not isinstance(term, bool) else None,
        # A server's text: a holder id could even be the token (redacted like a log line).
        holder_id=server_text(holder, (token,), _TEXT_CHARS) if isinstance(holder, str) else None,
        lease_live=live if isinstance(live, bool) else None,
    )


def _all_at_once(work: Callable[[str], Any], urls: Sequence[str]) -> list[Any]:
    greenlets = [gevent.spawn(work, url) for url in urls]
    gevent.joinall(greenlets, raise_error=True)
    return [greenlet.value for greenlet in greenlets]


def check_endpoints(
    urls: Sequence[str],
    *,
    token: str | None,
    timeout_ms: int,
    in_use: str | None = None,
) -> dict[str, Any]:
    """Check every URL (see the module docstring); a JSON-ready section for `diagnose`:
    `base_urls`, `in_use`, `endpoints` (one `EndpointCheck` dict each, in the given order),
    `shared_store` (True, False or None: cannot tell), `shared_store_detail`, `warnings`."""
    with ControlApiClient(urls, token=token, timeout_ms=timeout_ms) as client:
        urls = client.base_urls  # as the client spells them (no trailing /)
        checks = _all_at_once(lambda url: _check_one(client, url, token), urls)
        shared, detail = judge(checks)
        on_sqlite = any(c.store == "sqlite" for c in checks)
        if shared is False and not on_sqlite:
            # Perhaps the lease changed between the reads (a grant, a takeover): read again.
            def again(check: EndpointCheck) -> EndpointCheck:
                try:
                    return _read_lease(client, check, token)
                except ControlApiError as err:
                    return replace(check, lease_read=False, error=str(err))

            readable = {c.base_url for c in checks if c.lease_read}
            by_url = {c.base_url: c for c in checks}
            rereads = [u for u in urls if u in readable]
            reread = _all_at_once(lambda url: again(by_url[url]), rereads)
            by_url.update({c.base_url: c for c in reread})
            checks = [by_url[url] for url in urls]
            shared, detail = judge(checks)
    checks = [replace(c, in_use=c.base_url == in_use) for c in checks]
    warnings = sqlite_warnings(checks)
    if shared is False and not warnings:
        warnings.append(f"the Control API URLs do not share one store: {detail}")
    return {
        "base_urls": list(urls),
        "in_use": in_use,
        "endpoints": [c.as_dict() for c in checks],
        "shared_store": shared,
        "shared_store_detail": detail,
        "warnings": warnings,
    }


def judge(checks: Sequence[EndpointCheck]) -> tuple[bool | None, str]:
    """(do the URLs share one store: True, False or None for "cannot tell", why)."""
    if len(checks) < 2:
        return None, "one URL"
    sqlite = [c.base_url for c in checks if c.store == "sqlite"]
    if sqlite:
        named = ", ".join(sqlite)
        return False, f"SQLite behind {named}: a SQLite store belongs to one process"
    read = [c for c in checks if c.lease_read]
    if len(read) < 2:
        return None, f"{len(read)} of {len(checks)} URLs showed their lease; nothing to compare"
    views = {(c.term, c.holder_id) for c in read}
    if len(views) > 1:
        seen = "; ".join(f"{c.base_url} {lease_text(c)}" for c in read)
        return False, f"the URLs see different leases: {seen}"
    term, _holder = next(iter(views))
    if term is None:
        return None, "no URL has a lease yet; nothing to compare"
    return True, f"{len(read)} URLs see one lease: {lease_text(read[0])}"


def lease_text(check: EndpointCheck | dict[str, Any]) -> str:
    """`term 3 held by n1`, `term 3, not live (last held by n1)`, or `no lease`."""
    values = check if isinstance(check, dict) else check.as_dict()
    if values["term"] is None:
        return "no lease"
    holder = values["holder_id"] or "?"
    if values["lease_live"] is False:
        return f"term {values['term']}, not live (last held by {holder})"
    return f"term {values['term']} held by {holder}"


def sqlite_warnings(checks: Sequence[EndpointCheck]) -> list[str]:
    """One warning per URL on SQLite, when there are several URLs (one URL on SQLite is fine)."""
    if len(checks) < 2:
        return []
    return [
        f"Control API {c.base_url} answers from a SQLite store: the URLs of {_SETTING} must"
        " share one PostgreSQL store, or nodes on different URLs can hold the lease at once"
        for c in checks
        if c.store == "sqlite"
    ]


def store_kinds(urls: Sequence[str], *, timeout_ms: int) -> list[EndpointCheck]:
    """`GET /healthz` of every URL at once: reachable and store kind only."""

    with ControlApiClient(urls, timeout_ms=timeout_ms) as client:
        return _all_at_once(lambda url: _check_health(client, url), client.base_urls)


def warn_about_stores(runtime: Any) -> gevent.Greenlet | None:
    """At daemon start with several URLs: one bounded look, in its own greenlet, that logs a
    `config.warning` (and adds it to the snapshot's warnings) for each URL on SQLite.

    Never blocks or changes the start sequence; a URL that does not answer is not reported
    here (the lease loop reports it). Returns the greenlet (None with a single URL)."""
    config = runtime.config
    urls = tuple(config.control_api_bases)
    if len(urls) < 2:
        return None

    def look() -> None:
        try:
            checks = store_kinds(urls, timeout_ms=config.request_timeout_ms)
        except Exception as exc:  # a diagnostic must never take the daemon down
            runtime.log.debug("config.store_check_failed", error=f"{type(exc).__name__}: {exc}")
            return
        for warning in sqlite_warnings(checks):
            runtime.warnings.append(warning)
            runtime.log.warning("config.warning", message=warning)

    return gevent.spawn(look)
