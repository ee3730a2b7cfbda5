"""Which kernel backend ``auto`` picks per op family on CUDA tensors, when both can run.

Chosen from measured results, never by timing at run time. The measured table is data,
``dispatch_table.json`` beside this module::

    {"rows": {"default": {"logprobs": "triton", ...}, "9.0": {"logprobs": "cuda", ...}},
     "sources": {"9.0": ["bench/results/h100"]}}

``rows`` maps a GPU's compute capability (``"9.0"``) to a backend per family; ``"default"``
serves capabilities never measured; ``sources`` names the result folders each row came
from. It is read once, on the first ``auto`` choice. Regenerate it from the benchmark
suite's JSON results:

    python -m bench --out bench/results/h100            # on the GPU
    python -m fastrlhf.cuda.dispatch_table bench/results/h100 [more result folders]

which rewrites the JSON file (rows of capabilities not in the given folders are kept). A
family goes to ``cuda`` only when its CUDA kernels are faster than Triton's by ``MARGIN``
(geometric mean over every case and mode both ran), so noise does not flip the choice.
Until measured, every family says ``triton``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from fastrlhf import registry

FAMILIES = registry.family_names("cuda")
"""Op families with CUDA kernels (``fastrlhf.registry``); any other family always goes to triton."""
RENAMED = {"ppo": "policy_loss"}
"""Family names of older benchmark results: the family they are now."""
MARGIN = 0.97
"""cuda is picked when its time is below ``MARGIN`` x Triton's (geometric mean)."""
BACKENDS = ("triton", "cuda")
PATH = Path(__file__).with_name("dispatch_table.json")
"""The measured table shipped with the package."""
DEFAULT_ROW = dict.fromkeys(FAMILIES, "triton")
"""The row of a capability never measured, and the whole table when the file is absent."""


def _capability(capability: str | tuple[int, int] | None) -> str:
    if isinstance(capability, tuple):
        return f"{capability[0]}.{capability[1]}"
    return capability or "default"


def validate(doc: object, where: str = "dispatch table") -> dict:
    """``doc`` (a loaded JSON document) checked: ``rows`` of capability -> family -> backend
    with a ``default`` row, and ``sources`` of capability -> list of folder names. Raises
    ``ValueError`` naming ``where`` and what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), dict):
        raise ValueError(f"{where}: expected an object with a 'rows' object, got {type(doc).__name__}")
    rows, sources = doc["rows"], doc.get("sources", {})
    if "default" not in rows:
        raise ValueError(f"{where}: 'rows' must have a 'default' row, got {sorted(rows)}")
    for capability, row in rows.items():
        if not isinstance(row, dict) or any(k not in FAMILIES or v not in BACKENDS for k, v in row.items()):
            raise ValueError(f"{where}: row {capability!r} must map families {FAMILIES} to one of "
                             f"{BACKENDS}, got {row!r}")
    if not isinstance(sources, dict) or not all(isinstance(v, list) for v in sources.values()):
        raise ValueError(f"{where}: 'sources' must map capabilities to lists of folders, got {sources!r}")
    return {"rows": rows, "sources": sources}


def load(path: str | Path = PATH) -> dict:
    """The table at ``path`` (validated); an absent file is the table of one ``default`` row
    of ``DEFAULT_ROW`` (nothing measured: triton everywhere)."""
    path = Path(path)
    if not path.is_file():
        return {"rows": {"default": dict(DEFAULT_ROW)}, "sources": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate(doc, str(path))


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The shipped table, read once per process."""
    return load(PATH)


def choose(tab: dict, family: str, capability: str | tuple[int, int] | None = None) -> str:
    """``"triton"`` or ``"cuda"`` for op ``family`` on compute ``capability`` in table ``tab``."""
    rows = tab["rows"]
    row = rows.get(_capability(capability), rows["default"])
    return row.get(family, "triton")


def preferred(family: str, capability: str | tuple[int, int] | None = None) -> str:
    """``"triton"`` or ``"cuda"``: the faster kernel backend for op ``family`` on a GPU of
    compute ``capability`` (``"9.0"`` or ``(9, 0)``; ``None``: the default row), from the
    shipped table. The caller still checks that the chosen backend is available."""
    return choose(table(), family, capability)


def table_from_records(records: list[dict]) -> dict[str, str]:
    """Per family with CUDA kernels: ``"cuda"`` when ``fastrlhf-cuda`` beat ``fastrlhf-triton``
    by ``MARGIN`` (geometric mean of the time ratios over the cases and modes both ran),
    else ``"triton"``. ``records``: the benchmark suite's records (family, op, case, mode,
    provider, status, ms)."""
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.get("status") == "ok" and r.get("provider") in ("fastrlhf-triton", "fastrlhf-cuda"):
            family = RENAMED.get(r["family"], r["family"])
            times[(family, r["op"], r["case"], r["mode"])][r["provider"]] = float(r["ms"])
    logs: dict[str, list[float]] = defaultdict(list)
    for (family, *_), t in times.items():
        if len(t) == 2 and t["fastrlhf-triton"] > 0 and t["fastrlhf-cuda"] > 0:
            logs[family].append(math.log(t["fastrlhf-cuda"] / t["fastrlhf-triton"]))
    out = dict(DEFAULT_ROW)
    for family, values in logs.items():
        if family in out and math.exp(sum(values) / len(values)) < MARGIN:
            out[family] = "cuda"
    return out


def _shown(folder) -> str:
    """``folder`` relative to the working directory when inside it (as the docs name it)."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def regenerate(result_dirs: list[str], path: str | Path = PATH) -> dict:
    """Rebuild the table at ``path`` from benchmark result folders (one per GPU kind:
    ``<op>.json`` files with ``env.sm`` and ``records``), write it and return it.
    Capabilities measured before and not in ``result_dirs`` keep their rows."""
    tab = load(path)
    rows, sources = dict(tab["rows"]), dict(tab["sources"])
    for folder in result_dirs:
        docs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
        sms = {d.get("env", {}).get("sm") for d in docs} - {None}
        if len(sms) != 1:
            raise ValueError(f"{folder}: expected results of one GPU kind (env.sm), found {sorted(sms)}")
        sm = sms.pop()
        rows[sm] = table_from_records([r for d in docs for r in d.get("records", [])])
        sources[sm] = [_shown(folder)]
    out = validate({"rows": dict(sorted(rows.items())), "sources": dict(sorted(sources.items()))})
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    if Path(path) == PATH:
        table.cache_clear()
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m fastrlhf.cuda.dispatch_table RESULT_DIR [RESULT_DIR ...]")
    result = regenerate(sys.argv[1:])
    for capability, row in result["rows"].items():
        print(capability, row)
    print(f"wrote {PATH}")
