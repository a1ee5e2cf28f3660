"""The process instance of a node (SPEC §15): who is speaking, beyond the node id.

Two processes with one node id (a copied config, a cloned image, a supervisor starting a
second copy) must never both lead. Each process therefore has an instance id, sent with every
heartbeat, acquire and release; the reference Control API refuses a live lease to the same
controller id from another instance.

- With `state_dir` set, the id is kept in `state_dir/instance` and the process holds an
  exclusive `flock` on that file while it runs. A second process with the same `state_dir`
  cannot take the lock and exits 2 at once; a node restarted after `kill -9` (the kernel drops
  the lock with the process) reads the same id and resumes its lease.
- Without `state_dir` every start is a new instance: a restarted node waits (standby) until its
  old instance's lease is released or expires, up to one TTL.
- One-shot runs (`diagnose`, `scripts/run_once.py`, `start --run-once`) use a fresh id and take
  no lock: they must never pass for the running daemon.
- `state_dir/exec.lock` (`exec_lock_path`) is the `--exec` guards' lock: a guard holds it while
  any process of its group may run, so the guard of a daemon restarted at once (same instance,
  same term) starts its command only after the old guard's group is gone. The daemon itself
  never holds it.

Limits: `flock` locks are per host; a `state_dir` on a network file system shared by two
machines may not be locked across them (give each machine its own state dir). A server that
ignores `instance_id` gives no such protection.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from dataclasses import dataclass
from typing import IO

INSTANCE_FILE = "instance"
EXEC_LOCK_FILE = "exec.lock"
_VALID_ID = re.compile(r"[0-9a-f]{16,64}")


class InstanceLockError(Exception):
    """The state dir is in use by another process, or unusable; `str()` is one line."""


def new_instance_id() -> str:
    """A fresh random instance id (128 bits, hex)."""
    return secrets.token_hex(16)


@dataclass
class Instance:
    """This process's instance id, and the locked file that keeps it (None: not kept)."""

    instance_id: str
    path: str | None = None
    _handle: IO[str] | None = None

    def close(self) -> None:
        """Release the lock (the kernel also does at exit, however the process ends)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def exec_lock_path(state_dir: str | None) -> str | None:
    """The `--exec` guards' lock file of `state_dir`; None without a state dir."""
    return os.path.join(state_dir, EXEC_LOCK_FILE) if state_dir else None


def ephemeral() -> Instance:
    """A fresh instance for this process only: no file, no lock (one-shot runs)."""
    return Instance(new_instance_id())


def claim(state_dir: str | None) -> Instance:
    """The instance of the daemon: kept and locked in `state_dir`, or fresh without one.

    Raises `InstanceLockError` when another process holds the lock or the file cannot be used.
    """
    if not state_dir:
        return ephemeral()
    path = os.path.join(state_dir, INSTANCE_FILE)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # Not inherited by children (Python's default), so an --exec child never holds it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise InstanceLockError(f"cannot use {path}: {err.strerror or err}") from None
    handle = os.fdopen(fd, "r+", encoding="ascii")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InstanceLockError(
                f"another conductord process is running with state dir {state_dir}"
                f" (it holds the lock on {path}); give each process its own"
                " --state-dir / BAA_STATE_DIR and its own --node-id"
            ) from None
        raise InstanceLockError(f"cannot lock {path}: {err.strerror or err}") from None
    try:
        known = handle.read(256).strip()
    except (OSError, UnicodeDecodeError):
        known = ""
    if _VALID_ID.fullmatch(known):
        return Instance(known, path, handle)
    instance_id = new_instance_id()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(instance_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as err:
        handle.close()
        raise InstanceLockError(f"cannot write {path}: {err.strerror or err}") from None
    return Instance(instance_id, path, handle)
