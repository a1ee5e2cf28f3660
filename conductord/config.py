"""Settings of a conductord node: one table, resolution from flags and environment, validation.

Design:
- A `Setting` row carries everything about one setting: its name, flag, environment variable,
  the marshmallow field that parses and checks a value, the typed default and the help text.
  `SETTINGS` is the node's table. The command line parser (`SettingsTable.add_arguments`),
  `conductord help` (`help_lines`), the README table (`markdown`), every problem line (`label`),
  `config --json` (`Config.public_dict`) and the `Config` dataclass's own defaults
  (`default_of`) are derived from the rows, so a default or a flag is written once.
- `SettingsTable.resolve(flags, env)` layers default < environment < flag (an empty or blank
  value counts as unset; every value is stripped) and loads the result through one marshmallow
  schema built from the rows (`Schema.from_dict`) plus the table's cross-setting rules. Every
  problem is collected and raised together as one `ConfigError`, one line per problem, each
  naming the flag and the variable. Timing rules that would let the lease expire before the
  leader notices, or a leader-only child outlive its lease, are errors checked here, before any
  greenlet starts (as client-go's leader election checks its own up front).
- The reference Control API's table (control_api/settings.py) is built the same way and shares
  rows with this one (the shared token, its file, the log level).
- `--scheduler` and `--hooks` are imported during resolution (plugins.py), so `config` finds a
  missing module or attribute just as `start` would.
- `config_warnings(config)` lists what is legal but risky (SPEC §3 warnings).

Secrets: the shared token is a `repr=False` field, `public_dict()` masks it, no error message
ever quotes it, and every problem line is redacted of it (with any piece of it of 8 characters
or more, `conductord.redact`) as a last line of defence. `--exec`
arguments may hold secrets too: no problem line quotes the command, and `public_dict()` shows
only the program (argv[0]), as the snapshot does.

Limits: `Config` can also be built directly (tests do); that bypasses validation. The token
file is read once, at resolution; rotating the token needs a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import stat
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from conductord import __version__
from conductord.lease import default_margin_s
from conductord.plugins import PluginError, load_hooks, load_scheduler
from conductord.redact import clean

__all__ = [
    "EXEC_KILL_SLACK_MS",
    "LOG_LEVELS",
    "PLACEHOLDER_TOKEN",
    "ROLES",
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "BoolField",
    "ByRole",
    "ChoiceField",
    "Config",
    "ConfigError",
    "IntField",
    "Paths",
    "Setting",
    "SettingsTable",
    "TextField",
    "config_warnings",
    "default_of",
    "given",
    "is_loopback_host",
    "parse_bool",
    "resolve_config",
    "resolve_shared_token",
    "token_warnings",
    "validate_local_api",
]

ROLES: Final = ("primary", "standby")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
PLACEHOLDER_TOKEN: Final = "replace-me"
# SPEC §14: a child stopped at the local deadline needs this much on top of its stop grace to be
# gone (SIGKILL delivered, the group reaped) before the server could hand the lease on.
EXEC_KILL_SLACK_MS: Final = 250

# Upper bounds keep timers and database columns sane; the SPEC only fixes the lower bounds.
_MAX_MS: Final = 86_400_000  # one day
_MAX_SEC: Final = 86_400
_MAX_PRIORITY: Final = 2**31 - 1


class ConfigError(Exception):
    """Invalid configuration. `problems` holds one full line per problem, without a prefix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _quote(value: object) -> str:
    return '"' + str(value).replace('"', '\\"') + '"'


def _or_list(choices: Iterable[str]) -> str:
    quoted = [_quote(c) for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _shown(value: object) -> str:
    """A typed value as help and the README show it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------
# The rows


@dataclass(frozen=True)
class ByRole:
    """A default that depends on the resolved role."""

    primary: Any
    standby: Any

    def pick(self, role: str) -> Any:
        return self.primary if role == "primary" else self.standby

    def __str__(self) -> str:
        return f"{_shown(self.primary)} (primary), {_shown(self.standby)} (standby)"


@dataclass(frozen=True)
class Setting:
    """One row of a settings table.

    `field` parses and checks a raw value (a stripped string, or a bool from a switch); its
    `attribute`, when set, is the name the value gets in the loaded result. `default` is the
    typed built-in default (None: no default; a `ByRole`: picked after the role is known).
    `metavar` None marks a switch: `--flag` / `--no-flag`, or a single `--no-flag` that sets
    False. `rule` (what a valid value looks like) defaults to the field's own `rule`;
    `shown_default` replaces the default's text where the value is not fixed (the version).
    """

    name: str
    flag: str
    env: str
    field: fields.Field
    default: Any = None
    help: str = ""
    metavar: str | None = "VALUE"
    rule: str = ""
    shown_default: str = ""  # how help shows a default that is not a fixed value

    def __post_init__(self) -> None:
        if not self.rule:
            object.__setattr__(self, "rule", getattr(self.field, "rule", ""))

    @property
    def label(self) -> str:
        """How problems name the setting: `--role / BAA_CONDUCTOR_ROLE`."""
        return f"{self.flag} / {self.env}"

    @property
    def attribute(self) -> str:
        """The name of the loaded value (a `Config` field for the node's table)."""
        return self.field.attribute or self.name

    @property
    def switches(self) -> tuple[tuple[str, bool], ...]:
        """(flag, value) of a switch's flags; empty for a setting that takes a value."""
        if self.metavar is not None:
            return ()
        if self.flag.startswith("--no-"):
            return ((self.flag, False),)
        return ((self.flag, True), ("--no-" + self.flag.removeprefix("--"), False))

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(flag for flag, _ in self.switches) or (self.flag,)

    @property
    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.field.required:
            return "required"
        if self.default is None:
            return "none"
        return _shown(self.default)

    def usage(self) -> str:
        """`--flag METAVAR`, or `--flag | --no-flag` for a switch."""
        return " | ".join(self.flags) if self.metavar is None else f"{self.flag} {self.metavar}"


# ---------------------------------------------------------------------------------------------
# Fields: one per kind of value; messages are completed by the label. `rule` says what is valid.


_DIGITS = re.compile(r"[+-]?[0-9]+", re.ASCII)
_BELOW_MINIMUM: Final = 'must be an integer >= {min} (got "{input}")'
_ABOVE_MAXIMUM: Final = 'must be at most {max} (got "{input}")'


class IntField(fields.Field):
    """An integer written in ASCII digits (no `1_000`, no `5.0`), within bounds."""

    def __init__(self, minimum: int, maximum: int | None = None, **kwargs: Any) -> None:
        bounds = [validate.Range(min=minimum, error=_BELOW_MINIMUM)]
        if maximum is not None:
            bounds.append(validate.Range(max=maximum, error=_ABOVE_MAXIMUM))
        super().__init__(validate=bounds, **kwargs)
        self.minimum = minimum
        self.rule = f"integer >= {minimum}"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        text = str(value)
        # The length cap keeps int() away from its digit limit (ValueError past 4300 digits).
        if len(text) <= 40 and _DIGITS.fullmatch(text):
            return int(text)
        raise ValidationError(_BELOW_MINIMUM.format(min=self.minimum, input=value))


class ChoiceField(fields.String):
    """One of a few words, case-insensitive, normalized to lower case."""

    def __init__(self, choices: tuple[str, ...], **kwargs: Any) -> None:
        error = f'must be {_or_list(choices)} (got "{{input}}")'
        super().__init__(validate=validate.OneOf(choices, error=error), **kwargs)
        self.rule = _or_list(choices).replace('"', "")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return super()._deserialize(value, attr, data, **kwargs).lower()


class TextField(fields.String):
    """Free text (a name, a path); blank values never get here."""

    def __init__(self, rule: str = "non-empty", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rule


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool | None:
    """1/0, true/false, yes/no, on/off (any case) as a bool; None when `text` is none of them."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


class BoolField(fields.Field):
    rule = "1/0, true/false, yes/no, on/off"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        parsed = parse_bool(str(value))
        if parsed is None:
            raise ValidationError(f"must be one of {self.rule} (got {_quote(value)})")
        return parsed


def _shown_url(value: str) -> str:
    # A URL with user:password@ carries a secret; never echo it.
    return "a URL with credentials" if "@" in value else _quote(value)


def _http_url(text: str) -> str:
    """An http(s) base URL; a path prefix is allowed, trailing slashes are removed."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValidationError(f"must be an http(s) URL (got {_shown_url(text)})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValidationError(
            f"must be an http(s) URL such as https://control.example.test (got {_shown_url(text)})"
        )
    if "@" in parts.netloc:
        raise ValidationError("must not carry credentials; use --shared-token-file")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValidationError(f"must not have a query or fragment (got {_shown_url(text)})")
    return text.rstrip("/")


def _endpoint(url: str) -> tuple[str, str, int, str]:
    """What makes two base URLs the same endpoint: case-blind scheme and host, default port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


class _HttpUrlList(fields.Field):
    """Comma-separated Control API base URLs (SPEC §17), each checked, none twice.

    Loads as a tuple. With one URL the messages are those of a single URL; with several each
    message says which entry it is about.
    """

    rule = (
        "comma-separated http(s) URLs without credentials, query or fragment, each once;"
        " trailing / removed"
    )

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        entries = list(value) if isinstance(value, list | tuple) else str(value).split(",")
        urls: list[str] = []
        problems: list[str] = []
        seen: dict[tuple[str, str, int, str], int] = {}
        for number, entry in enumerate(entries, 1):
            where = "" if len(entries) == 1 else f"entry {number} "
            text = str(entry).strip()
            if not text:
                problems.append(f"{where}is empty: give comma-separated http(s) URLs")
                continue
            try:
                url = _http_url(text)
            except ValidationError as err:
                problems.extend(where + str(message) for message in _messages(err))
                continue
            key = _endpoint(url)
            if key in seen:
                problems.append(
                    f"lists {_shown_url(url)} twice (entries {seen[key]} and {number});"
                    " give each Control API URL once"
                )
                continue
            seen[key] = number
            urls.append(url)
        if problems:
            raise ValidationError(problems)
        return tuple(urls)


def _messages(err: ValidationError) -> list[str]:
    messages = err.messages
    return [str(m) for m in messages] if isinstance(messages, list) else [str(messages)]


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (brackets allowed)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _LoopbackUrl(fields.Field):
    """`http://HOST:PORT` with a loopback host: the status endpoint never leaves the machine."""

    rule = "http://HOST:PORT with a loopback host (127.0.0.0/8, ::1, localhost) and a port"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValidationError(
                f"must be http://HOST:PORT with a valid port (got {_shown_url(text)})"
            ) from None
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValidationError(
                f"must be an http:// URL such as http://127.0.0.1:4317 (got {_shown_url(text)})"
            )
        if "@" in parts.netloc:
            raise ValidationError("must not carry credentials")
        if not is_loopback_host(parts.hostname):
            raise ValidationError(
                "must use a loopback host (127.0.0.0/8, ::1 or localhost); the status"
                f" endpoint is never exposed beyond this machine (got {_quote(text)})"
            )
        if port is None or port == 0:
            raise ValidationError(
                f"must name an explicit port, e.g. http://127.0.0.1:4317 (got {_quote(text)})"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text:
            raise ValidationError(f"must not have a path, query or fragment (got {_quote(text)})")
        return text.rstrip("/")


class _Token(fields.Field):
    """A bearer token; messages never quote it."""

    rule = "printable ASCII without spaces"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value)
        # It goes into an HTTP header: whitespace, control or non-ASCII characters would make
        # requests fail later with an error that quotes the header value.
        if not all("!" <= ch <= "~" for ch in text):
            raise ValidationError("must be printable ASCII without spaces (the value is not shown)")
        return text


class _Command(fields.Field):
    """A command line split with `shlex` (POSIX rules, no shell); loads as an argv tuple.

    Messages never quote the command: its arguments may hold secrets.
    """

    rule = "a command line, split like a POSIX shell would (no shell unless it says sh -c)"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        if isinstance(value, list | tuple):
            argv = tuple(str(part) for part in value)
        else:
            try:
                argv = tuple(shlex.split(str(value)))
            except ValueError as err:
                raise ValidationError(
                    f"cannot be split into a command line ({str(err).lower()}); quote it as a"
                    " POSIX shell would (the command is not shown)"
                ) from None
        if not argv or not argv[0]:
            raise ValidationError("names no program to run")
        return argv


class _Plugin(fields.Field):
    """A plug-in reference, loaded (imported) to prove it works; loads as the text."""

    def __init__(self, loader: Callable[[str], object], rule: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loader = loader
        self.rule = rule

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value)
        try:
            self.loader(text)
        except PluginError as err:
            # A leading ":" makes the line read `--scheduler / BAA_…: cannot import "x": …`.
            raise ValidationError(f": {err}") from None
        return text


# ---------------------------------------------------------------------------------------------
# The table machinery, shared with the reference Control API's settings

_TOKEN_ROWS: Final = ("shared_token", "shared_token_file")


class SettingsTable:
    """Rows plus the schema that loads them: one place for parsing, help and resolution.

    `rules` is a marshmallow `Schema` subclass holding only hooks (`validates_schema` for the
    cross-setting rules, `post_load` building the result); the fields come from the rows.
    """

    def __init__(self, rows: Sequence[Setting], rules: type[Schema] = Schema) -> None:
        self.rows: tuple[Setting, ...] = tuple(rows)
        self.by_name: Mapping[str, Setting] = {row.name: row for row in self.rows}
        self._schema = rules.from_dict(
            {row.name: row.field for row in self.rows}, name=f"{rules.__name__}Loaded"
        )

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> Setting:
        return self.by_name[name]

    # -- the command line --

    def add_arguments(self, parser: Any) -> None:
        """One argparse option per row (a switch gets its flags, mutually exclusive)."""
        for row in self.rows:
            if row.metavar is None:
                group = parser.add_mutually_exclusive_group()
                for flag, value in row.switches:
                    group.add_argument(flag, dest=row.name, action="store_const", const=value)
            else:
                parser.add_argument(row.flag, dest=row.name, metavar=row.metavar)

    def flags(self, namespace: Any) -> dict[str, object]:
        """The raw flag values of a parsed namespace, keyed by setting name."""
        return {row.name: getattr(namespace, row.name, None) for row in self.rows}

    def usage_lines(self, command: str, *extra: str, width: int = 98) -> list[str]:
        """`usage: conductord COMMAND [--flag METAVAR] ...`, wrapped under the first option."""
        options = " ".join([*(f"[{row.usage()}]" for row in self.rows), *extra])
        return textwrap.wrap(
            f"usage: conductord {command} {options}",
            width=width,
            subsequent_indent=" " * len(f"usage: conductord {command} "),
            break_on_hyphens=False,
        )

    def help_lines(self, *, width: int = 98) -> list[str]:
        """Two-column help: `--flag METAVAR   VARIABLE`, then the text, rule and default."""
        lines: list[str] = []
        for row in self.rows:
            described = "; ".join(part for part in (row.help, row.rule) if part)
            lines.append(f"  {row.usage():<38} {row.env}")
            lines.extend(
                textwrap.wrap(
                    f"{described} (default: {row.default_text})",
                    width=width,
                    initial_indent="      ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                )
            )
        return lines

    def markdown(self) -> str:
        """The README's table of these settings."""
        lines = [
            "| setting | flag | environment | default | what, and the rule |",
            "|---|---|---|---|---|",
        ]
        for row in self.rows:
            flags = " / ".join(f"`{flag}`" for flag in row.flags)
            default = row.default_text
            if not (row.default is None or isinstance(row.default, ByRole) or row.shown_default):
                default = f"`{default}`"  # a value, not a description
            described = "; ".join(part for part in (row.help, row.rule) if part)
            lines.append(f"| {row.name} | {flags} | `{row.env}` | {default} | {described} |")
        return "\n".join(lines)

    # -- resolution --

    def given(self, name: str, flags: Mapping[str, object], env: Mapping[str, str]) -> Any:
        """The flag's value, else the variable's, stripped; None when neither is given."""
        value = given(flags.get(name))
        return value if value is not None else given(env.get(self.by_name[name].env))

    def resolve(self, flags: Mapping[str, object], env: Mapping[str, str]) -> Any:
        """Layer default < env < flags, load through the schema, return what `rules` builds.

        `flags` is keyed by setting name, values are raw strings (bool for a switch), None when
        not given. `env` is keyed by variable name. Raises `ConfigError` with every problem.
        """
        problems: list[str] = []
        secrets = [
            str(v).strip() for v in (flags.get("shared_token"), env.get("BAA_SHARED_TOKEN")) if v
        ]
        raw: dict[str, object] = {}
        for row in self.rows:
            if row.name in _TOKEN_ROWS:
                continue
            value = self.given(row.name, flags, env)
            if value is None and not isinstance(row.default, ByRole):
                value = row.default
            if value is not None:
                raw[row.name] = value
        if "shared_token" in self.by_name:
            token, token_path = resolve_shared_token(flags, env, problems)
            if token_path is not None:
                raw["shared_token_file"] = token_path
            if token is not None:
                secrets.append(token)
                raw["shared_token"] = token

        loaded: Any = None
        try:
            loaded = self._schema().load(raw)
        except ValidationError as err:
            problems.extend(self._problem_lines(err.messages))
        if problems:
            # Neither the token nor any piece of it of 8 characters or more (SPEC §3).
            raise ConfigError([clean(line, secrets) for line in problems])
        return loaded

    def _problem_lines(self, messages: Any) -> list[str]:
        lines: list[str] = []
        assert isinstance(messages, dict)
        for row in self.rows:
            for message in messages.get(row.name, ()):
                text = str(message)
                # A message about an operation on the value (importing a plug-in) starts with
                # ":"; one about the value itself ("must be …") follows the label after a space.
                lines.append(row.label + (text if text.startswith(":") else " " + text))
        lines.extend(str(message) for message in messages.get("_schema", ()))
        return lines


def given(value: object) -> Any:
    """A source value, stripped, with empty or blank counting as unset (None).

    Strings come back stripped; a bool (a `--flag` / `--no-flag` switch) and None pass as is.
    """
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------------------
# The node's table

_PATH_NAMES: Final = ("logs_dir", "runs_dir", "state_dir", "tmp_dir", "worktrees_dir")


def _directory(name: str, what: str) -> Setting:
    """`runs_dir` -> `--runs-dir` / `BAA_RUNS_DIR`."""
    flag = "--" + name.replace("_", "-")
    return Setting(
        name, flag, f"BAA_{name.upper()}", TextField("path"), None, f"directory of {what}", "PATH"
    )


_ROWS: Final[tuple[Setting, ...]] = (
    Setting(
        "node_id",
        "--node-id",
        "BAA_NODE_ID",
        TextField(),
        ByRole("{host}-main", "{host}-standby"),
        "controller id of this node, unique in the fleet",
        "ID",
    ),
    Setting(
        "host",
        "--host",
        "BAA_CONDUCTOR_HOST",
        TextField(),
        "localhost",
        "host name reported to the Control API",
        "HOST",
    ),
    Setting("role", "--role", "BAA_CONDUCTOR_ROLE", ChoiceField(ROLES), "primary", "", "ROLE"),
    Setting(
        "control_api_base",
        "--control-api-base",
        "BAA_CONTROL_API_BASE",
        _HttpUrlList(
            attribute="control_api_bases",
            required=True,
            error_messages={
                "required": "is required: the Control API base URL, e.g."
                " https://control.example.test"
            },
        ),
        None,
        "Control API base URL(s); several share one store and are used one at a time",
        "URL[,URL…]",
    ),
    Setting(
        "local_api_base",
        "--local-api",
        "BAA_CONDUCTOR_LOCAL_API",
        _LoopbackUrl(),
        None,
        "local status endpoint (/healthz, /readyz, /v1/status, /metrics)",
        "URL",
    ),
    Setting(
        "shared_token",
        "--shared-token",
        "BAA_SHARED_TOKEN",
        _Token(),
        None,
        "bearer token for the Control API (a flag shows in ps; prefer the token file)",
        "TOKEN",
    ),
    Setting(
        "shared_token_file",
        "--shared-token-file",
        "BAA_SHARED_TOKEN_FILE",
        TextField("readable, non-empty file; content stripped; keep it mode 600"),
        None,
        "file holding the bearer token",
        "PATH",
    ),
    Setting(
        "priority",
        "--priority",
        "BAA_CONDUCTOR_PRIORITY",
        IntField(0, _MAX_PRIORITY),
        ByRole(100, 50),
        "leader priority reported in heartbeats",
        "N",
    ),
    Setting(
        "controller_version",
        "--controller-version",
        "BAA_CONDUCTOR_VERSION",
        TextField("string"),
        __version__,
        "version reported in heartbeats",
        "VERSION",
        shown_default="conductord's own version",
    ),
    Setting(
        "preferred",
        "--preferred",
        "BAA_CONDUCTOR_PREFERRED",
        BoolField(),
        ByRole(True, False),
        "prefer this node as leader",
        None,
        "the variable takes 1/0, true/false, yes/no, on/off",
    ),
    Setting(
        "heartbeat_interval_ms",
        "--heartbeat-interval-ms",
        "BAA_CONDUCTOR_HEARTBEAT_INTERVAL_MS",
        IntField(1, _MAX_MS),
        5000,
        "milliseconds between heartbeats",
        "MS",
    ),
    Setting(
        "lease_renew_interval_ms",
        "--lease-renew-interval-ms",
        "BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS",
        IntField(1, _MAX_MS),
        5000,
        "milliseconds between lease cycles",
        "MS",
    ),
    Setting(
        "lease_ttl_sec",
        "--lease-ttl-sec",
        "BAA_CONDUCTOR_LEASE_TTL_SEC",
        IntField(1, _MAX_SEC),
        30,
        "lease time to live in seconds",
        "SEC",
    ),
    Setting(
        "renew_failure_threshold",
        "--renew-failure-threshold",
        "BAA_CONDUCTOR_RENEW_FAILURE_THRESHOLD",
        IntField(1),
        2,
        "failed lease cycles in a row before degraded",
        "N",
    ),
    Setting(
        "request_timeout_ms",
        "--request-timeout-ms",
        "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS",
        IntField(1, _MAX_MS),
        5000,
        "bound on every Control API call",
        "MS",
        "integer >= 1, below lease_ttl_sec × 1000",
    ),
    Setting(
        "exec_command",
        "--exec",
        "BAA_CONDUCTOR_EXEC",
        _Command(attribute="exec_argv"),
        None,
        "command run only while this node is leader, in its own process group",
        "CMD",
    ),
    Setting(
        "exec_every_ms",
        "--exec-every-ms",
        "BAA_CONDUCTOR_EXEC_EVERY_MS",
        IntField(1, _MAX_MS),
        None,
        "run --exec once every this many ms while leader instead of keeping it running",
        "MS",
    ),
    Setting(
        "exec_stop_grace_ms",
        "--exec-stop-grace-ms",
        "BAA_CONDUCTOR_EXEC_STOP_GRACE_MS",
        IntField(0, _MAX_MS),
        1000,
        "milliseconds from SIGTERM to SIGKILL when the --exec child must stop",
        "MS",
        f"integer >= 0; with --exec, + {EXEC_KILL_SLACK_MS} ms must fit in the step-down margin",
    ),
    Setting(
        "scheduler",
        "--scheduler",
        "BAA_CONDUCTOR_SCHEDULER",
        _Plugin(load_scheduler, "MODULE:CALLABLE, importable"),
        None,
        "Python callable run every --scheduler-interval-ms while leader",
        "MODULE:CALLABLE",
    ),
    Setting(
        "scheduler_interval_ms",
        "--scheduler-interval-ms",
        "BAA_CONDUCTOR_SCHEDULER_INTERVAL_MS",
        IntField(1, _MAX_MS),
        5000,
        "milliseconds between scheduler passes",
        "MS",
    ),
    Setting(
        "hooks",
        "--hooks",
        "BAA_CONDUCTOR_HOOKS",
        _Plugin(load_hooks, "MODULE, importable, defining at least one hook"),
        None,
        "Python module with load_runs(), reconcile_runs(), on_lease_state_change(snapshot)",
        "MODULE",
    ),
    _directory("runs_dir", "local runs"),
    _directory("worktrees_dir", "worktrees"),
    _directory("logs_dir", "logs"),
    _directory("tmp_dir", "scratch files"),
    _directory("state_dir", "state"),
    Setting(
        "log_level", "--log-level", "BAA_LOG_LEVEL", ChoiceField(LOG_LEVELS), "info", "", "LEVEL"
    ),
)

SETTINGS_BY_NAME: Final[Mapping[str, Setting]] = {row.name: row for row in _ROWS}


def default_of(name: str) -> Any:
    """The node table's typed default of `name` (the primary's, for a `ByRole` default)."""
    default = SETTINGS_BY_NAME[name].default
    return default.primary if isinstance(default, ByRole) else default


@dataclass(frozen=True, kw_only=True)
class Paths:
    logs_dir: str | None = None
    runs_dir: str | None = None
    state_dir: str | None = None
    tmp_dir: str | None = None
    worktrees_dir: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A resolved, validated configuration. Defaults come from `SETTINGS` (`default_of`).

    Built directly, give `control_api_bases` (a sequence of URLs, at least one);
    `control_api_base`, their comma-joined text, is derived from it.
    """

    node_id: str
    host: str = default_of("host")
    role: str = default_of("role")
    control_api_bases: tuple[str, ...]
    local_api_base: str | None = None
    shared_token: str | None = field(default=None, repr=False)
    shared_token_file: str | None = None
    priority: int = default_of("priority")
    controller_version: str = default_of("controller_version")
    preferred: bool = default_of("preferred")
    heartbeat_interval_ms: int = default_of("heartbeat_interval_ms")
    lease_renew_interval_ms: int = default_of("lease_renew_interval_ms")
    lease_ttl_sec: int = default_of("lease_ttl_sec")
    renew_failure_threshold: int = default_of("renew_failure_threshold")
    request_timeout_ms: int = default_of("request_timeout_ms")
    exec_argv: tuple[str, ...] | None = None  # --exec, split with shlex
    exec_every_ms: int | None = None
    exec_stop_grace_ms: int = default_of("exec_stop_grace_ms")
    scheduler: str | None = None  # MODULE:CALLABLE; plugins.load_plugins() loads it
    scheduler_interval_ms: int = default_of("scheduler_interval_ms")
    hooks: str | None = None  # MODULE
    paths: Paths = field(default_factory=Paths)
    log_level: str = default_of("log_level")
    # True when node_id was derived from the default host: neither the node id nor the host
    # was given, so every machine started this way gets the same id (see config_warnings).
    node_id_defaulted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.control_api_bases, str):  # its characters are no list of URLs
            raise TypeError("Config.control_api_bases is a sequence of URLs, not a string")
        object.__setattr__(self, "control_api_bases", tuple(self.control_api_bases))
        if not self.control_api_bases:
            raise TypeError("Config needs at least one URL in control_api_bases")
        if self.exec_argv is not None:
            object.__setattr__(self, "exec_argv", tuple(self.exec_argv))

    @property
    def control_api_base(self) -> str:
        """The URLs of `control_api_bases`, comma-joined (as `--control-api-base` takes them)."""
        return ",".join(self.control_api_bases)

    @property
    def has_shared_token(self) -> bool:
        return self.shared_token is not None

    @property
    def uses_placeholder_token(self) -> bool:
        return self.shared_token == PLACEHOLDER_TOKEN

    def public_dict(self) -> dict[str, Any]:
        """The `config --json` document: flat keys of the settings table, token masked.

        `control_api_base` is comma-joined and `control_api_bases` the list; `exec_command` is
        the program only (argv[0]): its arguments may hold secrets.
        """
        document: dict[str, Any] = {}
        for row in SETTINGS:
            if row.name == "control_api_base":
                document["control_api_base"] = self.control_api_base
                document["control_api_bases"] = list(self.control_api_bases)
            elif row.name == "exec_command":
                document["exec_command"] = self.exec_argv[0] if self.exec_argv else None
            elif row.name not in _PATH_NAMES:
                document[row.name] = getattr(self, row.attribute)
        document["shared_token"] = "***" if self.has_shared_token else None
        document["has_shared_token"] = self.has_shared_token
        document["uses_placeholder_token"] = self.uses_placeholder_token
        document["paths"] = self.paths.as_dict()
        return document


class _NodeRules(Schema):
    """The node's cross-setting rules and role defaults; fields come from `_ROWS`."""

    # Not skipped on field errors: every problem is reported at once, so check whenever both
    # values themselves are valid.
    @validates_schema(skip_on_field_errors=False)
    def _timeout_below_ttl(self, data: dict[str, Any], **_kwargs: Any) -> None:
        timeout_ms, ttl_sec = data.get("request_timeout_ms"), data.get("lease_ttl_sec")
        if timeout_ms is None or ttl_sec is None:
            return
        if timeout_ms >= ttl_sec * 1000:
            timeout, ttl = SETTINGS_BY_NAME["request_timeout_ms"], SETTINGS_BY_NAME["lease_ttl_sec"]
            raise ValidationError(
                f"{timeout.label} ({timeout_ms} ms) must be below {ttl.label} × 1000"
                f" ({ttl_sec * 1000} ms): a renewal that hangs could outlive the lease"
            )

    @validates_schema(skip_on_field_errors=False)
    def _exec_stop_fits_the_margin(self, data: dict[str, Any], **_kwargs: Any) -> None:
        # SPEC §14: a child stopped at the local deadline must be dead before the server's
        # expiry, which the step-down margin (§5) keeps ahead of the local deadline.
        grace_ms = data.get("exec_stop_grace_ms")
        renew_ms, ttl_sec = data.get("lease_renew_interval_ms"), data.get("lease_ttl_sec")
        if data.get("exec_argv") is None or None in (grace_ms, renew_ms, ttl_sec):
            return
        margin_ms = round(default_margin_s(renew_ms, ttl_sec) * 1000)
        if grace_ms + EXEC_KILL_SLACK_MS > margin_ms:
            grace, renew, ttl, command = (
                SETTINGS_BY_NAME[name]
                for name in (
                    "exec_stop_grace_ms",
                    "lease_renew_interval_ms",
                    "lease_ttl_sec",
                    "exec_command",
                )
            )
            raise ValidationError(
                f"{grace.label} ({grace_ms} ms) + {EXEC_KILL_SLACK_MS} ms must fit in the"
                f" step-down margin ({margin_ms} ms: one {renew.label}, at least 1 s, at most"
                f" half of {ttl.label}) when {command.label} is set, so that a child stopped at"
                " the local lease deadline is gone before the lease can pass to another node"
            )

    @post_load
    def _build(self, data: dict[str, Any], **_kwargs: Any) -> Config:
        role = data["role"]
        if "node_id" not in data:
            data["node_id"] = SETTINGS_BY_NAME["node_id"].default.pick(role).format(**data)
        for name in ("priority", "preferred"):
            if name not in data:
                data[name] = SETTINGS_BY_NAME[name].default.pick(role)
        paths = Paths(**{name: data.pop(name) for name in _PATH_NAMES if name in data})
        return Config(paths=paths, **data)


SETTINGS: Final = SettingsTable(_ROWS, _NodeRules)


# ---------------------------------------------------------------------------------------------
# Resolution


def _read_token_file(path: str, problems: list[str]) -> str | None:
    label = SETTINGS_BY_NAME["shared_token_file"].label
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except UnicodeDecodeError:
        problems.append(f"{label}: {_quote(path)} is not UTF-8 text")
        return None
    except OSError as err:
        problems.append(f"{label}: cannot read {_quote(path)}: {err.strerror or err}")
        return None
    if not token:
        problems.append(f"{label}: {_quote(path)} is empty")
        return None
    return token


def _token_source(
    flags: Mapping[str, object], env: Mapping[str, str], problems: list[str]
) -> tuple[str | None, str | None]:
    """(token, token file path): a flag of either kind beats a variable of either kind."""
    token_setting = SETTINGS_BY_NAME["shared_token"]
    file_setting = SETTINGS_BY_NAME["shared_token_file"]
    levels = (
        (flags.get("shared_token"), flags.get("shared_token_file"), "flags"),
        (env.get(token_setting.env), env.get(file_setting.env), "variables"),
    )
    for raw_token, raw_path, kind in levels:
        token, path = given(raw_token), given(raw_path)
        if token is not None and path is not None:
            if kind == "flags":
                names = f"{token_setting.flag} and {file_setting.flag}"
            else:
                names = f"{token_setting.env} and {file_setting.env}"
            problems.append(f"{names} are mutually exclusive: give only one")
            return None, None
        if token is not None or path is not None:
            return (str(token) if token is not None else None), (
                str(path) if path is not None else None
            )
    return None, None


def resolve_shared_token(
    flags: Mapping[str, object], env: Mapping[str, str], problems: list[str]
) -> tuple[str | None, str | None]:
    """(token, token file path) from `--shared-token[-file]` / `BAA_SHARED_TOKEN[_FILE]`.

    Shared by the node and the reference Control API. Problems (both kinds given, an
    unreadable or empty file) are appended to `problems`; none of them quotes the token.
    """
    token, token_path = _token_source(flags, env, problems)
    if token_path is not None:
        token = _read_token_file(token_path, problems)
    return token, token_path


def validate_local_api(url: str) -> str:
    """`url` as a local API base (`http://HOST:PORT`, loopback host), trailing / removed.

    Raises ValueError with the problem line `resolve_config` would give, naming the setting.
    """
    try:
        return _LoopbackUrl().deserialize(url)
    except ValidationError as err:
        label = SETTINGS_BY_NAME["local_api_base"].label
        raise ValueError(f"{label} {_messages(err)[0]}") from None


def resolve_config(flags: Mapping[str, object], env: Mapping[str, str]) -> Config:
    """Merge default < env < flags, validate, and return the `Config` or raise `ConfigError`.

    `flags` is keyed by setting name, values are raw strings (bool for `preferred`), None when
    not given. `env` is keyed by variable name. Imports `--scheduler` and `--hooks`.
    """
    config: Config = SETTINGS.resolve(flags, env)
    if SETTINGS.given("node_id", flags, env) is None and SETTINGS.given("host", flags, env) is None:
        config = dataclasses.replace(config, node_id_defaulted=True)
    return config


# ---------------------------------------------------------------------------------------------
# Warnings


def token_warnings(token: str | None, token_file: str | None, *, without_token: str) -> list[str]:
    """The shared token's warnings: none or the placeholder, a token file open to others.

    `without_token` completes the no-token sentence: what that means for the caller (a node's
    calls fail, the reference Control API accepts anyone). Stats `token_file`, if any.
    """
    warnings: list[str] = []
    if not token:
        warnings.append(
            "no shared token (--shared-token-file / BAA_SHARED_TOKEN_FILE or --shared-token /"
            f" BAA_SHARED_TOKEN); {without_token}"
        )
    elif token == PLACEHOLDER_TOKEN:
        warnings.append(
            f"the shared token is still the placeholder {PLACEHOLDER_TOKEN};"
            " replace it before production rollout"
        )
    if token_file is not None:
        try:
            mode = stat.S_IMODE(os.stat(token_file).st_mode)
        except OSError:
            mode = 0
        if mode & 0o077:
            warnings.append(
                f"the shared token file {_quote(token_file)} is accessible by"
                f" group or others (mode {mode:04o}); run chmod 600 on it"
            )
    return warnings


def config_warnings(config: Config) -> list[str]:
    """What is legal but risky, one sentence each (SPEC §3). Stats the token file, if any."""
    warnings = token_warnings(
        config.shared_token,
        config.shared_token_file,
        without_token="authenticated Control API requests will fail",
    )
    ttl_ms = config.lease_ttl_sec * 1000
    control_apis = [urlsplit(url) for url in config.control_api_bases]
    all_local = all(is_loopback_host(parts.hostname or "") for parts in control_apis)
    if config.node_id_defaulted and not all_local:
        node_id, host = SETTINGS_BY_NAME["node_id"], SETTINGS_BY_NAME["host"]
        warnings.append(
            f"node id defaults to {config.node_id}: set {node_id.label} (or {host.label}) to a"
            " name unique in the fleet; two nodes with one id share one lease"
        )
    if config.local_api_base is None:
        warnings.append(
            "no local API (--local-api / BAA_CONDUCTOR_LOCAL_API); /healthz, /readyz,"
            " /v1/status and /metrics are not served"
        )
    if config.lease_renew_interval_ms >= ttl_ms:
        warnings.append(
            f"the lease renew interval ({config.lease_renew_interval_ms} ms) is >= the lease"
            f" TTL ({ttl_ms} ms); leader renewals may race with lease expiry"
        )
    budget_ms = config.lease_renew_interval_ms * config.renew_failure_threshold
    if config.lease_renew_interval_ms < ttl_ms <= budget_ms:  # not already implied above
        warnings.append(
            f"the lease renew interval × renew failure threshold ({budget_ms} ms) is >= the"
            f" lease TTL ({ttl_ms} ms); the leader steps down by time before the failure"
            " count is reached"
        )
    if config.has_shared_token:
        for parts in control_apis:
            if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname or ""):
                warnings.append(
                    f"the shared token is sent over plain http:// to the non-loopback host"
                    f" {parts.hostname}; use https://"
                )
    if config.exec_every_ms is not None and config.exec_argv is None:
        every, command = SETTINGS_BY_NAME["exec_every_ms"], SETTINGS_BY_NAME["exec_command"]
        warnings.append(f"{every.label} has no effect without {command.label}")
    return warnings
