"""Unit tests of configuration resolution, validation and warnings (SPEC §3). Pure and fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conductord import __version__
from conductord.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    Config,
    ConfigError,
    Paths,
    config_warnings,
    given,
    is_loopback_host,
    parse_bool,
    resolve_config,
    scrub,
    token_warnings,
    validate_local_api,
)

BASE = {"BAA_CONTROL_API_BASE": "https://control.example.test"}
TOKEN = "tok-Zq8vK3pW9xLm2"  # distinctive, so a leak is easy to grep for


def problems_of(flags: dict[str, object], env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        resolve_config(flags, env)
    return caught.value.problems


def test_seed_case_env_merged_with_flags() -> None:
    env = {
        "BAA_NODE_ID": "mini-main",
        "BAA_CONDUCTOR_HOST": "mini",
        "BAA_CONDUCTOR_ROLE": "primary",
        "BAA_CONTROL_API_BASE": "https://control.example.test/",
        "BAA_SHARED_TOKEN": "replace-me",
        "BAA_RUNS_DIR": "/tmp/runs",
    }
    config = resolve_config({"role": "standby"}, env)
    assert config.role == "standby"
    assert config.node_id == "mini-main"
    assert config.host == "mini"
    assert config.control_api_base == "https://control.example.test"
    assert config.paths.runs_dir == "/tmp/runs"
    assert config.uses_placeholder_token and config.has_shared_token
    # Role-dependent defaults follow the resolved (flag) role.
    assert config.priority == 50 and config.preferred is False


def test_defaults_for_primary() -> None:
    config = resolve_config({}, BASE)
    assert config == Config(
        node_id="localhost-main",
        control_api_base="https://control.example.test",
        controller_version=__version__,
        node_id_defaulted=True,
    )
    assert (config.priority, config.preferred, config.log_level) == (100, True, "info")
    assert config.paths == Paths()
    assert not config.has_shared_token and not config.uses_placeholder_token


def test_defaults_for_standby_use_the_host() -> None:
    config = resolve_config({"host": "mini", "role": "standby"}, BASE)
    assert (config.node_id, config.priority, config.preferred) == ("mini-standby", 50, False)


# One valid (env value, flag value, resolved flag value) per setting: proves every flag and every
# variable of the table reaches its field, and that a flag beats the variable.
SAMPLES: dict[str, tuple[str, object, object]] = {
    "node_id": ("env-node", "flag-node", "flag-node"),
    "host": ("env-host", "flag-host", "flag-host"),
    "role": ("standby", "primary", "primary"),
    "control_api_base": ("https://env.test", "https://flag.test/", "https://flag.test"),
    "local_api_base": ("http://127.0.0.1:1000", "http://[::1]:2000/", "http://[::1]:2000"),
    "shared_token": ("env-token", "flag-token", "flag-token"),
    "priority": ("7", "8", 8),
    "controller_version": ("1.0-env", "2.0-flag", "2.0-flag"),
    "preferred": ("no", True, True),
    "heartbeat_interval_ms": ("1000", "2000", 2000),
    "lease_renew_interval_ms": ("1000", "2000", 2000),
    "lease_ttl_sec": ("40", "50", 50),
    "renew_failure_threshold": ("3", "4", 4),
    "request_timeout_ms": ("1000", "2000", 2000),
    "runs_dir": ("/env/runs", "/flag/runs", "/flag/runs"),
    "worktrees_dir": ("/env/wt", "/flag/wt", "/flag/wt"),
    "logs_dir": ("/env/logs", "/flag/logs", "/flag/logs"),
    "tmp_dir": ("/env/tmp", "/flag/tmp", "/flag/tmp"),
    "state_dir": ("/env/state", "/flag/state", "/flag/state"),
    "log_level": ("debug", "WARNING", "warning"),
}


def field_value(config: Config, name: str) -> object:
    if name in Paths.__dataclass_fields__:
        return getattr(config.paths, name)
    return getattr(config, name)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_precedence_default_env_flag(name: str) -> None:
    setting = SETTINGS_BY_NAME[name]
    env_value, flag_value, expected = SAMPLES[name]
    env = {**BASE, setting.env: env_value}
    from_env = field_value(resolve_config({}, env), name)
    assert from_env != field_value(resolve_config({}, BASE), name)  # env beats the default
    assert from_env == field_value(resolve_config({name: env_value}, BASE), name)
    assert field_value(resolve_config({name: flag_value}, env), name) == expected != from_env


def test_every_setting_except_the_token_file_has_a_sample() -> None:
    assert set(SAMPLES) | {"shared_token_file"} == {s.name for s in SETTINGS}


def test_blank_values_count_as_unset() -> None:
    env = {**BASE, "BAA_CONDUCTOR_ROLE": "standby", "BAA_NODE_ID": "   ", "BAA_LOG_LEVEL": ""}
    config = resolve_config({"role": "  ", "host": "", "priority": None}, env)
    assert config.role == "standby"  # blank flag falls through to the variable
    assert config.node_id == "localhost-standby"  # blank variable falls through to the default
    assert config.log_level == "info"
    # A blank token is no token, so it is not an error but the "no shared token" warning.
    assert not resolve_config({"shared_token": " "}, BASE).has_shared_token


def test_values_are_stripped() -> None:
    config = resolve_config({"node_id": " n1 ", "priority": " 3 "}, BASE)
    assert (config.node_id, config.priority) == ("n1", 3)


def test_role_error_has_the_exact_text() -> None:
    assert problems_of({"role": "boss"}, BASE) == [
        '--role / BAA_CONDUCTOR_ROLE must be "primary" or "standby" (got "boss")'
    ]


def test_missing_control_api_base_names_flag_and_variable() -> None:
    [problem] = problems_of({}, {})
    assert problem.startswith("--control-api-base / BAA_CONTROL_API_BASE is required")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("priority", "-1", 'must be an integer >= 0 (got "-1")'),
        ("priority", "high", 'must be an integer >= 0 (got "high")'),
        ("heartbeat_interval_ms", "0", 'must be an integer >= 1 (got "0")'),
        ("heartbeat_interval_ms", "5.0", 'must be an integer >= 1 (got "5.0")'),
        ("lease_renew_interval_ms", "1_000", 'must be an integer >= 1 (got "1_000")'),
        ("lease_ttl_sec", "9" * 5000, "must be an integer >= 1"),
        ("lease_ttl_sec", "86401", 'must be at most 86400 (got "86401")'),
        ("renew_failure_threshold", "0", 'must be an integer >= 1 (got "0")'),
        ("request_timeout_ms", "-5", 'must be an integer >= 1 (got "-5")'),
        ("preferred", "maybe", 'must be one of 1/0, true/false, yes/no, on/off (got "maybe")'),
        ("log_level", "loud", 'must be "debug", "info", "warning" or "error" (got "loud")'),
        ("control_api_base", "ftp://x.test", "must be an http(s) URL"),
        ("control_api_base", "control.example.test", "must be an http(s) URL"),
        ("control_api_base", "https://x.test/?a=1", "must not have a query or fragment"),
        ("local_api_base", "https://127.0.0.1:4317", "must be an http:// URL"),
        ("local_api_base", "http://10.1.2.3:4317", "must use a loopback host"),
        ("local_api_base", "http://0.0.0.0:4317", "must use a loopback host"),
        ("local_api_base", "http://127.0.0.1", "must name an explicit port"),
        ("local_api_base", "http://127.0.0.1:0", "must name an explicit port"),
        ("local_api_base", "http://127.0.0.1:99999", "with a valid port"),
        ("local_api_base", "http://127.0.0.1:4317/status", "must not have a path"),
    ],
)
def test_each_validation_error_names_flag_and_variable(
    name: str, value: str, expected: str
) -> None:
    setting = SETTINGS_BY_NAME[name]
    for flags, env in (({name: value}, BASE), ({}, {**BASE, setting.env: value})):
        [problem] = problems_of(flags, env)
        assert problem.startswith(f"{setting.flag} / {setting.env} ")
        assert expected in problem


def test_all_problems_are_reported_at_once() -> None:
    flags = {"role": "boss", "priority": "x", "lease_ttl_sec": "5", "request_timeout_ms": "5000"}
    env = {"BAA_CONDUCTOR_PREFERRED": "maybe", "BAA_CONDUCTOR_LOCAL_API": "http://10.0.0.1:1"}
    problems = problems_of(flags, env)
    starts = [p.split(" ", 1)[0] for p in problems]
    assert starts == [
        "--role",
        "--control-api-base",
        "--local-api",
        "--priority",
        "--preferred",
        "--request-timeout-ms",  # the timing rule still runs beside field errors
    ]
    assert all("\n" not in p for p in problems)


def test_timing_rule_request_timeout_below_ttl() -> None:
    [problem] = problems_of({"lease_ttl_sec": "5", "request_timeout_ms": "5000"}, BASE)
    assert problem.startswith("--request-timeout-ms / BAA_CONDUCTOR_REQUEST_TIMEOUT_MS (5000 ms)")
    assert "--lease-ttl-sec / BAA_CONDUCTOR_LEASE_TTL_SEC × 1000 (5000 ms)" in problem
    config = resolve_config({"lease_ttl_sec": "5", "request_timeout_ms": "4999"}, BASE)
    assert config.request_timeout_ms == 4999


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[("1", True), ("TRUE", True), ("yes", True), ("On", True)],
        *[("0", False), ("false", False), ("NO", False), ("off", False)],
    ],
)
def test_preferred_variable_spellings(raw: str, expected: bool) -> None:
    env = {**BASE, "BAA_CONDUCTOR_ROLE": "standby", "BAA_CONDUCTOR_PREFERRED": raw}
    assert resolve_config({}, env).preferred is expected


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:4317/", "http://127.0.0.1:4317"),
        ("http://127.9.8.7:80", "http://127.9.8.7:80"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://LOCALHOST:1", "http://LOCALHOST:1"),
    ],
)
def test_local_api_accepts_loopback_hosts(url: str, base: str) -> None:
    assert resolve_config({"local_api_base": url}, BASE).local_api_base == base
    assert validate_local_api(url) == base


def test_validate_local_api_gives_the_config_problem_line() -> None:
    for url in ("https://127.0.0.1:1", "http://example.com:1", "http://127.0.0.1", "ftp://x:1"):
        [problem] = problems_of({"local_api_base": url}, BASE)
        with pytest.raises(ValueError) as caught:
            validate_local_api(url)
        assert str(caught.value) == problem, url


def test_control_api_base_keeps_a_path_prefix_and_drops_trailing_slashes() -> None:
    config = resolve_config({"control_api_base": "http://127.0.0.1:8787/api//"}, {})
    assert config.control_api_base == "http://127.0.0.1:8787/api"


def test_urls_with_credentials_are_refused_without_echoing_them() -> None:
    [problem] = problems_of({"control_api_base": "https://user:pw-secret@x.test"}, {})
    assert "credentials" in problem and "pw-secret" not in problem


def test_is_loopback_host() -> None:
    assert all(map(is_loopback_host, ["localhost", "127.0.0.1", "127.255.0.1", "::1", "[::1]"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "10.0.0.1", "example.test", "", "::"]))


# --- the shared token and its file ------------------------------------------------------------


def token_file(tmp_path: Path, content: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(mode)
    return str(path)


def test_token_file_content_is_stripped(tmp_path: Path) -> None:
    path = token_file(tmp_path, f"\n  {TOKEN}  \n")
    for flags, env in (
        ({"shared_token_file": path}, BASE),
        ({}, {**BASE, "BAA_SHARED_TOKEN_FILE": path}),
    ):
        config = resolve_config(flags, env)
        assert config.shared_token == TOKEN
        assert config.shared_token_file == path


def test_token_flag_of_either_kind_beats_variable_of_either_kind(tmp_path: Path) -> None:
    path = token_file(tmp_path, "from-file")
    env = {**BASE, "BAA_SHARED_TOKEN": "from-env"}
    assert resolve_config({"shared_token_file": path}, env).shared_token == "from-file"
    env = {**BASE, "BAA_SHARED_TOKEN_FILE": path}
    config = resolve_config({"shared_token": "from-flag"}, env)
    assert (config.shared_token, config.shared_token_file) == ("from-flag", None)


def test_token_and_token_file_at_one_level_are_an_error(tmp_path: Path) -> None:
    path = token_file(tmp_path, "x")
    [problem] = problems_of({"shared_token": TOKEN, "shared_token_file": path}, BASE)
    assert problem == "--shared-token and --shared-token-file are mutually exclusive: give only one"
    env = {**BASE, "BAA_SHARED_TOKEN": TOKEN, "BAA_SHARED_TOKEN_FILE": path}
    [problem] = problems_of({}, env)
    assert "BAA_SHARED_TOKEN and BAA_SHARED_TOKEN_FILE are mutually exclusive" in problem


def test_unreadable_or_empty_token_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    problems = problems_of({"shared_token_file": missing, "role": "boss"}, BASE)
    assert problems[0].startswith(
        f'--shared-token-file / BAA_SHARED_TOKEN_FILE: cannot read "{missing}"'
    )
    assert len(problems) == 2  # reported together with the other problems
    empty = token_file(tmp_path, " \n")
    assert problems_of({"shared_token_file": empty}, BASE) == [
        f'--shared-token-file / BAA_SHARED_TOKEN_FILE: "{empty}" is empty'
    ]


def test_token_with_whitespace_is_refused_without_echoing_it() -> None:
    [problem] = problems_of({"shared_token": f"{TOKEN} x"}, BASE)
    assert problem.startswith("--shared-token / BAA_SHARED_TOKEN must be printable ASCII")
    assert TOKEN not in problem


def test_token_never_in_repr_str_or_public_dict() -> None:
    config = resolve_config({"shared_token": TOKEN}, BASE)
    document = config.public_dict()
    assert document["shared_token"] == "***" and document["has_shared_token"] is True
    assert TOKEN not in repr(config) and TOKEN not in str(config) and TOKEN not in str(document)
    # Even a token pasted into another setting is masked in the problem that quotes it.
    problems = problems_of({"shared_token": TOKEN, "priority": TOKEN}, BASE)
    assert problems == ['--priority / BAA_CONDUCTOR_PRIORITY must be an integer >= 0 (got "***")']


def test_public_dict_shape() -> None:
    document = resolve_config({}, BASE).public_dict()
    flat = {s.name for s in SETTINGS} - set(Paths.__dataclass_fields__)
    assert set(document) == flat | {"has_shared_token", "uses_placeholder_token", "paths"}
    assert set(document["paths"]) == {
        "logs_dir",
        "runs_dir",
        "state_dir",
        "tmp_dir",
        "worktrees_dir",
    }
    assert document["shared_token"] is None and document["uses_placeholder_token"] is False


# --- warnings ---------------------------------------------------------------------------------


def healthy(tmp_path: Path, **changes: object) -> Config:
    flags = {
        "node_id": "n1",
        "shared_token_file": token_file(tmp_path, TOKEN),
        "local_api_base": "http://127.0.0.1:4317",
        **changes,
    }
    return resolve_config(flags, BASE)


def test_healthy_config_has_no_warnings(tmp_path: Path) -> None:
    assert config_warnings(healthy(tmp_path)) == []


def only_warning(config: Config) -> str:
    [warning] = config_warnings(config)
    return warning


def test_warning_no_shared_token() -> None:
    config = resolve_config({"node_id": "n1", "local_api_base": "http://127.0.0.1:1"}, BASE)
    assert only_warning(config).startswith("no shared token")


def test_warning_placeholder_token_names_it() -> None:
    config = resolve_config(
        {"node_id": "n1", "local_api_base": "http://127.0.0.1:1", "shared_token": "replace-me"},
        BASE,
    )
    assert "placeholder replace-me" in only_warning(config)


def test_warning_no_local_api(tmp_path: Path) -> None:
    config = healthy(tmp_path, local_api_base=None)
    assert only_warning(config).startswith("no local API (--local-api / BAA_CONDUCTOR_LOCAL_API)")


def test_warning_renew_interval_not_below_ttl(tmp_path: Path) -> None:
    config = healthy(
        tmp_path,
        lease_ttl_sec="2",
        lease_renew_interval_ms="2000",
        request_timeout_ms="500",
        renew_failure_threshold="1",
    )
    assert "renew interval (2000 ms) is >= the lease TTL (2000 ms)" in only_warning(config)


def test_warning_renew_budget_not_below_ttl(tmp_path: Path) -> None:
    config = healthy(tmp_path, lease_ttl_sec="10", lease_renew_interval_ms="5000")
    warning = only_warning(config)  # 5000 ms × 2 failures = the TTL
    assert "renew failure threshold (10000 ms) is >= the lease TTL (10000 ms)" in warning
    assert (
        config_warnings(healthy(tmp_path, lease_ttl_sec="11", lease_renew_interval_ms="5000")) == []
    )


def test_warning_token_over_plain_http_to_a_remote_host(tmp_path: Path) -> None:
    config = healthy(tmp_path, control_api_base="http://control.example.test")
    assert "plain http:// to the non-loopback host control.example.test" in only_warning(config)
    assert config_warnings(healthy(tmp_path, control_api_base="http://127.0.0.1:8787")) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_warning_token_file_open_to_group_or_others(tmp_path: Path) -> None:
    config = healthy(tmp_path)
    Path(config.shared_token_file).chmod(0o640)
    warning = only_warning(config)
    assert "accessible by group or others (mode 0640)" in warning
    assert TOKEN not in warning


def test_warning_default_node_id_against_a_remote_control_api(tmp_path: Path) -> None:
    config = healthy(tmp_path, node_id=None)
    assert config.node_id_defaulted
    assert only_warning(config) == (
        "node id defaults to localhost-main: set --node-id / BAA_NODE_ID (or --host /"
        " BAA_CONDUCTOR_HOST) to a name unique in the fleet; two nodes with one id share one lease"
    )
    assert "localhost-standby" in only_warning(healthy(tmp_path, node_id=None, role="standby"))
    assert "node_id_defaulted" not in config.public_dict()


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ({"node_id": "n1"}, {}),
        ({}, {"BAA_NODE_ID": "n1"}),
        ({"host": "box"}, {}),
        ({}, {"BAA_CONDUCTOR_HOST": "box"}),
        ({"host": "localhost"}, {}),  # given explicitly: the operator chose it
        ({"control_api_base": "http://127.0.0.1:8787"}, {}),  # a one-machine setup
        ({"control_api_base": "http://[::1]:8787"}, {}),
    ],
)
def test_no_default_node_id_warning_when_given_or_local(
    tmp_path: Path, flags: dict[str, str], env: dict[str, str]
) -> None:
    flags = {
        "shared_token_file": token_file(tmp_path, TOKEN),
        "local_api_base": "http://127.0.0.1:4317",
        **flags,
    }
    config = resolve_config(flags, {**BASE, **env})
    assert config_warnings(config) == []


def test_token_warnings_share_their_wording(tmp_path: Path) -> None:
    [none] = token_warnings(None, None, without_token="the server accepts anyone")
    assert none.startswith("no shared token (--shared-token-file / BAA_SHARED_TOKEN_FILE")
    assert none.endswith("; the server accepts anyone")
    [placeholder] = token_warnings("replace-me", None, without_token="x")
    assert "placeholder replace-me" in placeholder
    assert token_warnings(TOKEN, str(tmp_path / "missing"), without_token="x") == []
    path = token_file(tmp_path, TOKEN)
    if os.name == "posix":
        Path(path).chmod(0o604)
        [mode] = token_warnings(TOKEN, path, without_token="x")
        assert f'file "{path}" is accessible by group or others (mode 0604)' in mode


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        ("off", False),
        ("maybe", None),
        ("", None),
        (" 1", None),
    ],
)
def test_parse_bool(text: str, expected: bool | None) -> None:
    assert parse_bool(text) is expected


def test_given_and_scrub() -> None:
    assert (given(None), given("  "), given(" x "), given(False), given(7)) == (
        None,
        None,
        "x",
        False,
        "7",
    )
    assert scrub("a tok b tok", [" tok ", "", "  "]) == "a *** b ***"
