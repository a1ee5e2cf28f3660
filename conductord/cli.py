"""The `conductord` command line: parse, dispatch, map outcomes to exit codes.

Commands: `[start]` (the default), `config`, `checklist`, `diagnose` (what
`scripts/run_once.py` runs), `help`, `status`, `fleet`, `control-api`, plus `--version` and
`-h/--help`. Every config option comes from the settings table `config.SETTINGS`, so the
parser and `help` cannot drift apart. Commands that are clients of something else live in
`conductord.commands` (`status`, `fleet`); `control-api` is the reference server's own entry point.

Exit codes: 0 ok, 1 unexpected failure, 2 usage or config error, 3 degraded / unhealthy (the
last one is returned by the commands themselves). Errors are one line each on stderr, never a
traceback or argparse's usage dump; on an error nothing is written to stdout.

The commands that need gevent-heavy modules (`start` -> `runtime`, `status`, `control-api`)
import them lazily, so `config`, `checklist` and `help` stay cheap and work even while those
modules are missing. Every line printed here is redacted (`conductord.redact`) of any value
that could be the shared token, and of every piece of it of 8 characters or more.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from conductord import __version__
from conductord.argparsing import ArgumentParser, UsageError, fail
from conductord.config import (
    SETTINGS,
    Config,
    ConfigError,
    config_warnings,
    resolve_config,
)
from conductord.redact import clean, safe_str

__all__ = ["HelpRequested", "help_text", "main", "parse_start_argv"]

# command -> (module, function) of the commands that other modules implement.
_DELEGATED: dict[str, tuple[str, str]] = {
    "status": ("conductord.commands.status", "main"),
    "fleet": ("conductord.commands.fleet", "main"),
    "control-api": ("conductord.control_api.server", "main"),
}
_COMMANDS = ("start", "config", "checklist", "diagnose", "help", "status", "fleet", "control-api")


class HelpRequested(Exception):
    """`-h`/`--help` was among the options: the caller prints `help_text()` and exits 0."""


# ---------------------------------------------------------------------------------------------
# Parsing


def _options_parser(command: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"conductord {command}")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--json", action="store_true")
    if command == "checklist":
        return parser
    if command == "start":
        parser.add_argument("--run-once", action="store_true")
    SETTINGS.add_arguments(parser)
    return parser


def _parse_options(command: str, argv: Sequence[str]) -> argparse.Namespace:
    if "--version" in argv:
        # The seed's `--version <string>` was renamed; say so instead of "unknown option".
        raise UsageError(
            f"--version is not an option of {command}; it prints conductord's version on its"
            " own, and --controller-version / BAA_CONDUCTOR_VERSION sets the reported version"
        )
    namespace = _options_parser(command).parse_args(list(argv))
    if namespace.help:
        raise HelpRequested
    return namespace


def parse_start_argv(
    argv: Sequence[str], env: Mapping[str, str]
) -> tuple[Config, argparse.Namespace]:
    """Parse `start` options (a leading `start` is accepted) and resolve the configuration.

    The namespace carries `run_once` and `json` besides the raw setting values. Raises
    `UsageError`, `HelpRequested` or `ConfigError`.
    """
    tokens = list(argv)
    if tokens[:1] == ["start"]:
        tokens = tokens[1:]
    namespace = _parse_options("start", tokens)
    return resolve_config(SETTINGS.flags(namespace), env), namespace


# ---------------------------------------------------------------------------------------------
# Help


def help_text() -> str:
    """`conductord help`: every command, flag and variable with its default."""
    lines = [
        "usage: conductord [start] [--run-once] [--json] [options]",
        "       conductord config [--json] [options]",
        "       conductord checklist [--json]",
        "       conductord diagnose [--json] [options]   (also: scripts/run_once.py)",
        "       conductord status [--local-api URL] [--json]",
        "       conductord fleet [--control-api-base URL[,URL…]] [--json] [options]",
        "       conductord control-api [--listen HOST:PORT] [--db PATH]"
        " [--shared-token T | --shared-token-file F]",
        "       conductord help | -h | --help",
        "       conductord --version",
        "",
        "commands:",
        "  start         run the daemon (the default command); stdout carries JSON log lines",
        "  config        print the resolved configuration (--json: as JSON); warnings on stderr",
        "  checklist     print the startup checklist (--json: as JSON)",
        "  diagnose      run the start sequence once and report each step, the snapshot,",
        "                the warnings and a verdict (--json: as JSON); exit 0, or 3 degraded",
        "  status        ask a running node's local status endpoint (see: status --help)",
        "  fleet         the controllers, the lease and its recent history, from the Control",
        "                API; exit 0 with a leader, 3 without one (see: fleet --help)",
        "  control-api   run the reference Control API server (see: control-api --help)",
        "  help          print this text",
        "",
        "start options:",
        "  --run-once    run the start sequence, print the snapshot as JSON, release and stop",
        "  --json        accepted for scripts; the --run-once snapshot is always JSON",
        "",
        "options of start, diagnose and config (flag, environment variable, default);",
        "precedence: default < environment < flag; an empty or blank value counts as unset:",
    ]
    lines.extend(SETTINGS.help_lines())
    lines += [
        "",
        "exit codes: 0 ok, 1 unexpected failure, 2 usage or configuration error,"
        " 3 degraded or unhealthy",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _warn(text: str) -> None:
    sys.stderr.write(f"warning: {text}\n")


def _config_text(config: Config) -> str:
    def show(value: object) -> str:
        if value is None:
            return "not set"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    document = config.public_dict()
    document.pop("control_api_bases")  # control_api_base shows them, comma-joined
    paths = document.pop("paths")
    return "\n".join(f"{key}: {show(value)}" for key, value in {**document, **paths}.items())


def _cmd_config(argv: Sequence[str], env: Mapping[str, str], secrets: list[str]) -> int:
    namespace = _parse_options("config", argv)
    config = resolve_config(SETTINGS.flags(namespace), env)
    if config.shared_token:
        secrets.append(config.shared_token)
    # The token is masked already; redacting also catches it (or a piece) in another setting.
    if namespace.json:
        _out(json.dumps(clean(config.public_dict(), secrets), indent=2))
    else:
        _out(clean(_config_text(config), secrets))
    for warning in config_warnings(config):
        _warn(warning)  # no warning quotes the token (the placeholder's names it: no secret)
    return 0


def _cmd_checklist(argv: Sequence[str]) -> int:
    from conductord.lease import startup_checklist

    namespace = _parse_options("checklist", argv)
    checklist = startup_checklist()
    if namespace.json:
        _out(json.dumps(checklist, indent=2))
    else:
        _out("\n".join(f"{n}. {i['key']}: {i['description']}" for n, i in enumerate(checklist, 1)))
    return 0


class _NotImplementedYet(Exception):
    pass


def _load(module_name: str, function: str, command: str) -> Callable[..., int]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the target module itself missing means "not written yet"; a missing dependency
        # inside it is a real failure.
        if err.name == module_name:
            raise _NotImplementedYet(command) from None
        raise
    target = getattr(module, function, None)
    if target is None:
        raise _NotImplementedYet(command)
    return target


def _node_config(
    argv: Sequence[str], env: Mapping[str, str], secrets: list[str]
) -> tuple[Config, argparse.Namespace]:
    """Resolve a node's configuration and remember its token for redacting error lines."""
    config, namespace = parse_start_argv(argv, env)
    if config.shared_token:
        secrets.append(config.shared_token)
    return config, namespace


def _cmd_start(argv: Sequence[str], env: Mapping[str, str], secrets: list[str]) -> int:
    config, namespace = _node_config(argv, env, secrets)
    run_start = _load("conductord.runtime", "run_start", "start")
    return run_start(config, run_once=namespace.run_once)


def _cmd_diagnose(argv: Sequence[str], env: Mapping[str, str], secrets: list[str]) -> int:
    config, namespace = _node_config(argv, env, secrets)
    run_diagnostics = _load("conductord.diagnostics", "run_diagnostics", "diagnose")
    return run_diagnostics(config, as_json=namespace.json)


def _dispatch(argv: list[str], env: Mapping[str, str], secrets: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        if argv[:1] in (["-h"], ["--help"]):
            _out(help_text())
            return 0
        if argv[:1] == ["--version"]:
            if len(argv) > 1:
                raise UsageError("--version takes no other arguments")
            _out(f"conductord {__version__}")
            return 0
        command, rest = "start", argv
    else:
        command, rest = argv[0], argv[1:]

    try:
        if command == "start":
            return _cmd_start(rest, env, secrets)
        if command == "config":
            return _cmd_config(rest, env, secrets)
        if command == "diagnose":
            return _cmd_diagnose(rest, env, secrets)
        if command == "checklist":
            return _cmd_checklist(rest)
        if command == "help":
            _out(help_text())
            return 0
    except HelpRequested:
        _out(help_text())
        return 0
    if command in _DELEGATED:
        module_name, function = _DELEGATED[command]
        return _load(module_name, function, command)(list(rest), env)
    raise UsageError(f'unknown command "{command}" (commands: {", ".join(_COMMANDS)})')


def _argv_secrets(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Values that may be the token, known before any parsing succeeds."""
    found = [env.get("BAA_SHARED_TOKEN", "")]
    for index, token in enumerate(argv):
        if token == "--shared-token" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif token.startswith("--shared-token="):
            found.append(token.partition("=")[2])
    return [s.strip() for s in found if s and s.strip()]


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1, 2 or 3)."""
    environment: Mapping[str, Any] = os.environ if env is None else env
    argv = list(argv)
    secrets = _argv_secrets(argv, environment)
    try:
        return _dispatch(argv, environment, secrets)
    except UsageError as err:
        return fail(clean(str(err), secrets), 2)
    except ConfigError as err:
        for problem in err.problems:
            fail(clean(problem, secrets))
        return 2
    except _NotImplementedYet as err:
        return fail(f"{err} is not implemented yet", 1)
    except BrokenPipeError:
        # The reader went away (`conductord help | head -1`): stop quietly, and keep Python
        # from complaining again while flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return fail("interrupted", 1)
    except Exception as err:
        return fail(clean(f"unexpected {type(err).__name__}: {safe_str(err)}", secrets), 1)
