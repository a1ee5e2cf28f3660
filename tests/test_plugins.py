"""`--scheduler MODULE:CALLABLE` and `--hooks MODULE` (SPEC §14): loading and config errors.

In-process tests load modules written to a temporary directory (each test its own module
names, so the import cache never hides a case).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def test_load_plugins_says_which_setting_failed(plugin_dir: Path) -> None:
    for field, value in (("scheduler", "acme_gone:run"), ("hooks", "acme_gone")):
        config = SimpleNamespace(**{"scheduler": None, "hooks": None, field: value})
        with pytest.raises(PluginError) as caught:
            load_plugins(config)
        assert caught.value.setting == field
        assert str(caught.value).startswith('cannot import "acme_gone"')
