"""Settings of a conductord node: the table, resolution from flags and environment, validation.

Design:
- `SETTINGS` is the one table of every setting (name, flag, environment variable, default text,
  help). The command line parser, `conductord help` and the error messages are all built from
  it, so a setting is never described twice.
- `resolve_config(flags, env)` merges the sources with precedence built-in default <
  environment < flag. Empty or blank values count as unset. Every value is stripped.
- Validation is one marshmallow schema. All problems are collected and raised together as one
  `ConfigError`, one line per problem, each naming the flag and the variable. Timing rules that
  would let the lease expire before the leader notices are errors, checked here, before any
  greenlet starts (as client-go's leader election checks its own up front).
- `config_warnings(config)` lists what is legal but risky (SPEC §3 warnings).
- Small pieces shared with the reference Control API's settings and with `conductord status`:
  `given` (blank counts as unset), `parse_bool`, `scrub`, `token_warnings` and
  `validate_local_api`, so each rule and each message exists once.

Secrets: the shared token is a `repr=False` field, `public_dict()` masks it, no error message
ever quotes it, and every problem line is scrubbed of it as a last line of defence.

Limits: `Config` can also be built directly (tests do); that bypasses validation. The token
file is read once, at resolution; rotating the token needs a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError, fields, post_load, validates_schema

from conductord import __version__

__all__ = [
    "LOG_LEVELS",
    "PLACEHOLDER_TOKEN",
    "ROLES",
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "Config",
    "ConfigError",
    "Paths",
    "Setting",
    "config_warnings",
    "given",
    "is_loopback_host",
    "parse_bool",
    "resolve_config",
    "resolve_shared_token",
    "scrub",
    "token_warnings",
    "validate_local_api",
]

ROLES: Final = ("primary", "standby")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
PLACEHOLDER_TOKEN: Final = "replace-me"

# Upper bounds keep timers and database columns sane; the SPEC only fixes the lower bounds.
_MAX_MS: Final = 86_400_000  # one day
_MAX_SEC: Final = 86_400
_MAX_PRIORITY: Final = 2**31 - 1


@dataclass(frozen=True)
class Setting:
    """One row of the settings table. `metavar` None marks a `--flag` / `--no-flag` switch."""

    name: str
    flag: str
    env: str
    default: str
    help: str
    metavar: str | None = "VALUE"

    @property
    def label(self) -> str:
        """How problems name the setting: `--role / BAA_CONDUCTOR_ROLE`."""
        return f"{self.flag} / {self.env}"

    @property
    def flags(self) -> tuple[str, ...]:
        if self.metavar is None:
            return (self.flag, "--no-" + self.flag.removeprefix("--"))
        return (self.flag,)


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "node_id",
        "--node-id",
        "BAA_NODE_ID",
        "{host}-main (primary), {host}-standby (standby)",
        "controller id of this node",
        "ID",
    ),
    Setting(
        "host",
        "--host",
        "BAA_CONDUCTOR_HOST",
        "localhost",
        "host name reported to the Control API",
        "HOST",
    ),
    Setting("role", "--role", "BAA_CONDUCTOR_ROLE", "primary", "primary or standby", "ROLE"),
    Setting(
        "control_api_base",
        "--control-api-base",
        "BAA_CONTROL_API_BASE",
        "required",
        "Control API base URL, http(s); a trailing / is removed",
        "URL",
    ),
    Setting(
        "local_api_base",
        "--local-api",
        "BAA_CONDUCTOR_LOCAL_API",
        "none",
        "local status endpoint, http://HOST:PORT on a loopback host (127.0.0.0/8, ::1, localhost)",
        "URL",
    ),
    Setting(
        "shared_token",
        "--shared-token",
        "BAA_SHARED_TOKEN",
        "none",
        "bearer token for the Control API (a flag shows in ps; prefer the token file)",
        "TOKEN",
    ),
    Setting(
        "shared_token_file",
        "--shared-token-file",
        "BAA_SHARED_TOKEN_FILE",
        "none",
        "file holding the bearer token (content stripped; keep it mode 600)",
        "PATH",
    ),
    Setting(
        "priority",
        "--priority",
        "BAA_CONDUCTOR_PRIORITY",
        "100 (primary), 50 (standby)",
        "integer >= 0",
        "N",
    ),
    Setting(
        "controller_version",
        "--controller-version",
        "BAA_CONDUCTOR_VERSION",
        f"{__version__} (conductord's own version)",
        "version reported in heartbeats",
        "VERSION",
    ),
    Setting(
        "preferred",
        "--preferred",
        "BAA_CONDUCTOR_PREFERRED",
        "true (primary), false (standby)",
        "prefer this node as leader; the variable takes 1/0, true/false, yes/no, on/off",
        None,
    ),
    Setting(
        "heartbeat_interval_ms",
        "--heartbeat-interval-ms",
        "BAA_CONDUCTOR_HEARTBEAT_INTERVAL_MS",
        "5000",
        "milliseconds between heartbeats, integer >= 1",
        "MS",
    ),
    Setting(
        "lease_renew_interval_ms",
        "--lease-renew-interval-ms",
        "BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS",
        "5000",
        "milliseconds between lease cycles, integer >= 1",
        "MS",
    ),
    Setting(
        "lease_ttl_sec",
        "--lease-ttl-sec",
        "BAA_CONDUCTOR_LEASE_TTL_SEC",
        "30",
        "lease time to live in seconds, integer >= 1",
        "SEC",
    ),
    Setting(
        "renew_failure_threshold",
        "--renew-failure-threshold",
        "BAA_CONDUCTOR_RENEW_FAILURE_THRESHOLD",
        "2",
        "failed lease cycles in a row before degraded, integer >= 1",
        "N",
    ),
    Setting(
        "request_timeout_ms",
        "--request-timeout-ms",
        "BAA_CONDUCTOR_REQUEST_TIMEOUT_MS",
        "5000",
        "bound on every Control API call, integer >= 1, below lease TTL × 1000",
        "MS",
    ),
    Setting("runs_dir", "--runs-dir", "BAA_RUNS_DIR", "none", "directory of local runs", "PATH"),
    Setting(
        "worktrees_dir",
        "--worktrees-dir",
        "BAA_WORKTREES_DIR",
        "none",
        "directory of worktrees",
        "PATH",
    ),
    Setting("logs_dir", "--logs-dir", "BAA_LOGS_DIR", "none", "directory of logs", "PATH"),
    Setting("tmp_dir", "--tmp-dir", "BAA_TMP_DIR", "none", "directory for scratch files", "PATH"),
    Setting("state_dir", "--state-dir", "BAA_STATE_DIR", "none", "directory of state", "PATH"),
    Setting(
        "log_level",
        "--log-level",
        "BAA_LOG_LEVEL",
        "info",
        "debug, info, warning or error",
        "LEVEL",
    ),
)

SETTINGS_BY_NAME: Final[Mapping[str, Setting]] = {s.name: s for s in SETTINGS}

_PATH_NAMES: Final = ("logs_dir", "runs_dir", "state_dir", "tmp_dir", "worktrees_dir")


class ConfigError(Exception):
    """Invalid configuration. `problems` holds one full line per problem, without a prefix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


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
    """A resolved, validated configuration. Defaults mirror `SETTINGS` for direct construction."""

    node_id: str
    host: str = "localhost"
    role: str = "primary"
    control_api_base: str
    local_api_base: str | None = None
    shared_token: str | None = field(default=None, repr=False)
    shared_token_file: str | None = None
    priority: int = 100
    controller_version: str = __version__
    preferred: bool = True
    heartbeat_interval_ms: int = 5000
    lease_renew_interval_ms: int = 5000
    lease_ttl_sec: int = 30
    renew_failure_threshold: int = 2
    request_timeout_ms: int = 5000
    paths: Paths = field(default_factory=Paths)
    log_level: str = "info"
    # True when node_id was derived from the default host: neither the node id nor the host
    # was given, so every machine started this way gets the same id (see config_warnings).
    node_id_defaulted: bool = False

    @property
    def has_shared_token(self) -> bool:
        return self.shared_token is not None

    @property
    def uses_placeholder_token(self) -> bool:
        return self.shared_token == PLACEHOLDER_TOKEN

    def public_dict(self) -> dict[str, Any]:
        """The `config --json` document: flat keys of the settings table, token masked."""
        document: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.name in _PATH_NAMES:
                continue
            document[setting.name] = getattr(self, setting.name)
        document["shared_token"] = "***" if self.has_shared_token else None
        document["has_shared_token"] = self.has_shared_token
        document["uses_placeholder_token"] = self.uses_placeholder_token
        document["paths"] = self.paths.as_dict()
        return document


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (brackets allowed)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Validation: one marshmallow field per kind of value; messages are completed by the label.


def _quote(value: object) -> str:
    return '"' + str(value).replace('"', '\\"') + '"'


def _or_list(choices: Iterable[str]) -> str:
    quoted = [_quote(c) for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


class _Choice(fields.Field):
    """One of a few words, case-insensitive, normalized to lower case."""

    def __init__(self, choices: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choices = choices

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value).lower()
        if text not in self.choices:
            raise ValidationError(f"must be {_or_list(self.choices)} (got {_quote(value)})")
        return text


_DIGITS = re.compile(r"[+-]?[0-9]+", re.ASCII)


class _Int(fields.Field):
    """An integer written in ASCII digits (no `1_000`, no `5.0`), within bounds."""

    def __init__(self, minimum: int, maximum: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        text = str(value)
        # The length cap keeps int() away from its digit limit (ValueError past 4300 digits).
        number = int(text) if len(text) <= 40 and _DIGITS.fullmatch(text) else None
        if number is None or number < self.minimum:
            raise ValidationError(f"must be an integer >= {self.minimum} (got {_quote(value)})")
        if self.maximum is not None and number > self.maximum:
            raise ValidationError(f"must be at most {self.maximum} (got {_quote(value)})")
        return number


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


class _Bool(fields.Field):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        parsed = parse_bool(str(value))
        if parsed is None:
            raise ValidationError(
                f"must be one of 1/0, true/false, yes/no, on/off (got {_quote(value)})"
            )
        return parsed


def _shown_url(value: str) -> str:
    # A URL with user:password@ carries a secret; never echo it.
    return "a URL with credentials" if "@" in value else _quote(value)


class _HttpUrl(fields.Field):
    """An http(s) base URL; a path prefix is allowed, trailing slashes are removed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValidationError(f"must be an http(s) URL (got {_shown_url(text)})") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValidationError(
                f"must be an http(s) URL such as https://control.example.test"
                f" (got {_shown_url(text)})"
            )
        if "@" in parts.netloc:
            raise ValidationError("must not carry credentials; use --shared-token-file")
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise ValidationError(f"must not have a query or fragment (got {_shown_url(text)})")
        return text.rstrip("/")


def validate_local_api(url: str) -> str:
    """`url` as a local API base (`http://HOST:PORT`, loopback host), trailing / removed.

    Raises ValueError with the problem line `resolve_config` would give, naming the setting.
    """
    try:
        return _LoopbackUrl().deserialize(url)
    except ValidationError as err:
        messages = err.messages if isinstance(err.messages, list) else [str(err.messages)]
        label = SETTINGS_BY_NAME["local_api_base"].label
        raise ValueError(f"{label} {messages[0]}") from None


class _LoopbackUrl(fields.Field):
    """`http://HOST:PORT` with a loopback host: the status endpoint never leaves the machine."""

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

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = str(value)
        # It goes into an HTTP header: whitespace, control or non-ASCII characters would make
        # requests fail later with an error that quotes the header value.
        if not all("!" <= ch <= "~" for ch in text):
            raise ValidationError("must be printable ASCII without spaces (the value is not shown)")
        return text


class _ConfigSchema(Schema):
    node_id = fields.String(load_default=None)
    host = fields.String(load_default=None)  # None until post_load: was it given?
    role = _Choice(ROLES, load_default="primary")
    control_api_base = _HttpUrl(
        required=True,
        error_messages={
            "required": "is required: the Control API base URL, e.g. https://control.example.test"
        },
    )
    local_api_base = _LoopbackUrl(load_default=None)
    shared_token = _Token(load_default=None)
    shared_token_file = fields.String(load_default=None)
    priority = _Int(0, _MAX_PRIORITY, load_default=None)
    controller_version = fields.String(load_default=__version__)
    preferred = _Bool(load_default=None)
    heartbeat_interval_ms = _Int(1, _MAX_MS, load_default=5000)
    lease_renew_interval_ms = _Int(1, _MAX_MS, load_default=5000)
    lease_ttl_sec = _Int(1, _MAX_SEC, load_default=30)
    renew_failure_threshold = _Int(1, load_default=2)
    request_timeout_ms = _Int(1, _MAX_MS, load_default=5000)
    runs_dir = fields.String(load_default=None)
    worktrees_dir = fields.String(load_default=None)
    logs_dir = fields.String(load_default=None)
    tmp_dir = fields.String(load_default=None)
    state_dir = fields.String(load_default=None)
    log_level = _Choice(LOG_LEVELS, load_default="info")

    # Not skipped on field errors: every problem is reported at once, so check whenever both
    # values themselves are valid.
    @validates_schema(skip_on_field_errors=False)
    def _timing(self, data: dict[str, Any], **_kwargs: Any) -> None:
        timeout_ms, ttl_sec = data.get("request_timeout_ms"), data.get("lease_ttl_sec")
        if timeout_ms is None or ttl_sec is None:
            return
        if timeout_ms >= ttl_sec * 1000:
            timeout, ttl = SETTINGS_BY_NAME["request_timeout_ms"], SETTINGS_BY_NAME["lease_ttl_sec"]
            raise ValidationError(
                f"{timeout.label} ({timeout_ms} ms) must be below {ttl.label} × 1000"
                f" ({ttl_sec * 1000} ms): a renewal that hangs could outlive the lease"
            )

    @post_load
    def _role_defaults(self, data: dict[str, Any], **_kwargs: Any) -> Config:
        primary = data["role"] == "primary"
        data["node_id_defaulted"] = data["node_id"] is None and data["host"] is None
        if data["host"] is None:
            data["host"] = SETTINGS_BY_NAME["host"].default
        if data["node_id"] is None:
            data["node_id"] = f"{data['host']}-{'main' if primary else 'standby'}"
        if data["priority"] is None:
            data["priority"] = 100 if primary else 50
        if data["preferred"] is None:
            data["preferred"] = primary
        paths = Paths(**{name: data.pop(name) for name in _PATH_NAMES})
        return Config(paths=paths, **data)


# ---------------------------------------------------------------------------------------------
# Resolution


def given(value: object) -> Any:
    """A source value, stripped, with empty or blank counting as unset (None).

    Strings come back stripped; a bool (a `--flag` / `--no-flag` switch) and None pass as is.
    """
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip()
    return text or None


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


def resolve_config(flags: Mapping[str, object], env: Mapping[str, str]) -> Config:
    """Merge default < env < flags, validate, and return the `Config` or raise `ConfigError`.

    `flags` is keyed by setting name, values are raw strings (bool for `preferred`), None when
    not given. `env` is keyed by variable name.
    """
    problems: list[str] = []
    secrets = [str(v) for v in (flags.get("shared_token"), env.get("BAA_SHARED_TOKEN")) if v]

    raw: dict[str, object] = {}
    for setting in SETTINGS:
        if setting.name in ("shared_token", "shared_token_file"):
            continue
        value = given(flags.get(setting.name))
        if value is None:
            value = given(env.get(setting.env))
        if value is not None:
            raw[setting.name] = value

    token, token_path = resolve_shared_token(flags, env, problems)
    if token_path is not None:
        raw["shared_token_file"] = token_path
    if token is not None:
        secrets.append(token)
        raw["shared_token"] = token

    config: Config | None = None
    try:
        config = _ConfigSchema().load(raw)
    except ValidationError as err:
        problems.extend(_problem_lines(err.messages))

    if problems:
        raise ConfigError([scrub(line, secrets) for line in problems])
    assert config is not None
    return config


def _problem_lines(messages: Any) -> list[str]:
    lines: list[str] = []
    assert isinstance(messages, dict)
    for setting in SETTINGS:
        for message in messages.get(setting.name, ()):
            lines.append(f"{setting.label} {message}")
    lines.extend(str(message) for message in messages.get("_schema", ()))
    return lines


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every non-blank secret (stripped) replaced by `***`."""
    for secret in secrets:
        if secret.strip():
            text = text.replace(secret.strip(), "***")
    return text


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
    control_api = urlsplit(config.control_api_base)
    if config.node_id_defaulted and not is_loopback_host(control_api.hostname or ""):
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
        is_http = control_api.scheme.lower() == "http"
        if is_http and not is_loopback_host(control_api.hostname or ""):
            warnings.append(
                f"the shared token is sent over plain http:// to the non-loopback host"
                f" {control_api.hostname}; use https://"
            )
    return warnings
