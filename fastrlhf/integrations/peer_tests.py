"""Run the unit tests that verl and OpenRLHF ship in their wheels against fastrlhf's drop-ins.

``python -m fastrlhf.integrations.peer_tests verl|openrlhf [--backend torch|triton] [--cache DIR] [-- PYTEST_ARGS]``
downloads the peer's released wheel (``pip download --no-deps``, with the few
packages its modules import), unpacks it under ``--cache`` (default ``.cache/peers``), and runs
the test files it ships for the functions fastrlhf replaces, in a separate pytest process with
the drop-ins swapped in through the public patch functions (:func:`register_with_verl` with
``override=True``, :func:`patch_openrlhf`). The peers' assertions are unchanged. Modules of
their distributed infrastructure that these tests never call (Ray, DeepSpeed, web servers) are
stood in by empty modules when they are not installed. The exit status is pytest's; a test that
fails where a documented difference (:data:`PEERS` ``differences``) says it must is an expected
failure (``xfail``), one that passes there fails the run (``strict``), so a change either way shows.

This module is also that pytest process's plugin (``-p fastrlhf.integrations.peer_tests``, the
peer named by ``FASTRLHF_PEER``).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PEERS", "Peer", "fetch", "main", "run"]


@dataclass(frozen=True)
class Peer:
    """A peer release whose shipped tests run against fastrlhf."""

    requirement: str
    """The wheel, e.g. ``"verl==0.9.1"``."""
    deps: tuple[str, ...]
    """Packages its tested modules import that a fastrlhf test environment may lack (fetched
    the same way, ``--no-deps``)."""
    tests: tuple[str, ...]
    """Test files, relative to the unpacked wheel, that exercise the swapped functions."""
    stand_ins: tuple[str, ...]
    """Top-level modules replaced by empty stand-ins when not installed."""
    own: tuple[str, ...] = ()
    """fastrlhf's own parity tests against the real peer (``tests/`` of this repository), run in
    the same process; copied next to the peer's tests (they cannot import this repository's
    ``tests`` package, whose name the peers' wheels use too)."""
    differences: dict = field(default_factory=dict)
    """Test node id (relative) -> why fastrlhf differs there on purpose (README lists each)."""


PEERS = {
    "verl": Peer(
        requirement="verl==0.9.1",
        deps=("omegaconf==2.4.0", "tensordict==0.10.0", "pyvers", "importlib_metadata", "zipp", "cloudpickle", "orjson"),
        tests=("tests/trainer/ppo/test_core_algos_on_cpu.py", "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
               "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
               "tests/trainer/ppo/test_rollout_corr_integration.py",
               "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
               "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",
               "tests/trainer/test_multi_trajectories_advantage_on_cpu.py"),
        stand_ins=("ray", "codetiming", "transfer_queue", "hydra", "cachetools", "uvicorn", "fastapi", "torchdata",
                   "aiohttp", "peft", "wandb"),
        own=("tests/test_integrations_verl_peer.py",),
    ),
    "openrlhf": Peer(
        requirement="openrlhf==0.11.2",
        deps=(),
        tests=("tests/test_kl_estimator_gradient.py", "tests/test_loss_aggregation.py",
               "tests/test_reward_shaping.py"),
        stand_ins=("deepspeed", "aiohttp", "ray"),
        own=("tests/test_integrations_openrlhf_peer.py",),
    ),
}


# ------------------------------------------------------------------------------ fetching
def fetch(name: str, cache: str | os.PathLike = ".cache/peers") -> Path:
    """Download (``pip download --no-deps``) and unpack peer ``name`` and its :attr:`Peer.deps`
    into ``cache/<name>``; returns the unpacked directory (reused when already there). Raises
    ``RuntimeError`` with pip's message when the download fails."""
    peer = PEERS[name]
    root = Path(cache).resolve() / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        _lock(lock)  # concurrent test workers fetch once
        return _fetch(peer, root)


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX): no lock
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def _fetch(peer: Peer, root: Path) -> Path:
    site = root / "site"
    done = root / "unpacked"
    stamp = " ".join((peer.requirement, *peer.deps))  # a changed list of packages fetches again
    if done.exists() and done.read_text().strip() == stamp:
        return site
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           peer.requirement, *peer.deps]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"pip download {peer.requirement} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    tmp = root / "site.tmp"
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
    for data in tmp.glob("*.data"):  # a wheel's purelib / platlib trees belong at the top
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else ():
                target = tmp / item.name
                if not target.exists():
                    item.rename(target)
    if site.exists():
        _rmtree(site)
    tmp.rename(site)
    done.write_text(stamp + "\n")
    return site


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run(name: str, *, backend: str = "torch", cache: str | os.PathLike = ".cache/peers", junit: str | None = None,
        extra: tuple[str, ...] = (), own: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run peer ``name``'s shipped tests with fastrlhf swapped in (``FASTRLHF_BACKEND=backend``), in
    a new process whose working directory is the unpacked wheel; with ``own`` also fastrlhf's
    parity tests against the peer (:attr:`Peer.own`). Returns the finished process
    (``returncode`` is pytest's, output captured)."""
    site = fetch(name, cache)
    peer = PEERS[name]
    here = Path(__file__).resolve().parents[2]  # the directory holding the fastrlhf package
    parity = peer.own if own else ()
    own = []
    for rel in parity:
        src = here / rel
        if src.is_file():
            dst = site / "fastrlhf_parity" / src.name
            dst.parent.mkdir(exist_ok=True)
            dst.write_bytes(src.read_bytes())
            own.append(str(dst.relative_to(site)))
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # none of the installed pytest plugins is needed (faster start)
           **os.environ, "FASTRLHF_PEER": name, "FASTRLHF_BACKEND": backend,
           "PYTHONPATH": os.pathsep.join([str(site), str(here), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if backend == "triton" and "TRITON_INTERPRET" not in env:
        import torch

        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fastrlhf.integrations.peer_tests",
           "-o", "addopts=", "-o", "xfail_strict=true", "--rootdir", str(site), "-W", "ignore::DeprecationWarning",
           *([f"--junitxml={junit}"] if junit else []), *peer.tests, *own, *extra]
    return subprocess.run(cmd, cwd=site, env=env, capture_output=True, text=True, timeout=timeout, check=False)


# -------------------------------------------------------------------- the pytest plugin
class _StandIn(types.ModuleType):
    """An empty module whose every attribute is a new placeholder class (usable as a base class,
    a decorator, a type annotation or a callable that returns another placeholder)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Placeholder,), {})


class _Placeholder:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _Placeholder()

    def __getattr__(self, name):
        return _Placeholder()

    def __class_getitem__(cls, item):
        return cls

    def __getitem__(self, item):
        return _Placeholder()


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: answers only for the named top-level modules nothing else found."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _peer() -> Peer | None:
    return PEERS.get(os.environ.get("FASTRLHF_PEER", ""))


def pytest_configure(config):
    peer = _peer()
    if peer is None:
        return
    sys.meta_path.append(_StandIns(peer.stand_ins))
    if os.environ["FASTRLHF_PEER"] == "verl":
        from fastrlhf.integrations.verl import register_with_verl

        # before the test modules import verl's names
        config._fastrlhf_patch = register_with_verl(override=True)


def pytest_collection_modifyitems(session, config, items):
    import pytest

    peer = _peer()
    if peer is None:
        return
    for item in items:
        why = peer.differences.get(item.nodeid)
        if why is not None:
            item.add_marker(pytest.mark.xfail(reason=f"documented difference: {why}", strict=True))


def pytest_collection_finish(session):
    if os.environ.get("FASTRLHF_PEER") == "openrlhf":
        from fastrlhf.integrations.openrlhf import patch_openrlhf

        # the test modules load OpenRLHF's files under their own names and bind its names
        modules = {id(item.module): item.module for item in session.items if getattr(item, "module", None)}
        session.config._fastrlhf_patch = patch_openrlhf(*modules.values())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    patch = getattr(config, "_fastrlhf_patch", None)
    if patch is None:
        return
    if os.environ.get("FASTRLHF_PEER") == "verl":  # a VerlRegistration
        names = sorted({key for _, key, _, _ in patch.entries} | {name for _, _, name in patch.swaps if name})
    else:  # an OpenRLHFPatch
        names = sorted({name for _, name in patch.swaps})
    terminalreporter.write_line(f"fastrlhf drop-ins in place ({os.environ.get('FASTRLHF_PEER')}, backend "
                                f"{os.environ.get('FASTRLHF_BACKEND', 'auto')}): {', '.join(names)}")


def _pytest_runtest_call(item):
    """OpenRLHF modules a fixture loaded for this test (outside ``sys.modules``) are patched too."""
    if os.environ.get("FASTRLHF_PEER") == "openrlhf":
        from fastrlhf.integrations.openrlhf import patch_openrlhf

        loaded = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, types.ModuleType)]
        if loaded:
            patch_openrlhf(*loaded)


try:  # a hook wrapper only where pytest is importable (this module is also imported without it)
    import pytest as _pytest

    @_pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(item):
        _pytest_runtest_call(item)
except ImportError:  # pragma: no cover
    pass


# ---------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrlhf.integrations.peer_tests", description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--backend", default="torch", help="FASTRLHF_BACKEND for the run (torch, triton, auto)")
    parser.add_argument("--cache", default=".cache/peers")
    parser.add_argument("--no-own", action="store_true", help="only the peer's shipped tests, not fastrlhf's parity tests")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more pytest arguments, after --
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    proc = run(args.peer, backend=args.backend, cache=args.cache, extra=tuple(extra), own=not args.no_own)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
