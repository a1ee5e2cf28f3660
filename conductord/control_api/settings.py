"""Settings of `conductord control-api`, resolved by the node's machinery (config.SettingsTable).

Rows: `--listen HOST:PORT` (`BAA_CONTROL_API_LISTEN`), `--db PATH|postgresql://…`
(`BAA_CONTROL_API_DB`), the node's own rows for `--shared-token` / `--shared-token-file` and
`--log-level`, `--max-waiters N` (`BAA_CONTROL_API_MAX_WAITERS`, SPEC §12) and `--no-long-poll`
(`BAA_CONTROL_API_LONG_POLL=0`). Same rules as the node: default < environment < flag, an empty
or blank value counts as unset, every problem reported at once naming the flag and the
variable (`ConfigError`; the command exits 2), the token never echoed.

Cross-setting rule: a non-loopback `--listen` needs a shared token. The usage text of
`control-api --help` is built from the rows too.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from marshmallow import Schema, ValidationError, fields, post_load, validates_schema

from conductord.argparsing import ArgumentParser
from conductord.config import (
    SETTINGS_BY_NAME,
    BoolField,
    IntField,
    Setting,
    SettingsTable,
    TextField,
    is_loopback_host,
    token_warnings,
)
from conductord.control_api.waiters import DEFAULT_MAX_WAITERS

__all__ = [
    "SERVER_SETTINGS",
    "ServerSettings",
    "parse_args",
    "parse_listen",
    "resolve_settings",
    "settings_warnings",
    "usage_text",
]


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); raises ValueError."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(text)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(text)
    if not host or not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(text)
    return host, int(port_text)


class _Listen(fields.Field):
    """`HOST:PORT` or `[IPv6]:PORT`; loads as (host, port)."""

    rule = "HOST:PORT or [IPv6]:PORT with a port 0-65535 (0: any free port)"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        try:
            return parse_listen(str(value))
        except ValueError:
            raise ValidationError(
                f'must be HOST:PORT with a port 0-65535 (got "{value}")'
            ) from None


def _node_row(name: str, **changes: Any) -> Setting:
    """One of the node's rows (same flag, variable and field), with server-specific text."""
    return dataclasses.replace(SETTINGS_BY_NAME[name], **changes)


_ROWS: Final[tuple[Setting, ...]] = (
    Setting(
        "listen",
        "--listen",
        "BAA_CONTROL_API_LISTEN",
        _Listen(),
        "127.0.0.1:8787",
        "address to serve on; a non-loopback one needs a shared token",
        "HOST:PORT",
    ),
    Setting(
        "db",
        "--db",
        "BAA_CONTROL_API_DB",
        TextField("path or postgresql:// URL"),
        "./conductord-control.sqlite3",
        "SQLite file (WAL), or postgresql://USER@HOST:PORT/DB (needs conductord[postgres];"
        " keep the password in PGPASSWORD or ~/.pgpass, not in argv)",
        "PATH",
    ),
    _node_row("shared_token", help="bearer token clients must send (a flag shows in ps)"),
    _node_row("shared_token_file"),
    _node_row("log_level"),
    Setting(
        "max_waiters",
        "--max-waiters",
        "BAA_CONTROL_API_MAX_WAITERS",
        IntField(1),
        DEFAULT_MAX_WAITERS,
        "parked wait_ms acquires at once; 429 past it",
        "N",
    ),
    Setting(
        "long_poll",
        "--no-long-poll",
        "BAA_CONTROL_API_LONG_POLL",
        BoolField(),
        True,
        "park wait_ms acquires until the lease frees (long-poll); the flag, or 0, answers at once",
        None,
        "the variable takes 1/0, true/false, yes/no, on/off",
    ),
)

_DEFAULTS: Final[Mapping[str, Any]] = {row.name: row.default for row in _ROWS}


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    db: str
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    log_level: str = _DEFAULTS["log_level"]
    max_waiters: int = _DEFAULTS["max_waiters"]
    long_poll: bool = _DEFAULTS["long_poll"]

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)


class _ServerRules(Schema):
    @validates_schema(skip_on_field_errors=True)
    def _token_beyond_loopback(self, data: dict[str, Any], **_kwargs: Any) -> None:
        host, _port = data["listen"]
        # A token file that could not be read is reported already; do not add "no token".
        if "shared_token" in data or "shared_token_file" in data or is_loopback_host(host):
            return
        raise ValidationError(
            f"refusing to listen on non-loopback address {host} without a shared token"
            " (--shared-token-file / BAA_SHARED_TOKEN_FILE or --shared-token / BAA_SHARED_TOKEN)"
        )

    @post_load
    def _build(self, data: dict[str, Any], **_kwargs: Any) -> ServerSettings:
        host, port = data["listen"]
        return ServerSettings(
            host,
            port,
            data["db"],
            data.get("shared_token"),
            data.get("shared_token_file"),
            data["log_level"],
            max_waiters=data["max_waiters"],
            long_poll=data["long_poll"],
        )


SERVER_SETTINGS: Final = SettingsTable(_ROWS, _ServerRules)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`control-api` options (plus `-h/--help`); raises `UsageError`."""
    parser = ArgumentParser(prog="conductord control-api")
    parser.add_argument("-h", "--help", action="store_true")
    SERVER_SETTINGS.add_arguments(parser)
    return parser.parse_args(list(argv))


def resolve_settings(
    args: argparse.Namespace | Mapping[str, object], env: Mapping[str, str]
) -> ServerSettings:
    """Merge default < env < flags and validate; raises `ConfigError` with every problem.

    `args` is what `parse_args` returned, or a mapping of setting name to raw flag value.
    """
    flags = args if isinstance(args, Mapping) else SERVER_SETTINGS.flags(args)
    return SERVER_SETTINGS.resolve(flags, env)


def settings_warnings(settings: ServerSettings) -> list[str]:
    return token_warnings(
        settings.token,
        settings.token_file,
        without_token="the Control API accepts unauthenticated requests",
    )


def usage_text() -> str:
    """`conductord control-api --help`."""
    usage = SERVER_SETTINGS.usage_lines("control-api")
    return "\n".join(
        [
            *usage,
            "",
            "Run the reference Control API (SQLite, or PostgreSQL for several processes).",
            "Precedence: default < environment < flag; an empty or blank value counts as unset.",
            *SERVER_SETTINGS.help_lines(),
            "",
            "Without a token the server accepts any request, and it refuses a non-loopback"
            " --listen.",
            "SIGTERM or SIGINT stops it (exit 0); a configuration error exits 2.",
        ]
    )
