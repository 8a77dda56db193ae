"""Writer locks: one writer per key of the store (issue 8, A).

A second writer is refused (UsageError, exit 2) with the holder's pid, command and start
time. The lock is a ``flock`` on a file under ``<store>/.locks/`` that holds the owner's pid;
the kernel drops it when the owner dies, so a lock file left by a killed process is stale and
is simply taken over. ``Store.lock`` and ``Store.lock_path`` are the entry points.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import sys
from pathlib import Path

from ep_store import jsonio
from ep_store.errors import UsageError
from ep_store.keys import check_inside
from ep_store.store.layout import LOCKS_DIR

log = logging.getLogger(__name__)


class _Held:
    """Locks this process holds: path -> (fd, depth), so a writer may re-enter its own lock."""

    locks: dict[str, list] = {}


def lock_path(root: Path, target: Path) -> Path:
    """The lock file of a dataset or folder of the store at ``root``: ``.locks/<its relative path>.lock``."""
    resolved = root.resolve()
    rel = check_inside(root, target).resolve().relative_to(resolved)
    return resolved / LOCKS_DIR / (str(rel).replace("/", "~") + ".lock")


@contextlib.contextmanager
def writer_lock(root: Path, target: Path, what: str):
    """Hold the writer lock of ``target`` (inside the store at ``root``) for the ``with`` block;
    refuse if another process holds it.

    Raises UsageError (exit 2) naming the holder (pid, command, start time). A process
    may re-enter a lock it holds (build takes its dictionary's lock, then assigns).
    """
    path = lock_path(root, target)
    name = str(path)
    held = _Held.locks.get(name)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    created_root = not root.exists()
    fd = _acquire(path, what)
    _Held.locks[name] = [fd, 1]
    try:
        yield
    finally:
        del _Held.locks[name]
        # Unlink while still holding the lock; a waiter that opened the old file sees its
        # inode is gone and retries (see _acquire), so no two writers ever hold one key.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty: leave no trace in a DVC output
        if created_root:  # a refused first write leaves no empty store folder behind
            with contextlib.suppress(OSError):
                root.rmdir()


def _acquire(path: Path, what: str) -> int:
    """flock ``path`` (created if needed) without waiting; write our pid, command and start."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # another writer removed the empty .locks folder just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(
                f"{what} is being written by another process (pid {holder.get('pid', '?')}, "
                f"command {holder.get('command', '?')!r}, started {holder.get('started', '?')}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder unlinked the file as we opened it: try the new one
    stale = _read_holder(fd)
    if stale:
        log.warning("taking over the stale lock of %s left by pid %s (%s)", what, stale.get("pid"),
                    stale.get("command"))
    me = {"pid": os.getpid(), "command": " ".join(sys.argv), "what": what,
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, jsonio.dumps(me).encode(), 0)
    os.fsync(fd)
    return fd


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
