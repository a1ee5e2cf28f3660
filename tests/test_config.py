"""Unit tests of configuration resolution, validation and warnings (SPEC §3). Pure and fast."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from conductord import __version__, cli
from conductord.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    ByRole,
    Config,
    ConfigError,
    Paths,
    config_warnings,
    given,
    is_loopback_host,
    parse_bool,
    resolve_config,
    token_warnings,
    validate_local_api,
)
from conductord.lease import default_margin_s

README = Path(__file__).resolve().parent.parent / "README.md"
SAMPLE_PLUGINS = "tests.support.plugin_samples"

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
        control_api_bases=("https://control.example.test",),
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
    "control_api_base": ("https://env.test", "https://flag.test/", ("https://flag.test",)),
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
    "exec_command": ("env-job --once", "flag-job 'a b' c", ("flag-job", "a b", "c")),
    "exec_every_ms": ("1000", "60000", 60000),
    "exec_stop_grace_ms": ("500", "0", 0),
    "scheduler": (
        f"{SAMPLE_PLUGINS}:schedule",
        f"{SAMPLE_PLUGINS}.other:Jobs.run",
        f"{SAMPLE_PLUGINS}.other:Jobs.run",
    ),
    "scheduler_interval_ms": ("1000", "250", 250),
    "hooks": (SAMPLE_PLUGINS, f"{SAMPLE_PLUGINS}.other", f"{SAMPLE_PLUGINS}.other"),
}


def field_value(config: Config, name: str) -> object:
    if name in Paths.__dataclass_fields__:
        return getattr(config.paths, name)
    return getattr(config, SETTINGS_BY_NAME[name].attribute)


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
        ("exec_every_ms", "0", 'must be an integer >= 1 (got "0")'),
        ("exec_stop_grace_ms", "-1", 'must be an integer >= 0 (got "-1")'),
        ("scheduler_interval_ms", "5s", 'must be an integer >= 1 (got "5s")'),
        ("exec_command", "sh -c 'echo", "cannot be split into a command line (no closing quot"),
        ("exec_command", "''", "names no program to run"),
        ("scheduler", "tests.support", ': "tests.support" is not MODULE:CALLABLE'),
        ("hooks", "a.b:c", ': "a.b:c" is MODULE:CALLABLE; --hooks takes a module name'),
    ],
)
def test_each_validation_error_names_flag_and_variable(
    name: str, value: str, expected: str
) -> None:
    setting = SETTINGS_BY_NAME[name]
    for flags, env in (({name: value}, BASE), ({}, {**BASE, setting.env: value})):
        [problem] = problems_of(flags, env)
        assert problem.startswith(f"{setting.flag} / {setting.env}")
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
    # A piece of it (8 characters or more) too, from the flag or the variable (SPEC §3).
    for source in ({"shared_token": f" {TOKEN} "}, {}):
        env = {**BASE, "BAA_SHARED_TOKEN": TOKEN} if not source else BASE
        problems = problems_of({**source, "priority": f"12{TOKEN[3:14]}"}, env)
        assert problems == [
            '--priority / BAA_CONDUCTOR_PRIORITY must be an integer >= 0 (got "12***")'
        ]


def test_public_dict_shape() -> None:
    document = resolve_config({}, BASE).public_dict()
    flat = {s.name for s in SETTINGS} - set(Paths.__dataclass_fields__)
    extra = {"control_api_bases", "has_shared_token", "uses_placeholder_token", "paths"}
    assert set(document) == flat | extra
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


def test_given() -> None:
    assert (given(None), given("  "), given(" x "), given(False), given(7)) == (
        None,
        None,
        "x",
        False,
        "7",
    )


# --- the table: a default is written once --------------------------------------------------


def test_each_default_is_written_once_in_the_table() -> None:
    """`Config`'s own defaults, a resolved config and `help` all show the table's default."""
    help_text = " ".join(cli.help_text().split())
    resolved = resolve_config({}, BASE)
    dataclass_fields = {f.name: f for f in dataclasses.fields(Config)}
    checked = 0
    for setting in SETTINGS:
        assert f"(default: {setting.default_text})" in help_text, setting.name
        if setting.default is None or setting.name in Paths.__dataclass_fields__:
            continue
        expected = (
            setting.default.primary if isinstance(setting.default, ByRole) else setting.default
        )
        if setting.name != "node_id":  # a template, formatted with the host
            assert dataclass_fields[setting.attribute].default == expected, setting.name
        assert field_value(resolved, setting.name) == (
            expected.format(host="localhost") if setting.name == "node_id" else expected
        )
        checked += 1
    assert checked == 14
    assert SETTINGS_BY_NAME["exec_stop_grace_ms"].default == 1000
    assert SETTINGS_BY_NAME["scheduler_interval_ms"].default == 5000
    assert "(default: 1000)" in help_text and "(default: 5000)" in help_text


def test_the_readme_table_is_the_settings_table() -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", text, re.S)
    assert match, "README.md lost its settings table markers"
    assert match.group(1) == SETTINGS.markdown(), (
        "README.md's settings table is stale: paste the output of"
        ' `python -c "from conductord.config import SETTINGS; print(SETTINGS.markdown())"`'
    )


# --- several Control API base URLs (SPEC §17) ------------------------------------------------


def test_control_api_base_takes_a_comma_separated_list() -> None:
    raw = " https://a.test/ , http://127.0.0.1:8787/api//,https://b.test:8443"
    for flags, env in (({"control_api_base": raw}, {}), ({}, {"BAA_CONTROL_API_BASE": raw})):
        config = resolve_config(flags, env)
        assert config.control_api_bases == (
            "https://a.test",
            "http://127.0.0.1:8787/api",
            "https://b.test:8443",
        )
        assert config.control_api_base == ",".join(config.control_api_bases)
        document = config.public_dict()
        assert document["control_api_base"] == config.control_api_base
        assert document["control_api_bases"] == list(config.control_api_bases)


@pytest.mark.parametrize(
    ("raw", "entries"),
    [
        ("https://a.test,https://a.test", (1, 2)),
        ("https://a.test,https://b.test,https://a.test/", (1, 3)),  # trailing slash
        ("https://A.TEST,https://a.test", (1, 2)),  # host case
        ("http://a.test:80,http://a.test", (1, 2)),  # the default port
        ("https://a.test:443/x,https://a.test/x/", (1, 2)),
    ],
)
def test_duplicate_control_api_urls_are_refused(raw: str, entries: tuple[int, int]) -> None:
    [problem] = problems_of({"control_api_base": raw}, {})
    assert problem.startswith("--control-api-base / BAA_CONTROL_API_BASE lists ")
    assert problem.endswith(
        f" twice (entries {entries[0]} and {entries[1]}); give each Control API URL once"
    )


def test_different_paths_or_ports_are_not_duplicates() -> None:
    raw = "https://a.test/one,https://a.test/two,https://a.test:8443/one,http://a.test/one"
    assert len(resolve_config({"control_api_base": raw}, {}).control_api_bases) == 4


def test_each_bad_entry_of_the_list_is_reported_with_its_position() -> None:
    problems = problems_of(
        {"control_api_base": "https://ok.test,ftp://x.test,,https://u:pw-secret@y.test"}, {}
    )
    assert problems == [
        "--control-api-base / BAA_CONTROL_API_BASE entry 2 must be an http(s) URL such as"
        ' https://control.example.test (got "ftp://x.test")',
        "--control-api-base / BAA_CONTROL_API_BASE entry 3 is empty: give comma-separated"
        " http(s) URLs",
        "--control-api-base / BAA_CONTROL_API_BASE entry 4 must not carry credentials; use"
        " --shared-token-file",
    ]
    [problem] = problems_of({"control_api_base": "https://a.test,"}, {})
    assert "entry 2 is empty" in problem


def test_config_keeps_the_list_once_and_derives_the_joined_text() -> None:
    one = Config(node_id="n", control_api_bases=["http://127.0.0.1:9"])
    assert one.control_api_bases == ("http://127.0.0.1:9",)
    two = Config(node_id="n", control_api_bases=("http://a.test", "http://b.test"))
    assert two.control_api_base == "http://a.test,http://b.test"
    # One field: nothing to reconcile, and a replaced list cannot leave a stale joined text.
    names = [f.name for f in dataclasses.fields(Config)]
    assert "control_api_bases" in names and "control_api_base" not in names
    moved = dataclasses.replace(two, control_api_bases=("http://c.test",))
    assert (moved.control_api_base, moved.control_api_bases) == ("http://c.test", ("http://c.test",))
    assert resolve_config({}, {"BAA_CONTROL_API_BASE": "http://a.test, http://b.test/"}) == (
        dataclasses.replace(resolve_config({}, BASE), control_api_bases=two.control_api_bases)
    )
    for wrong in ({}, {"control_api_bases": ()}, {"control_api_bases": "http://a.test"}):
        with pytest.raises(TypeError):
            Config(node_id="n", **wrong)


def test_warnings_look_at_every_control_api_url(tmp_path: Path) -> None:
    mixed = "http://127.0.0.1:8787,http://control.example.test"
    config = healthy(tmp_path, control_api_base=mixed)
    assert only_warning(config) == (
        "the shared token is sent over plain http:// to the non-loopback host"
        " control.example.test; use https://"
    )
    local = healthy(tmp_path, node_id=None, control_api_base="http://127.0.0.1:1,http://[::1]:2")
    assert config_warnings(local) == []
    remote = healthy(tmp_path, node_id=None, control_api_base="http://127.0.0.1:1,https://c.test")
    assert only_warning(remote).startswith("node id defaults to localhost-main")


# --- --exec and its timing rule (SPEC §14) ---------------------------------------------------


def test_exec_is_split_like_a_shell_without_one() -> None:
    config = resolve_config({"exec_command": 'python3 -c \'print("a b")\' "$HOME" # x'}, BASE)
    assert config.exec_argv == ("python3", "-c", 'print("a b")', "$HOME", "#", "x")
    assert config.public_dict()["exec_command"] == "python3"  # argv[0] only
    assert resolve_config({}, BASE).exec_argv is None


def test_an_unparsable_exec_command_never_echoes_it() -> None:
    [problem] = problems_of({}, {**BASE, "BAA_CONDUCTOR_EXEC": "job --password 'pw-secret"})
    assert problem == (
        "--exec / BAA_CONDUCTOR_EXEC cannot be split into a command line (no closing"
        " quotation); quote it as a POSIX shell would (the command is not shown)"
    )


def exec_flags(ttl: int, renew_ms: int, grace_ms: int | None) -> dict[str, object]:
    flags: dict[str, object] = {
        "exec_command": "job",
        "lease_ttl_sec": str(ttl),
        "lease_renew_interval_ms": str(renew_ms),
        "request_timeout_ms": "500",
    }
    if grace_ms is not None:
        flags["exec_stop_grace_ms"] = str(grace_ms)
    return flags


@pytest.mark.parametrize(
    ("ttl", "renew_ms", "margin_ms"),
    [
        (3, 1000, 1000),  # one renew interval
        (30, 5000, 5000),  # the defaults
        (3, 200, 1000),  # at least 1 s
        (2, 5000, 1000),  # at most half the TTL
        (5, 2345, 2345),
    ],
)
def test_exec_stop_grace_must_fit_in_the_margin_at_its_boundary(
    ttl: int, renew_ms: int, margin_ms: int
) -> None:
    assert round(default_margin_s(renew_ms, ttl) * 1000) == margin_ms  # the rule's own margin
    fits = margin_ms - 250
    assert resolve_config(exec_flags(ttl, renew_ms, fits), BASE).exec_stop_grace_ms == fits
    [problem] = problems_of(exec_flags(ttl, renew_ms, fits + 1), BASE)
    assert problem == (
        f"--exec-stop-grace-ms / BAA_CONDUCTOR_EXEC_STOP_GRACE_MS ({fits + 1} ms) + 250 ms must"
        f" fit in the step-down margin ({margin_ms} ms: one --lease-renew-interval-ms /"
        " BAA_CONDUCTOR_LEASE_RENEW_INTERVAL_MS, at least 1 s, at most half of --lease-ttl-sec /"
        " BAA_CONDUCTOR_LEASE_TTL_SEC) when --exec / BAA_CONDUCTOR_EXEC is set, so that a child"
        " stopped at the local lease deadline is gone before the lease can pass to another node"
    )


def test_exec_timing_rule_applies_only_with_exec_and_to_the_default_grace() -> None:
    no_exec = {**exec_flags(2, 1000, 5000), "exec_command": None}
    assert resolve_config(no_exec, BASE).exec_stop_grace_ms == 5000
    # The default grace (1000 ms) does not fit a 1 s margin: --exec with TTL 2 needs a smaller one.
    [problem] = problems_of(exec_flags(2, 1000, None), BASE)
    assert problem.startswith("--exec-stop-grace-ms / BAA_CONDUCTOR_EXEC_STOP_GRACE_MS (1000 ms)")
    env = {**BASE, "BAA_CONDUCTOR_EXEC_STOP_GRACE_MS": "750"}
    assert resolve_config(exec_flags(2, 1000, None), env).exec_stop_grace_ms == 750


def test_exec_every_without_exec_is_a_warning(tmp_path: Path) -> None:
    config = healthy(tmp_path, exec_every_ms="60000")
    assert only_warning(config) == (
        "--exec-every-ms / BAA_CONDUCTOR_EXEC_EVERY_MS has no effect without --exec /"
        " BAA_CONDUCTOR_EXEC"
    )
    assert config_warnings(healthy(tmp_path, exec_every_ms="60000", exec_command="job")) == []


# --- plug-ins are imported while the config resolves -----------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "scheduler",
            "acme_missing.jobs:run",
            '--scheduler / BAA_CONDUCTOR_SCHEDULER: cannot import "acme_missing.jobs":'
            " No module named 'acme_missing'",
        ),
        (
            "scheduler",
            f"{SAMPLE_PLUGINS}:nothing",
            f'--scheduler / BAA_CONDUCTOR_SCHEDULER: "{SAMPLE_PLUGINS}" has no attribute "nothing"',
        ),
        (
            "scheduler",
            f"{SAMPLE_PLUGINS}:__doc__",
            f'--scheduler / BAA_CONDUCTOR_SCHEDULER: "{SAMPLE_PLUGINS}:__doc__" is not callable'
            " (type str)",
        ),
        (
            "hooks",
            "acme_missing",
            '--hooks / BAA_CONDUCTOR_HOOKS: cannot import "acme_missing": No module named'
            " 'acme_missing'",
        ),
        (
            "hooks",
            "tests.support",
            '--hooks / BAA_CONDUCTOR_HOOKS: "tests.support" defines none of load_runs,'
            " reconcile_runs, on_lease_state_change",
        ),
    ],
)
def test_plugin_problems_are_config_errors(name: str, value: str, expected: str) -> None:
    env_name = SETTINGS_BY_NAME[name].env
    for flags, env in (({name: value}, BASE), ({}, {**BASE, env_name: value})):
        assert problems_of(flags, env) == [expected]


def test_plugins_resolve_to_their_text() -> None:
    config = resolve_config(
        {"scheduler": f" {SAMPLE_PLUGINS}:schedule ", "hooks": SAMPLE_PLUGINS}, BASE
    )
    assert (config.scheduler, config.hooks) == (f"{SAMPLE_PLUGINS}:schedule", SAMPLE_PLUGINS)
    assert config.public_dict()["scheduler"] == f"{SAMPLE_PLUGINS}:schedule"


# --- the reference Control API's settings: the same machinery --------------------------------


def test_control_api_settings_defaults_precedence_and_blank() -> None:
    from conductord.control_api.settings import ServerSettings, resolve_settings

    assert resolve_settings({}, {}) == ServerSettings(
        "127.0.0.1", 8787, "./conductord-control.sqlite3"
    )
    env = {
        "BAA_CONTROL_API_LISTEN": "127.0.0.2:1",
        "BAA_CONTROL_API_DB": "/env/db",
        "BAA_CONTROL_API_MAX_WAITERS": "5",
        "BAA_CONTROL_API_LONG_POLL": "off",
        "BAA_LOG_LEVEL": "DEBUG",
    }
    from_env = resolve_settings({"listen": " ", "db": ""}, env)  # blank flags fall through
    assert (from_env.host, from_env.port, from_env.db) == ("127.0.0.2", 1, "/env/db")
    assert (from_env.max_waiters, from_env.long_poll, from_env.log_level) == (5, False, "debug")
    flags = {"listen": "[::1]:0", "max_waiters": "9", "long_poll": False, "shared_token": TOKEN}
    from_flags = resolve_settings(flags, {**env, "BAA_CONTROL_API_LONG_POLL": "1"})
    assert (from_flags.host, from_flags.port, from_flags.max_waiters) == ("::1", 0, 9)
    assert from_flags.long_poll is False and from_flags.token == TOKEN
    assert TOKEN not in repr(from_flags)


def test_control_api_settings_report_every_problem_at_once() -> None:
    from conductord.control_api.settings import resolve_settings

    env = {"BAA_CONTROL_API_LONG_POLL": "maybe", "BAA_SHARED_TOKEN": TOKEN}
    with pytest.raises(ConfigError) as caught:
        resolve_settings({"listen": "nope", "max_waiters": TOKEN, "log_level": "loud"}, env)
    assert caught.value.problems == [
        '--listen / BAA_CONTROL_API_LISTEN must be HOST:PORT with a port 0-65535 (got "nope")',
        '--log-level / BAA_LOG_LEVEL must be "debug", "info", "warning" or "error" (got "loud")',
        '--max-waiters / BAA_CONTROL_API_MAX_WAITERS must be an integer >= 1 (got "***")',
        "--no-long-poll / BAA_CONTROL_API_LONG_POLL must be one of 1/0, true/false, yes/no,"
        ' on/off (got "maybe")',
    ]


def test_control_api_refuses_a_non_loopback_listen_without_a_token(tmp_path: Path) -> None:
    from conductord.control_api.settings import resolve_settings

    with pytest.raises(ConfigError) as caught:
        resolve_settings({"listen": "0.0.0.0:0"}, {})
    assert caught.value.problems == [
        "refusing to listen on non-loopback address 0.0.0.0 without a shared token"
        " (--shared-token-file / BAA_SHARED_TOKEN_FILE or --shared-token / BAA_SHARED_TOKEN)"
    ]
    # An unreadable token file is its own problem, not also "without a shared token".
    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as caught:
        resolve_settings({"listen": "0.0.0.0:0", "shared_token_file": missing}, {})
    [problem] = caught.value.problems
    assert problem.startswith("--shared-token-file / BAA_SHARED_TOKEN_FILE: cannot read")
    assert resolve_settings({"listen": "0.0.0.0:0"}, {"BAA_SHARED_TOKEN": TOKEN}).host == "0.0.0.0"


def test_control_api_usage_lists_every_row() -> None:
    from conductord.control_api.settings import SERVER_SETTINGS, usage_text

    text = " ".join(usage_text().split())
    for row in SERVER_SETTINGS:
        assert row.env in text and row.flag in text
        assert f"(default: {row.default_text})" in text
    assert "(default: 127.0.0.1:8787)" in text and "(default: 1000)" in text
