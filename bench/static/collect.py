"""Build every report row: capture the Triton launches, compile each distinct specialization
and each ``kernels/*.cu`` once per arch (in parallel processes), analyze, predict.

Launches of a case that specialize identically are one row (``launches`` counts them);
when one kernel has several specializations in a case, each is a row whose ``variant``
names the arguments that differ (``[LOAD_ACC=True]``). A kernel that does not compile is a
row with ``compiled: 0`` and the compiler's ``error``.
"""

from __future__ import annotations

import fnmatch
import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor

from bench.static import build, capture, cases, sass
from bench.static.analyze import analyze
from bench.static.hardware import SM_COUNT
from bench.static.predict import predict

_JOBS: list = []  # (kind, payload, arch), read by the forked workers


class CompileError(str):
    """The last lines of a compiler's error (a failed job's result)."""


def _job(i: int):
    kind, payload, arch = _JOBS[i]
    try:
        return build.compile_triton(payload, arch) if kind == "triton" else build.compile_cuda(payload, arch)
    except Exception as e:  # noqa: BLE001  (any compiler failure is a finding of the report)
        text = getattr(e, "stderr", None) or str(e)
        return CompileError("\n".join(text.strip().splitlines()[-6:]))


def _compile_all(jobs: list, workers: int | None) -> list:
    _JOBS[:] = jobs
    context = multiprocessing.get_context("fork")  # workers inherit the captured launches
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=context) as pool:
        return list(pool.map(_job, range(len(jobs))))


# ---------------------------------------------------------------------------------- Triton
def _describe(spec: capture.Specialization) -> dict[str, str]:
    """Argument name -> how it is specialized: type, ``/16`` when aligned, or the constant."""
    out = {}
    for i, (name, ty) in enumerate(spec.signature.items()):
        if ty == "constexpr":
            out[name] = repr(spec.constexprs.get((i,)))
        else:
            out[name] = ty + ("/16" if spec.attrs.get((i,)) else "")
    return out


def _variants(launches: list, arch: int) -> list[tuple]:
    """Distinct ``(launch, spec, count, variant label)`` of a case's launches, in launch order."""
    groups: dict[tuple, list] = {}
    for launch in launches:
        spec = capture.specialize(launch, arch)
        groups.setdefault((launch.fn, spec.key()), []).append((launch, spec))
    out = []
    for (fn, _), members in groups.items():
        launch, spec = members[0]
        siblings = [m[0][1] for k, m in groups.items() if k[0] is fn]
        label = ""
        if len(siblings) > 1:
            mine, others = _describe(spec), [_describe(s) for s in siblings]
            diff = [k for k in mine if any(o.get(k) != mine[k] for o in others)]
            label = "[" + ",".join(f"{k}={mine[k]}" for k in diff) + "]"
        out.append((launch, spec, len(members), label))
    return out


def _triton_row(case: cases.TritonCase, launch, spec, n: int, label: str, arch: int, binary) -> dict:
    if launch.name not in cases.KERNELS:
        raise KeyError(f"{launch.name} (launched by {case.name}): add how to count it to cases.KERNELS")
    row = {"case": case.name, "kernel": launch.name, "variant": label, "backend": "triton", "arch": arch,
           "element": case.element, "launches": n, "grid": list(launch.grid),
           "num_warps": spec.options.get("num_warps"), "num_stages": spec.options.get("num_stages"),
           "specialization": _describe(spec)}
    if isinstance(binary, CompileError):
        return {**row, "compiled": 0, "error": str(binary)}
    rule = cases.KERNELS[launch.name]
    names = list(spec.signature)
    constexprs = {names[k[0]]: v for k, v in spec.constexprs.items()}
    threads = 32 * binary.num_warps
    per_program = math.prod(b if isinstance(b, int) else constexprs[b] for b in rule.block) if rule.block else None
    row.update(compiled=1, **analyze(binary.dump.sass, binary.dump.res_usage, binary.function, arch=arch,
                                     threads=threads, dynamic_shared=binary.dynamic_shared, mode=rule.mode,
                                     elems_per_thread=per_program / threads if per_program else None))
    blocks = row["occupancy"]["blocks"]
    row["waves"] = round(math.prod(launch.grid) / (SM_COUNT * blocks), 3) if blocks else None
    row["prediction"] = _prediction(row, case.bytes_per_elem.get(launch.name))
    return row


def _prediction(row: dict, bytes_per_elem: float | None) -> dict | None:
    if row["arch"] != 90 or not bytes_per_elem or not row["count"]:
        return None
    return predict(bytes_per_elem, row["count"]["per_elem"])


# ------------------------------------------------------------------------------------ CUDA
def short_name(demangled: str) -> str:
    """``gae_kernel<float, false>`` from ``void fastrlhf::(anonymous namespace)::gae_kernel<float,
    false>(long, ...)``: the function and its template arguments."""
    demangled = re.sub(r"(?:\w+::|\(anonymous namespace\)::)+", "", demangled)  # namespaces, also in arguments
    m = re.search(r"(\w+(?:<[^()]*>)?)\(", demangled)
    return m.group(1) if m else demangled


def _cuda_rows(source: str, dump, arch: int, only: str) -> list[dict]:
    selected = [c for c in cases.CUDA_CASES if c.source == source and fnmatch.fnmatchcase(c.name, only)]
    base = {"variant": "", "backend": "cuda", "arch": arch, "launches": None, "grid": None,
            "num_stages": None, "specialization": None, "waves": None}
    if isinstance(dump, CompileError):
        return [{**base, "case": f"cuda.all.{source}", "kernel": source, "element": None, "num_warps": None,
                 "compiled": 0, "error": str(dump)}]
    functions = list(sass.parse(dump.sass))
    names = {f: short_name(n) for f, n in build.demangle(functions).items()}
    rows, covered = [], set()
    for case in selected:
        match = [f for f in functions if names[f] == case.kernel]
        if len(match) != 1:
            raise RuntimeError(f"{case.name}: {len(match)} functions in {source} are {case.kernel!r}")
        covered.add(match[0])
        row = {**base, "case": case.name, "kernel": case.kernel, "element": case.element,
               "num_warps": case.threads // 32, "notes": case.notes, "compiled": 1,
               **analyze(dump.sass, dump.res_usage, match[0], arch=arch, threads=case.threads,
                         dynamic_shared=0, mode="loop", elems_per_thread=case.elems_per_iter)}
        row["prediction"] = _prediction(row, case.bytes_per_elem)
        rows.append(row)
    if fnmatch.fnmatchcase(f"cuda.all.{source}", only):
        for f in functions:  # every other instantiation: resources, spills, its main loop
            if f not in covered:
                row = {**base, "case": f"cuda.all.{source}", "kernel": names[f], "element": None,
                       "num_warps": None, "compiled": 1,
                       **analyze(dump.sass, dump.res_usage, f, arch=arch, threads=256, dynamic_shared=0,
                                 mode="loop", elems_per_thread=None), "prediction": None}
                row["occupancy"] = None  # the block size is the launcher's: see the case rows
                rows.append(row)
    return rows


def _cu_files() -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(build.ROOT, "kernels")) if f.endswith(".cu"))


# --------------------------------------------------------------------------------- driver
def collect(archs: list[int], only: str = "*", workers: int | None = None) -> list[dict]:
    """Every report row for ``archs``, cases filtered by the ``fnmatch`` pattern ``only``
    (``cuda.all.<file>.cu`` selects a file's other CUDA instantiations)."""
    captured = []
    for case in cases.TRITON_CASES:
        if fnmatch.fnmatchcase(case.name, only):
            with capture.capture() as launches:
                cases.run_launcher(case)
            captured.append((case, launches))
    jobs, index = [], {}
    for _, launches in captured:
        for arch in archs:
            for launch, spec, _, _ in _variants(launches, arch):
                key = ("triton", spec.key(), launch.fn, arch)
                if key not in index:
                    index[key] = len(jobs)
                    jobs.append(("triton", launch, arch))
    sources = sorted({c.source for c in cases.CUDA_CASES if fnmatch.fnmatchcase(c.name, only)}
                     | {f for f in _cu_files() if fnmatch.fnmatchcase(f"cuda.all.{f}", only)})
    for arch in archs:
        for source in sources:
            index[("cuda", source, arch)] = len(jobs)
            jobs.append(("cuda", source, arch))
    results = _compile_all(jobs, workers)
    rows = []
    for arch in archs:
        for case, launches in captured:
            for launch, spec, n, label in _variants(launches, arch):
                binary = results[index[("triton", spec.key(), launch.fn, arch)]]
                rows.append(_triton_row(case, launch, spec, n, label, arch, binary))
        for source in sources:
            rows += _cuda_rows(source, results[index[("cuda", source, arch)]], arch, only)
    return rows


def uncovered(rows: list[dict]) -> list[str]:
    """``module.name`` of every ``@triton.jit`` function named ``*_kernel`` (the project's
    convention for launchable kernels) in ``fastrlhf.triton`` that no Triton row compiled."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastrlhf.triton

    seen = {r["kernel"] for r in rows if r["backend"] == "triton"}
    out = []
    for info in pkgutil.iter_modules(fastrlhf.triton.__path__):
        module = importlib.import_module(f"fastrlhf.triton.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and name not in seen:
                out.append(f"{info.name}.{name}")
    return sorted(out)
