"""``python -m bench``: run the benchmark suite and write JSON, Markdown and PNG results."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_args(argv: list[str] | None):
    from bench.core import PROVIDERS

    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time fastrlhf's ops against the PyTorch reference, torch.compile and "
                    "installed peers; write JSON, Markdown and PNG plots.")
    p.add_argument("--ops", type=_names, action="extend", metavar="NAMES",
                   help="comma-separated families (logprobs, linear_logprobs, kl, advantages, ppo, "
                        "dpo) or op names; default: all")
    p.add_argument("--providers", type=_names, action="extend", metavar="NAMES",
                   help=f"comma-separated subset of {', '.join(PROVIDERS)}; default: all")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--smoke", action="store_true",
                      help="tiny shapes on the CPU (torch backend, Triton interpreter): checks that "
                           "the suite runs; claims no numbers")
    tier.add_argument("--quick", action="store_true",
                      help="fewer shapes, for a time-limited GPU session")
    tier.add_argument("--host", action="store_true",
                      help="the host cost (µs and aten calls per call, CPU, Triton launches stubbed) of "
                           "the loss, KL and advantage ops against their eager reference (bench/host.py); "
                           "default --out bench/results/host-cpu/")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results folder ('{gpu}' in it becomes the GPU's name, e.g. nvidia-h100-80gb-hbm3); "
                        "default bench/results/{gpu}/ (smoke: a new temporary folder)")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="start no measurement after M minutes (the rest is recorded as skipped); "
                        "results are written after every case either way")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only re-render results.md, summary.md and plots from the JSON in --out")
    args = p.parse_args(argv)
    bad = [n for n in args.providers or [] if n not in PROVIDERS]
    if bad:
        p.error(f"--providers: unknown {bad}; choose from {list(PROVIDERS)}")
    if args.report_only and args.out is None:
        p.error("--report-only needs --out DIR")
    return p, args


def _host(args, argv: list[str]) -> int:
    import json

    from bench import host

    rows = host.main(args.ops, verbose=True)
    out = args.out or RESULTS / "host-cpu"
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench", *argv])
    meta = {"command": command, "machine": host.machine(), "calls": host.CALLS, "repeats": host.REPEATS}
    stored = [{**r, "eager": {k: v for k, v in r["eager"].items() if k != "calls"}} for r in rows]
    (out / "host.json").write_text(json.dumps({**meta, "rows": stored}, indent=1) + "\n")
    text = (f"# Host cost per call (CPU, Triton launches stubbed)\n\n`{command}` on {meta['machine']}: "
            f"the fastest of {host.REPEATS} timings of {host.CALLS} calls (the times vary by 10-20 % between "
            f"runs on a shared CPU; the counts are exact); aten calls counted at the top level with "
            f"torch.profiler, Triton launches by the stubs (bench/host.py).\n\n{host.table(rows)}\n")
    (out / "host.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv or "--host" in argv:
        # Before anything imports triton (fastrlhf does): CPU tensors run the Triton kernels interpreted.
        os.environ["TRITON_INTERPRET"] = "1"
    parser, args = parse_args(argv)
    if args.host:
        return _host(args, argv)

    import torch

    from bench import report
    from bench.core import PROVIDERS, Config, all_cases
    from bench.measure import environment, gpu_slug
    from bench.runner import COMPILE_NOTE, Runner

    if args.report_only:
        paths = report.render_dir(args.out)
        print(f"wrote {paths['results']}, {paths['summary']} and {len(paths['plots'])} plot(s)")
        return 0
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.list:
        device = torch.device("cpu")  # listing needs no device
    else:
        parser.error("no CUDA device here: benchmarks need a GPU (use --smoke to check that the suite runs)")
    tier = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = Config(device=device, tier=tier)
    try:
        cases, unavailable = all_cases(cfg, args.ops)
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        for c in cases:
            print(f"{c.op.family:<16} {c.op.name:<24} {c.label:<28} modes {','.join(c.op.modes)}")
        for why in unavailable.values():
            print(f"not run: {why}")
        return 0

    command = ["python", "-m", "bench", *argv]
    env = environment(device, command)
    if args.out is not None:
        out = Path(str(args.out).replace("{gpu}", gpu_slug(env)))
    else:
        out = Path(tempfile.mkdtemp(prefix="fastrlhf-bench-smoke-")) if args.smoke else RESULTS / gpu_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        print(report.SMOKE_BANNER)
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    runner = Runner(cfg, providers, log=lambda line: print(line, flush=True), deadline=deadline)
    started = time.monotonic()
    print(f"device {env.get('gpu') or device}; torch {env['torch']}, triton {env['triton']}; "
          f"{len(cases)} case(s); providers {', '.join(providers)}; results -> {out}")
    for why in unavailable.values():
        print(f"not run: {why}")
    meta = {"smoke": args.smoke, "claims_numbers": not args.smoke, "tier": tier, "env": env,
            "providers": providers, "unavailable": unavailable,
            "compile": COMPILE_NOTE if "torch.compile" in providers else None,
            "copy_peak": runner.ceilings.peak_copy(),
            "timer": ("time.perf_counter, 1 call after 1 warm-up (smoke: no numbers)" if args.smoke else
                      "median of triton.testing.do_bench (CUDA events, warm-up, L2 flushed before "
                      "each repetition), quantiles 0.2/0.8; calls over 100 ms: 3 event-timed "
                      "repetitions, L2 flushed")}
    by_op: dict[str, list[dict]] = {}
    for case in cases:
        records = by_op.setdefault(case.op.name, [])
        records += runner.run_case(case)
        report.write_op_json(out, case.op.name, {**meta, "family": case.op.family,
                                                 "rank": list(case.op.rank)}, records)
    paths = report.render_dir(out)
    print(f"\nwrote {len(by_op)} JSON file(s), {paths['results']}, {paths['summary']} and "
          f"{len(paths['plots'])} plot(s) under {out}\n")
    print(paths["summary"].read_text())
    errors = [r for recs in by_op.values() for r in recs if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['op']} {r['case']} {r['mode']} {r['provider']}: {r['reason']}")
    if args.smoke:
        print(report.SMOKE_BANNER)
    print(f"command: {shlex.join(command)}  ({time.monotonic() - started:.0f} s)")
    return 1 if errors else 0
