"""Python plug-ins named on the command line: `--scheduler MODULE:CALLABLE` and `--hooks MODULE`.

Design: a plug-in is found the way `import` finds a module (installed packages, PYTHONPATH; with
`python -m conductord` also the current directory), loaded with `importlib.import_module`, and
checked at once: the module imports, the named attributes exist and are callable. Config
resolution calls `load_scheduler` / `load_hooks` so that `conductord config` finds every
mistake `start` would (SPEC §14); the runtime calls `load_plugins(config)` for the loaded
callables, which come from the module cache the second time.

- Scheduler: `MODULE:CALLABLE`, where CALLABLE may be a dotted path (`jobs:Scheduler.run`).
  The runtime calls it with a `SchedulerContext` every `--scheduler-interval-ms` while leader.
- Hooks: a module with any of `load_runs()`, `reconcile_runs()` and
  `on_lease_state_change(snapshot)`. Each is optional, but an attribute of one of those names
  that is not callable is an error, and so is a module that defines none of them (most likely
  the wrong module).

Errors are `PluginError`, one line without the setting's name (config.py prefixes the flag and
the variable); `setting` says which setting failed when `load_plugins` raised it.

Limits: importing runs the module's top-level code, in `config` and `diagnose` too; a module
that starts threads or opens connections on import does so there as well. A module is imported
once per process: editing it needs a restart.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from conductord.config import Config

__all__ = [
    "HOOK_NAMES",
    "Hooks",
    "PluginError",
    "Plugins",
    "load_hooks",
    "load_plugins",
    "load_scheduler",
]

HOOK_NAMES: Final = ("load_runs", "reconcile_runs", "on_lease_state_change")


class PluginError(Exception):
    """A plug-in that cannot be loaded. `str()` is one line; `setting` is "scheduler" or
    "hooks" when raised by `load_plugins`, else None."""

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Hooks:
    """The callables a `--hooks` module supplies; an absent one is None."""

    module: str
    load_runs: Callable[[], Any] | None = None
    reconcile_runs: Callable[[], Any] | None = None
    on_lease_state_change: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True)
class Plugins:
    """What `--scheduler` and `--hooks` loaded; None where the setting is not given."""

    scheduler: Callable[..., Any] | None = None
    hooks: Hooks | None = None


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PluginError(f'cannot import "{module}": {err}') from None
    except SystemExit as err:
        raise PluginError(f'cannot import "{module}": it called sys.exit({err.code!r})') from None
    except Exception as err:  # whatever its top-level code raised: a SyntaxError, a bug
        raise PluginError(f'cannot import "{module}": {type(err).__name__}: {err}') from None


_MISSING: Final = object()


def _attribute(owner: Any, name: str, owner_name: str, *, optional: bool = False) -> Any:
    """`owner.name`; a missing one raises `PluginError` (or gives `_MISSING` if optional)."""
    try:
        return getattr(owner, name)
    except AttributeError:
        if optional:
            return _MISSING
        raise PluginError(f'"{owner_name}" has no attribute "{name}"') from None
    except Exception as err:  # a module-level __getattr__ or a property that raised
        raise PluginError(
            f'"{owner_name}.{name}" cannot be read: {type(err).__name__}: {err}'
        ) from None


def load_scheduler(spec: str) -> Callable[..., Any]:
    """The callable named by `MODULE:CALLABLE`; raises `PluginError`."""
    module_name, sep, path = spec.strip().partition(":")
    if not sep or not _is_dotted_name(module_name) or not _is_dotted_name(path):
        raise PluginError(f'"{spec}" is not MODULE:CALLABLE, e.g. acme.jobs:run')
    target = _import(module_name)
    names = path.split(".")
    for depth, name in enumerate(names):
        owner = module_name if depth == 0 else f"{module_name}:{'.'.join(names[:depth])}"
        target = _attribute(target, name, owner)
    if not callable(target):
        raise PluginError(f'"{spec}" is not callable (type {type(target).__name__})')
    return target


def load_hooks(module: str) -> Hooks:
    """The hooks of `module` (a module name, no `:`); raises `PluginError`."""
    module_name = module.strip()
    if ":" in module_name:
        raise PluginError(
            f'"{module}" is MODULE:CALLABLE; --hooks takes a module name such as acme.hooks'
        )
    if not _is_dotted_name(module_name):
        raise PluginError(f'"{module}" is not a module name such as acme.hooks')
    loaded = _import(module_name)
    found: dict[str, Callable[..., Any]] = {}
    for name in HOOK_NAMES:
        hook = _attribute(loaded, name, module_name, optional=True)
        if hook is _MISSING:
            continue
        if not callable(hook):
            raise PluginError(
                f'"{module_name}.{name}" is not callable (type {type(hook).__name__})'
            )
        found[name] = hook
    if not found:
        raise PluginError(f'"{module_name}" defines none of {", ".join(HOOK_NAMES)}')
    return Hooks(module=module_name, **found)


def load_plugins(config: Config) -> Plugins:
    """The plug-ins `config.scheduler` and `config.hooks` name; raises `PluginError`.

    Config resolution has already loaded them once, so for a resolved config this cannot fail
    and costs a dictionary look-up; a `Config` built directly is checked here.
    """
    scheduler = hooks = None
    if config.scheduler is not None:
        try:
            scheduler = load_scheduler(config.scheduler)
        except PluginError as err:
            raise PluginError(str(err), setting="scheduler") from None
    if config.hooks is not None:
        try:
            hooks = load_hooks(config.hooks)
        except PluginError as err:
            raise PluginError(str(err), setting="hooks") from None
    return Plugins(scheduler=scheduler, hooks=hooks)
