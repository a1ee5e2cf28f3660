"""`--scheduler MODULE:CALLABLE` and `--hooks MODULE` (SPEC §14): loading and config errors.

In-process tests load modules written to a temporary directory (each test its own module
names, so the import cache never hides a case). The subprocess tests run `python -m conductord
config` and `start` with every kind of plug-in mistake and check the contract: exit 2, nothing
on stdout, one line on stderr naming the flag, the variable and the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from conductord.config import Config, resolve_config
from conductord.plugins import (
    HOOK_NAMES,
    Hooks,
    PluginError,
    Plugins,
    load_hooks,
    load_plugins,
    load_scheduler,
)

BASE = {"BAA_CONTROL_API_BASE": "http://127.0.0.1:9"}


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def module(directory: Path, name: str, source: str) -> str:
    path = directory.joinpath(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(directory).parents:
        if parent != Path("."):
            (directory / parent / "__init__.py").touch()
    path.write_text(textwrap.dedent(source))
    return name


def test_load_scheduler_finds_a_function_or_a_dotted_attribute(plugin_dir: Path) -> None:
    module(
        plugin_dir,
        "acme_ok.jobs",
        """
        def run(context):
            return ("run", context)

        class Jobs:
            @staticmethod
            def every(context):
                return ("every", context)
        """,
    )
    assert load_scheduler("acme_ok.jobs:run")("ctx") == ("run", "ctx")
    assert load_scheduler(" acme_ok.jobs:Jobs.every ")("ctx") == ("every", "ctx")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acme_nope.jobs:run", "cannot import \"acme_nope.jobs\": No module named 'acme_nope'"),
        ("acme_bad.jobs:missing", '"acme_bad.jobs" has no attribute "missing"'),
        ("acme_bad.jobs:Holder.missing", '"acme_bad.jobs:Holder" has no attribute "missing"'),
        ("acme_bad.jobs:VALUE", '"acme_bad.jobs:VALUE" is not callable (type int)'),
        ("acme_bad.jobs", '"acme_bad.jobs" is not MODULE:CALLABLE, e.g. acme.jobs:run'),
        ("acme_bad.jobs:", '"acme_bad.jobs:" is not MODULE:CALLABLE, e.g. acme.jobs:run'),
        ("acme-bad:run", '"acme-bad:run" is not MODULE:CALLABLE, e.g. acme.jobs:run'),
        (":run", '":run" is not MODULE:CALLABLE, e.g. acme.jobs:run'),
        ("acme_broken:run", 'cannot import "acme_broken": ZeroDivisionError: division by zero'),
        ("acme_exits:run", 'cannot import "acme_exits": it called sys.exit(3)'),
    ],
)
def test_load_scheduler_errors_are_one_line(plugin_dir: Path, spec: str, message: str) -> None:
    module(plugin_dir, "acme_bad.jobs", "VALUE = 1\nclass Holder:\n    pass\n")
    module(plugin_dir, "acme_broken", "1 / 0\n")
    module(plugin_dir, "acme_exits", "import sys\nsys.exit(3)\n")
    with pytest.raises(PluginError) as caught:
        load_scheduler(spec)
    assert str(caught.value) == message
    assert caught.value.setting is None


def test_load_hooks_takes_any_subset_of_the_three(plugin_dir: Path) -> None:
    module(
        plugin_dir,
        "acme_hooks_all",
        """
        def load_runs():
            return 3
        def reconcile_runs():
            return None
        def on_lease_state_change(snapshot):
            return snapshot["daemon"]["lease_state"]
        """,
    )
    module(plugin_dir, "acme_hooks_one", "def reconcile_runs():\n    return 'done'\n")
    every = load_hooks("acme_hooks_all")
    assert every.module == "acme_hooks_all"
    assert every.load_runs() == 3
    assert every.on_lease_state_change({"daemon": {"lease_state": "leader"}}) == "leader"
    one = load_hooks(" acme_hooks_one ")
    assert (one.load_runs, one.on_lease_state_change) == (None, None)
    assert one.reconcile_runs() == "done"
    assert set(HOOK_NAMES) == {f for f in Hooks.__dataclass_fields__ if f != "module"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acme_hooks_nope", "cannot import \"acme_hooks_nope\": No module named 'acme_hooks_nope'"),
        ("acme_hooks_bad", '"acme_hooks_bad.on_lease_state_change" is not callable (type str)'),
        (
            "acme_hooks_none",
            '"acme_hooks_none" defines none of load_runs, reconcile_runs, on_lease_state_change',
        ),
        (
            "acme_hooks_bad:load_runs",
            '"acme_hooks_bad:load_runs" is MODULE:CALLABLE; --hooks takes a module name such as'
            " acme.hooks",
        ),
        ("acme hooks", '"acme hooks" is not a module name such as acme.hooks'),
    ],
)
def test_load_hooks_errors(plugin_dir: Path, spec: str, message: str) -> None:
    module(
        plugin_dir, "acme_hooks_bad", "def load_runs():\n    pass\non_lease_state_change = 'x'\n"
    )
    module(plugin_dir, "acme_hooks_none", "def unrelated():\n    pass\n")
    with pytest.raises(PluginError) as caught:
        load_hooks(spec)
    assert str(caught.value) == message


def test_load_plugins_gives_the_runtime_the_callables(plugin_dir: Path) -> None:
    module(plugin_dir, "acme_rt", "def run(ctx):\n    return ctx\ndef load_runs():\n    return 7\n")
    config = SimpleNamespace(scheduler="acme_rt:run", hooks="acme_rt")
    plugins = load_plugins(config)
    assert plugins.scheduler is not None and plugins.scheduler("c") == "c"
    assert plugins.hooks is not None and plugins.hooks.load_runs() == 7
    assert load_plugins(SimpleNamespace(scheduler=None, hooks=None)) == Plugins()


def test_load_plugins_of_a_resolved_config(plugin_dir: Path) -> None:
    module(plugin_dir, "acme_resolved", "def run(ctx):\n    pass\ndef load_runs():\n    pass\n")
    flags = {"scheduler": "acme_resolved:run", "hooks": "acme_resolved"}
    plugins = load_plugins(resolve_config(flags, BASE))
    assert plugins.scheduler is sys.modules["acme_resolved"].run
    assert plugins.hooks == Hooks("acme_resolved", load_runs=sys.modules["acme_resolved"].load_runs)
    with pytest.raises(PluginError) as caught:
        load_plugins(Config(node_id="n", control_api_bases=("http://x",), hooks="acme_unresolved"))
    assert caught.value.setting == "hooks"


def test_load_plugins_says_which_setting_failed(plugin_dir: Path) -> None:
    for field, value in (("scheduler", "acme_gone:run"), ("hooks", "acme_gone")):
        config = SimpleNamespace(**{"scheduler": None, "hooks": None, field: value})
        with pytest.raises(PluginError) as caught:
            load_plugins(config)
        assert caught.value.setting == field
        assert str(caught.value).startswith('cannot import "acme_gone"')


# --- as subprocesses: `config` finds what `start` would --------------------------------------

PLUGINS = {
    "acme_cli/__init__.py": "",
    "acme_cli/jobs.py": "VALUE = 42\ndef run(context):\n    pass\n",
    "acme_cli/hooks.py": "load_runs = 'not a function'\n",
}

CASES = {
    "missing-module": (
        "--scheduler",
        "BAA_CONDUCTOR_SCHEDULER",
        "acme.jobs:run",
        '--scheduler / BAA_CONDUCTOR_SCHEDULER: cannot import "acme.jobs":'
        " No module named 'acme'",
    ),
    "missing-attribute": (
        "--scheduler",
        "BAA_CONDUCTOR_SCHEDULER",
        "acme_cli.jobs:runn",
        '--scheduler / BAA_CONDUCTOR_SCHEDULER: "acme_cli.jobs" has no attribute "runn"',
    ),
    "not-callable": (
        "--scheduler",
        "BAA_CONDUCTOR_SCHEDULER",
        "acme_cli.jobs:VALUE",
        '--scheduler / BAA_CONDUCTOR_SCHEDULER: "acme_cli.jobs:VALUE" is not callable (type int)',
    ),
    "hooks-missing-module": (
        "--hooks",
        "BAA_CONDUCTOR_HOOKS",
        "acme.hooks",
        "--hooks / BAA_CONDUCTOR_HOOKS: cannot import \"acme.hooks\": No module named 'acme'",
    ),
    "hooks-not-callable": (
        "--hooks",
        "BAA_CONDUCTOR_HOOKS",
        "acme_cli.hooks",
        '--hooks / BAA_CONDUCTOR_HOOKS: "acme_cli.hooks.load_runs" is not callable (type str)',
    ),
}


def test_plugin_errors_exit_2_with_one_line_from_config_and_start(tmp_path: Path) -> None:
    for relative, source in PLUGINS.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    workdir = tmp_path / "elsewhere"  # not on sys.path by itself: PYTHONPATH finds the plug-ins
    workdir.mkdir()
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(tmp_path),
        **BASE,
    }
    procs = {}
    for name, (flag, variable, value, _line) in CASES.items():
        for command in ("config", "start"):
            # By flag for one command and by variable for the other, so both sources are seen.
            by_flag = command == "config"
            argv = [command, flag, value] if by_flag else [command]
            env = base_env if by_flag else {**base_env, variable: value}
            procs[name, command] = subprocess.Popen(
                [sys.executable, "-m", "conductord", *argv],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
    for (name, command), proc in procs.items():
        out, err = proc.communicate(timeout=60)
        line = CASES[name][3]
        assert (proc.returncode, out, err) == (2, "", f"conductord: error: {line}\n"), (
            name,
            command,
        )


def test_good_plugins_pass_config(tmp_path: Path) -> None:
    (tmp_path / "acme_good.py").write_text(
        "def run(context):\n    pass\ndef on_lease_state_change(snapshot):\n    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "conductord", "config", "--scheduler", "acme_good:run"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(tmp_path),
            "BAA_CONDUCTOR_HOOKS": "acme_good",
            **BASE,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "scheduler: acme_good:run\n" in result.stdout
    assert "hooks: acme_good\n" in result.stdout
