"""``python -m bench.static``: compile every kernel for the headline cases, write the static
performance report, and exit 1 when a budget fails (``--no-fail``: always 0)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

from bench.static.build import ROOT


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__)
    p.add_argument("--arch", default="90,80", help="comma-separated SM archs to compile for (default: 90,80)")
    p.add_argument("--only", default="*", help="fnmatch pattern over case names (default: every case)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "static-sm90"),
                   help="output folder (default: bench/results/static-sm90 of this checkout)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when a budget fails")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench.static compiles kernels: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    from bench.static import build, collect, report
    from bench.static.budgets import BUDGETS, check

    start = time.time()
    archs = [int(a) for a in args.arch.split(",")]
    rows = collect.collect(archs, args.only, args.jobs)
    checks = [check(b, r) for b in BUDGETS for r in rows if b.applies(r)]
    command = "python -m bench.static " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = report.document(rows, checks, archs, command.strip(),
                          datetime.date.today().isoformat(), build.versions(archs),
                          collect.uncovered(rows) if args.only == "*" else [])
    json_path, md_path = report.write(doc, args.out)
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(f"FAIL {c['case']} {c['kernel']} sm_{c['arch']}: {c['metric']} = {c['value']} "
              f"(budget {c['op']} {c['limit']})")
    print(f"{len(rows)} kernel rows, {len(checks)} budget checks, {len(failed)} failed; "
          f"wrote {json_path} and {md_path} in {time.time() - start:.0f} s "
          "(predictions from compiled code, not measurements)")
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
