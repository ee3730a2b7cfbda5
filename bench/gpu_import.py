"""``python -m bench.gpu_import DIR``: bring one ``scripts/gpu_check.sh`` call's results home.

``DIR`` holds what the check wrote to ``$OUT`` (``env.txt``, ``tests.log``/``.xml``,
``bench.log``, ``bench.tgz``, ``cuda.log``/``.xml``). This unpacks the benchmark JSON into
``bench/results/<gpu>/`` (the folder name from the GPU in the JSON), keeps the check's logs in
``bench/results/<gpu>/gpu-check/<commit>/`` with a summary of the test counts, re-renders the
Markdown and plots of everything in that folder, regenerates the auto dispatch table from it, and puts
the summary in the README between ``<!-- gpu-results -->`` markers. Every number it writes
is one the GPU measured; nothing is predicted here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import report
from bench.cli import RESULTS
from bench.measure import gpu_slug

ROOT = Path(__file__).resolve().parent.parent
MARKERS = ("<!-- gpu-results:begin -->", "<!-- gpu-results:end -->")
LOGS = ("env.txt", "tests.log", "tests.xml", "bench.log", "cuda.log", "cuda.xml", "build-error.log", "extra.log")


def test_counts(xml: Path) -> str:
    """``"N passed, F failed, E errors, S skipped"`` of a JUnit file, or why there is none."""
    if not xml.is_file():
        return "no report (the stage did not finish)"
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return (f"{passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
            f"{totals['skipped']} skipped")


def unpack(src: Path, results: Path = RESULTS) -> Path:
    """Unpack ``src/bench.tgz`` into ``results/<gpu>/``; returns that folder."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(src / "bench.tgz") as tar:
        tar.extractall(tmp, filter="data")
        docs = report.load_dir(Path(tmp))
        if not docs:
            raise SystemExit(f"{src / 'bench.tgz'} holds no benchmark JSON")
        out = results / gpu_slug(docs[0]["env"])
        out.mkdir(parents=True, exist_ok=True)
        for path in Path(tmp).glob("*.json"):
            shutil.copy(path, out / path.name)
    return out


def unpack_e2e(src: Path, out: Path) -> Path | None:
    """Unpack ``src/e2e.tgz`` (the end-to-end stage's JSON and log) into ``out/e2e``; None without it."""
    if not (src / "e2e.tgz").is_file():
        return None
    dest = out / "e2e"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "e2e.tgz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def summary(src: Path, out: Path, commit: str) -> str:
    """The Markdown block for the README: GPU, commit, test counts, the benchmark summary."""
    env = (src / "env.txt").read_text().strip().splitlines() if (src / "env.txt").is_file() else []
    lines = [f"Measured by `bash scripts/gpu_check.sh` on commit {commit} (imported with "
             f"`python -m bench.gpu_import`); full tables in `{out.relative_to(ROOT)}/results.md`.", ""]
    lines += [f"    {line}" for line in env] + [""]
    lines += [f"- compiled correctness (triton): {test_counts(src / 'tests.xml')}",
              f"- CUDA extension parity: {test_counts(src / 'cuda.xml')}", ""]
    lines.append((out / "summary.md").read_text().strip())
    return "\n".join(lines)


def update_readme(block: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    begin, end = MARKERS
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{block}\n{end}", text,
                  flags=re.S)
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_import", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="the folder scripts/gpu_check.sh wrote ($OUT)")
    p.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    p.add_argument("--commit", help="the commit whose tree the check ran (default: HEAD)")
    args = p.parse_args(argv)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=ROOT).stdout.strip()
    out = unpack(args.src)
    logs = out / "gpu-check" / commit
    logs.mkdir(parents=True, exist_ok=True)
    for name in LOGS:
        if (args.src / name).is_file():
            shutil.copy(args.src / name, logs / name)
    report.render_dir(out)
    e2e = unpack_e2e(args.src, out)
    if e2e is not None:
        from bench.e2e import report as e2e_report

        e2e_report.render_dir(e2e)
    subprocess.run([sys.executable, "-m", "fastrlhf.cuda.dispatch_table", str(out)], check=True, cwd=ROOT)
    block = summary(args.src, out, commit)
    (logs / "summary.md").write_text(block + "\n")
    if not args.no_readme:
        update_readme(block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
