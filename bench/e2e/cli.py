"""``python -m bench.e2e``: the training phase of GRPO / PPO / DPO per variant.

Three modes: on a GPU (default) times, peak memory, frontier and parity of real models with
random weights; ``--smoke`` the same on the CPU with tiny models (no frontier, claims no
numbers); ``--memory`` peak memory and frontier on fake tensors at full size, on any CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.e2e import workflow
from bench.e2e.workflow import FAKE_VARIANTS, GPU_MODELS, MEMORY_MODELS, SMOKE_MODELS


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _ints(text: str) -> list[int]:
    return [int(n) for n in _names(text)]


def parse_args(argv):
    from bench.e2e.models import SHAPES
    from bench.e2e.phase import METHODS
    from bench.e2e.variants import NAMES

    p = argparse.ArgumentParser(prog="python -m bench.e2e", description="One RLHF training phase (GRPO, PPO, DPO) "
                                "per variant: times, peak memory, frontier, parity; or its memory on fake tensors.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the workflow runs; "
                                                            "claims no numbers")
    mode.add_argument("--memory", action="store_true", help="peak memory on fake tensors (any CPU, no GPU)")
    mode.add_argument("--report-only", action="store_true", help="re-render results.md and plots from --out")
    p.add_argument("--models", type=_names, metavar="NAMES",
                   help=f"model shapes among {', '.join(SHAPES)}; default: {', '.join(GPU_MODELS)} "
                        f"(--memory: {', '.join(MEMORY_MODELS)}; --smoke: {', '.join(SMOKE_MODELS)})")
    p.add_argument("--methods", type=_names, metavar="NAMES",
                   help=f"among {', '.join(METHODS)}; default: all (--memory: grpo)")
    p.add_argument("--variants", type=_names, metavar="NAMES",
                   help=f"among {', '.join(NAMES)}, measured in that order; default: all (--memory: "
                        f"{', '.join(FAKE_VARIANTS)})")
    p.add_argument("--length", type=int, metavar="L", help="completion tokens per sequence for times and "
                                                           "parity (default 1024; --smoke 24)")
    p.add_argument("--prompt-len", type=int, metavar="P", help="prompt tokens per sequence (default 512; --smoke 8)")
    p.add_argument("--reps", type=int, default=3, help="timed phases per variant (median); default 3")
    p.add_argument("--checkpointing", choices=("off", "on", "both"),
                   help="gradient checkpointing of the policy (default off; --memory: both)")
    p.add_argument("--no-frontier", action="store_true", help="skip the frontier search")
    p.add_argument("--lengths", type=_ints, metavar="LS",
                   help="completion lengths of the frontier grid (default 1024,2048,...,32768; the "
                        "--memory plot's points, up to the first peak above twice the budget)")
    p.add_argument("--frontier-step", type=int, default=256, metavar="N",
                   help="the search narrows the frontier to N tokens (default 256)")
    p.add_argument("--budget-gib", type=float, default=78.0,
                   help="--memory: what fits (default 78 GiB: an 80 GB H100's 79.2 GiB less the CUDA "
                        "context and allocator slack)")
    p.add_argument("--breakdown-len", type=int, default=4096,
                   help="--memory: the completion length of the where-is-the-peak table (default 4096)")
    p.add_argument("--backend", default="auto", help="fastrlhf backend (default auto)")
    p.add_argument("--max-seconds", type=float, help="start no measurement after this many seconds")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results folder ('{gpu}' becomes the GPU's name); default bench/results/{gpu}/e2e "
                        "(--memory: bench/results/memory-fake; --smoke: a new temporary folder)")
    args = p.parse_args(argv)
    for what, given, known in (("--models", args.models, SHAPES), ("--methods", args.methods, METHODS),
                               ("--variants", args.variants, NAMES)):
        bad = [n for n in given or () if n not in known]
        if bad:
            p.error(f"{what}: unknown {bad}; choose from {list(known)}")
    if args.report_only and args.out is None:
        p.error("--report-only needs --out DIR")
    return p, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv or "--memory" in argv:  # before anything imports triton (fastrlhf does):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run the kernels interpreted
    parser, args = parse_args(argv)
    if args.report_only:
        from bench.e2e import report

        paths = report.render_dir(args.out)
        print(f"wrote {paths['results']} and {len(paths['plots'])} plot(s)")
        return 0
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    command = ["python", "-m", "bench.e2e", *argv]
    if args.memory:
        return workflow.run_memory(args, command, deadline)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --smoke (the workflow on tiny models) or --memory (fake tensors)")
    return workflow.run_device(args, command, deadline)
