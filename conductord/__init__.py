"""conductord: a lease daemon for a fleet of conductor nodes.

Library modules never monkey-patch; the process entry points (`conductord.__main__`,
`scripts/run_once.py`) call `gevent.monkey.patch_all()` before anything imports requests.

The embedding API (docs/embedding.md): `conductord.Runtime` and `conductord.SchedulerContext`.
They are loaded on first access, not by `import conductord`, so that importing the package
(as `python -m conductord` does before it patches) never imports requests.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Runtime", "SchedulerContext", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Runtime", "SchedulerContext"):
        from conductord import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'conductord' has no attribute {name!r}")
