"""conductord: a lease daemon for a fleet of conductor nodes.

Library modules never monkey-patch; the process entry points (`conductord.__main__`,
`scripts/run_once.py`) call `gevent.monkey.patch_all()` before anything imports requests.
"""

__version__ = "0.1.0"
