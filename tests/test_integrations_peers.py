"""The unit tests verl 0.9.1 and OpenRLHF 0.11.2 ship, run against fastrlhf's drop-ins.

Each test downloads the peer's wheel (``pip download --no-deps``, cached in the git-ignored
``.cache/peers``) and runs the shipped test files of the functions fastrlhf replaces, with the
drop-ins swapped in through the public patch functions (``register_with_verl(override=True)``,
``patch_openrlhf()``), in a separate pytest process (``fastrlhf.integrations.peer_tests``), once
per backend. On ``torch`` fastrlhf's own parity tests against the real peer
(``test_integrations_verl_peer.py``, ``test_integrations_openrlhf_peer.py``) run in the same
process; on ``triton`` (interpreted on a CPU) the peers' shipped tests run alone: the parity tests
there would mostly repeat what ``test_integrations_verl.py`` / ``test_integrations_openrlhf.py``
check on every backend against transcriptions of the same releases, at twice the run time.

A regression (a failure, an error, a test count other than today's) fails here; a documented
difference is an expected failure there. Skipped, with the reason, when the package registry
cannot be reached or ``FASTRLHF_PEER_TESTS=0``.
"""

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fastrlhf.integrations import peer_tests
from tests.conftest import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "peers"

SHIPPED = {"verl": 75, "openrlhf": 60}
"""Tests the peers ship in the selected files (all pass against fastrlhf; no documented difference
fails one of them today)."""
OWN = {"verl": 110, "openrlhf": 59}
"""fastrlhf's parity tests against the real peer in the same run."""


def _counts(junit: Path):
    """``{file: (tests, failures, errors, skipped)}`` from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        key = "own" if "fastrlhf_parity" in case.get("classname", "") else "shipped"
        t, f, e, s = out.get(key, (0, 0, 0, 0))
        kinds = {child.tag for child in case}
        out[key] = (t + 1, f + ("failure" in kinds), e + ("error" in kinds), s + ("skipped" in kinds))
    return out


@pytest.mark.parametrize("backend", ["torch"] + [b for b in BACKENDS if b == "triton"])
@pytest.mark.parametrize("peer", sorted(peer_tests.PEERS))
def test_peer_shipped_tests_pass_with_fastrlhf(peer, backend, tmp_path):
    if os.environ.get("FASTRLHF_PEER_TESTS", "1") == "0":
        pytest.skip("FASTRLHF_PEER_TESTS=0")
    try:
        peer_tests.fetch(peer, CACHE)
    except RuntimeError as e:
        pytest.skip(f"cannot download {peer_tests.PEERS[peer].requirement} (package registry unreachable?): {e}")
    junit = tmp_path / "junit.xml"
    own = backend == "torch"
    proc = peer_tests.run(peer, backend=backend, cache=CACHE, junit=str(junit), own=own, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{peer} tests against fastrlhf ({backend}) failed:\n{tail}"
    counts = _counts(junit)
    shipped = counts.get("shipped", (0, 0, 0, 0))
    parity = counts.get("own", (0, 0, 0, 0))
    assert shipped[0] == SHIPPED[peer] and parity[0] == (OWN[peer] if own else 0), \
        f"test counts changed: {counts}\n{tail}"
    assert shipped[1:3] == (0, 0) and parity[1:3] == (0, 0), tail
    assert "fastrlhf drop-ins in place" in proc.stdout
