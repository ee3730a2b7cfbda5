"""The two runs of ``python -m bench.e2e``: on a device (``run_device``: times, peaks, parity,
frontier; ``--smoke`` on the CPU) and on fake tensors (``run_memory``). Each writes one JSON
per (model, method[, checkpointing]) after every measurement, then ``results.md`` and plots.
Imports torch lazily: the CLI sets ``TRITON_INTERPRET`` first for CPU runs."""

from __future__ import annotations

import gc
import importlib.metadata
import shlex
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
GPU_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-1b", "llama-3.2-3b", "gemma-2-2b")
MEMORY_MODELS = ("qwen2.5-1.5b", "qwen2.5-7b")
SMOKE_MODELS = ("tiny-qwen2", "tiny-gemma2")
FAKE_VARIANTS = ("naive", "trl", "fastrlhf")
FRONTIER_ORDER = ("fastrlhf", "naive", "trl", "liger", "trl+fastrlhf")
"""The order frontiers are searched in (a time budget may end the list)."""


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _modes(args, default: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing or default]


def _grid(args) -> list[int]:
    return sorted(args.lengths or [1024 * 2**i for i in range(6)])


def _finish(out: Path, command: list[str], banner: str = "") -> None:
    from bench.e2e import report

    paths = report.render_dir(out)
    print(f"\nwrote {paths['results']} and {len(paths['plots'])} plot(s) under {out}\n")
    print(paths["results"].read_text())
    if banner:
        print(banner)
    print(f"command: {shlex.join(command)}")


# --------------------------------------------------------------------------- memory
def run_memory(args, command, deadline) -> int:
    import torch

    from bench.e2e import memory, report, variants
    from bench.e2e.phase import GROUP, PROMPT_LEN
    from bench.measure import environment

    out = args.out or RESULTS / "memory-fake"
    out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"), command)
    budget = int(args.budget_gib * 2**30)
    prompt_len = args.prompt_len or PROMPT_LEN
    by_name = {v.name: v for v in variants.all_variants(args.backend)}
    print(f"{report.FAKE_BANNER}\nbudget {args.budget_gib:g} GiB; lengths {_grid(args)}; results -> {out}",
          flush=True)
    for model in args.models or MEMORY_MODELS:
        for method in args.methods or ["grpo"]:
            stem = f"memory-{model}-{method}"
            meta = {"kind": "memory", "stem": stem, "model": model, "method": method, "env": env,
                    "claims_numbers": False, "budget_bytes": budget, "breakdown_len": args.breakdown_len,
                    "batch": f"{GROUP} × ({prompt_len} + L) tokens", "prompt_len": prompt_len,
                    "transformers": _version("transformers"), "trl": _version("trl"), "lengths": _grid(args)}
            records: list[dict] = []
            for ckpt in _modes(args, "both"):
                bench = memory.FakeBench(model, method, checkpointing=ckpt, prompt_len=prompt_len)
                for name in args.variants or FAKE_VARIANTS:
                    label = f"{model} {method} ckpt={'on' if ckpt else 'off'} {name:9s}"
                    if deadline and time.monotonic() > deadline:
                        why = "time budget (--max-seconds) used up"
                    elif name == "trl+fastrlhf":
                        why = ("no fake-tensor run: a TRL trainer is not built on fake tensors (its head "
                               "is fastrlhf's: see the fastrlhf row)")
                    else:
                        why = by_name[name].unavailable(method, bench.setup.model)
                    base = {"variant": name, "checkpointing": ckpt}
                    if why:
                        records.append({**base, "kind": "skipped", "reason": why})
                        print(f"{label} not run: {why}")
                    else:
                        records += _memory_curve(bench, by_name[name], base, args, budget, label)
                    report.write_json(out / f"{stem}.json", meta, records)
                bench = None
                gc.collect()
    _finish(out, command)
    return 0


def _memory_curve(bench, variant, base: dict, args, budget: int, label: str) -> list[dict]:
    """A variant's peaks over the grid (every part tracked at the breakdown length, the train
    part elsewhere) and its frontier record."""
    from bench.e2e import search
    from bench.e2e.phase import GROUP

    records, seen = [], {}

    def fits(L):
        if L not in seen:
            t0 = time.monotonic()
            seen[L] = r = bench.measure(variant, L, None if L == args.breakdown_len else ("train",))
            records.append({**base, "kind": "peak", **r, "fits": r["bytes"] <= budget})
            w = r["where"]
            print(f"{label} L={L:<6} peak {r['bytes'] / 2**30:8.2f} GiB  ({w['part']} · {w['pass']} · "
                  f"{w['op']})  [{time.monotonic() - t0:.1f} s]", flush=True)
        return seen[L]["bytes"] <= budget, seen[L]["bytes"]

    fits(args.breakdown_len)
    f = search.frontier(fits, _grid(args), args.frontier_step, budget=budget, stop_above=2 * budget)
    L = f["completion_len"]
    records.append({**base, "kind": "frontier", "completion_len": L, "capped": f["capped"],
                    "tokens": GROUP * (bench.prompt_len + L) if L else 0,
                    "bytes": seen[L]["bytes"] if L else None, "tries": f["tries"]})
    return records


# --------------------------------------------------------------------------- device
def run_device(args, command, deadline) -> int:
    import torch

    from bench.e2e import phase, report, runner, variants
    from bench.measure import environment, gpu_slug

    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    env = environment(device, command)
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="fastrlhf-e2e-smoke-")) if args.smoke else RESULTS / gpu_slug(env) / "e2e"
    out = Path(str(out).replace("{gpu}", gpu_slug(env)))
    out.mkdir(parents=True, exist_ok=True)
    args.length = args.length or (24 if args.smoke else 1024)
    args.prompt_len = args.prompt_len or (8 if args.smoke else phase.PROMPT_LEN)
    run = runner.Runner(device, reps=args.reps, smoke=args.smoke, deadline=deadline)
    every = {v.name: v for v in variants.all_variants(args.backend)}
    wanted = [every[n] for n in args.variants or every]  # in the order given: a time budget ends the list
    if args.smoke:
        print(report.SMOKE_BANNER)
    print(f"device {env.get('gpu') or device}; torch {env['torch']}; variants {[v.name for v in wanted]}; "
          f"completion {args.length}, prompt {args.prompt_len}; results -> {out}", flush=True)
    errors = 0
    for model in args.models or (SMOKE_MODELS if args.smoke else GPU_MODELS):
        for method in args.methods or phase.METHODS:
            for ckpt in _modes(args, "off"):
                stem = f"e2e-{model}-{method}{'-ckpt' if ckpt else ''}"
                meta = {"kind": "e2e", "stem": stem, "model": model, "method": method, "checkpointing": ckpt,
                        "env": env, "smoke": args.smoke, "claims_numbers": not args.smoke,
                        "parts": list(phase.PARTS[method]), "completion_len": args.length,
                        "prompt_len": args.prompt_len, "reps": args.reps,
                        "batch": f"{phase.GROUP} × ({args.prompt_len} + {args.length}) tokens",
                        "parity_rtol": runner.PARITY_RTOL, "trl": _version("trl"),
                        "liger_kernel": _version("liger-kernel"), "transformers": _version("transformers")}
                if run.out_of_time():
                    print(f"{stem}: not run (time budget used up)")
                    continue
                records = _device_case(run, wanted, meta, args, out / f"{stem}.json")
                errors += sum(r["status"] == "error" or bool(r.get("parity") and not r["parity"]["ok"])
                              for r in records)
    _finish(out, command, report.SMOKE_BANNER if args.smoke else "")
    return 1 if errors else 0


def _device_case(run, wanted, meta: dict, args, path: Path) -> list[dict]:
    """Every wanted variant on one (model, method, checkpointing): measurements, parity with
    naive, then the frontiers (``FRONTIER_ORDER``); the JSON is rewritten after each."""
    import torch

    from bench.e2e import phase, report, runner, step

    def save():
        report.write_json(path, meta, records)

    records: list[dict] = []
    try:
        setup = step.build_setup(meta["model"], meta["method"], dtype=torch.bfloat16, device=run.device,
                                 checkpointing=meta["checkpointing"])
    except torch.OutOfMemoryError as exc:
        records = [{"variant": v.name, "status": "skipped", "reason": f"the models do not fit: {exc}"[:200]}
                   for v in wanted]
        save()
        return records
    batch = phase.make_batch(meta["method"], setup.vocab, args.length, run.device, prompt_len=args.prompt_len)
    for v in wanted:
        rec = {"variant": v.name, "note": v.note, **run.measure(v, setup, batch)}
        records.append(rec)
        naive = next((r for r in records if r["variant"] == "naive"), None)
        rec["parity"] = runner.parity(rec, naive) if v.name != "naive" else None
        print(_line(meta["stem"], rec), flush=True)
        save()
    by = {r["variant"]: r for r in records}
    for name in FRONTIER_ORDER if not (args.no_frontier or args.smoke) else ():
        v = next((v for v in wanted if v.name == name), None)
        if v is None or not (by[name]["status"] == "ok" or "out of memory" in by[name]["reason"]):
            continue
        f = by[name]["frontier"] = run.frontier(v, setup, _grid(args), args.frontier_step, args.prompt_len)
        print(f"{meta['stem']} {name}: frontier {f['completion_len']} tokens/sequence ({f['tokens']} per "
              f"micro-batch){' (capped)' if f['capped'] else ''}", flush=True)
        save()
    for v in wanted:
        v.close()
    setup = batch = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def _line(stem: str, r: dict) -> str:
    head = f"{stem:<34} {r['variant']:<13}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    parts = " ".join(f"{p} {ms:8.2f}" for p, ms in r["parts_ms"].items())
    peak = f"  peak {r['peak_phase_bytes'] / 2**30:.2f} GiB" if r.get("peak_phase_bytes") else ""
    par = r.get("parity")
    par = f"  loss/grad err {par['loss_rel_err']:.1e}/{par['grad_norm_rel_err']:.1e}" if par else ""
    return f"{head} {parts} ms  phase {r['phase_ms']:8.2f} ms{peak}{par}"
