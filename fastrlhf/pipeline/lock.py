"""An exclusive lock on the output folder: one run at a time writes into it.

``<out>/fastrlhf.lock`` is locked with ``flock`` by the main process for as long as a stage
(or the demo) runs, and says who holds it. The operating system releases the lock when the
holder ends, however it ends (even SIGKILL), so there is nothing stale to clean up; a worker
that outlived a killed ``torchrun`` still holds it, and a new run is refused until it is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys

from fastrlhf.pipeline.distributed import DistInfo, broadcast
from fastrlhf.pipeline.errors import PipelineError

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

FILE = "fastrlhf.lock"
_held: dict[str, list] = {}
"""Locks this process holds: real path -> [file descriptor, depth] (re-entrant: the demo holds
the lock while its stages take it again)."""


def _acquire(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(out_dir, FILE))
    if path in _held:
        _held[path][1] += 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with os.fdopen(fd) as f:
            try:
                who = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                who = {}
        holder = (f"pid {who.get('pid', '?')} on {who.get('host', '?')}, running `{who.get('command', '?')}` "
                  f"since {who.get('started', '?')}")
        raise PipelineError(f"output folder {out_dir!r} is in use by another fastrlhf run ({holder}); wait for "
                            "it to end or stop it, or pass another --out") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["fastrlhf", *sys.argv[1:]]),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[path] = [fd, 1]


def _release(out_dir: str) -> None:
    path = os.path.realpath(os.path.join(out_dir, FILE))
    _held[path][1] -= 1
    if _held[path][1] == 0:
        fd, _ = _held.pop(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def output_lock(out_dir: str, dist: DistInfo):
    """Hold the lock on ``out_dir`` in the block: the main process takes it, every process
    raises the same :class:`PipelineError` when another run holds it."""
    error = None
    if dist.is_main and fcntl is not None:
        try:
            _acquire(out_dir)
        except (PipelineError, OSError) as e:
            error = str(e)
    error = broadcast(error, dist)
    if error:
        raise PipelineError(error)
    try:
        yield
    finally:
        if dist.is_main and fcntl is not None:
            _release(out_dir)
