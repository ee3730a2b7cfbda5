"""The benchmark suite in smoke mode (tiny shapes, CPU, torch backend, Triton interpreter), so
that it cannot rot: every family runs in every mode, and the JSON, Markdown and PNG outputs
are well-formed. The smoke mode claims no numbers; nothing here checks a timing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.core import FAMILIES, MODES, PROVIDERS, Case, Config, Impl, Op
from bench.runner import Runner, _derive

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("gpu", "driver", "cuda", "torch", "triton", "command", "date")


def _bench(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI sets it
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    proc = _bench("--smoke", "--out", str(out))
    return proc, out


def test_smoke_run_succeeds_and_claims_no_numbers(smoke):
    proc, _ = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "claims no numbers" in proc.stdout
    assert "ERROR" not in proc.stdout


def test_smoke_json_records(smoke):
    _, out = smoke
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert {d["family"] for d in docs} == set(FAMILIES)  # every family ran
    for doc in docs:
        assert doc["schema"] == report.SCHEMA
        assert doc["smoke"] is True and doc["claims_numbers"] is False and doc["tier"] == "smoke"
        assert all(k in doc["env"] for k in ENV_KEYS)
        assert "--smoke" in doc["env"]["command"] and doc["env"]["gpu"] is None
        records = doc["records"]
        assert {r["op"] for r in records} == {doc["op"]}
        modes = {r["mode"] for r in records}
        assert modes in ({"fwd"}, set(MODES), {"fwd", "fwd+bwd"})  # the last: gradients made in forward
        for mode in modes:
            # every provider has a record in every mode; the reference and the Triton
            # kernels (interpreted) ran, the others say why not
            got = {r["provider"]: r for r in records if r["mode"] == mode}
            assert set(got) == set(PROVIDERS)
            for name in ("torch", "fastrlhf-triton"):
                r = got[name]
                assert r["status"] == "ok", r
                assert r["ms"] > 0 and r["bytes"] > 0 and r["GBps"] > 0
                assert 0 < r["copy_fraction"] and r["peak_extra_bytes"] is None
            assert got["fastrlhf-triton"]["rel_err"]["out"] <= 2e-2
            for r in got.values():
                assert r["status"] in ("ok", "skipped"), r
                if r["status"] == "skipped":
                    assert r["reason"]
            assert "CUDA tensors" in got["fastrlhf-cuda"]["reason"]
            ok = [r for r in got.values() if r["status"] == "ok"]
            for r in ok:
                assert set(r["speedup_vs"]) == {o["provider"] for o in ok} - {r["provider"]}


def test_smoke_markdown_and_plots(smoke):
    _, out = smoke
    text = (out / "results.md").read_text()
    assert report.SMOKE_BANNER in text
    ops = sorted(p.stem for p in out.glob("*.json"))
    for op in ops:
        assert f"### {op}\n" in text
    assert "| case | MB moved | torch |" in text and "× vs torch |" in text
    summary = (out / "summary.md").read_text()
    assert report.SMOKE_BANNER in summary
    assert sum(line.startswith(f"| {op} |") for op in ops for line in summary.splitlines()) == len(ops)
    matplotlib_image = pytest.importorskip("matplotlib.image")
    for op in ops:
        png = out / "plots" / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib_image.imread(png).shape[:2]
        assert height > 200 and width > 400


def test_rerender_from_json(smoke, tmp_path):
    """What ``--report-only`` does: the Markdown is a function of the JSON files alone."""
    _, out = smoke
    for p in out.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    paths = report.render_dir(tmp_path, plots=False)
    assert paths["results"].read_text() == (out / "results.md").read_text()
    assert paths["summary"].read_text() == (out / "summary.md").read_text()


def test_unknown_names_are_refused():
    proc = _bench("--smoke", "--ops", "logprobs,nope", timeout=120)
    assert proc.returncode == 2 and "unknown name(s) ['nope']" in proc.stderr
    assert "token_logprobs" in proc.stderr  # the known names are listed
    proc = _bench("--smoke", "--providers", "torch,tensorflow", timeout=120)
    assert proc.returncode == 2 and "tensorflow" in proc.stderr


def test_list_selects_families_and_ops():
    proc = _bench("--smoke", "--list", "--ops", "advantages,dpo_loss", timeout=120)
    assert proc.returncode == 0, proc.stderr
    ops = {line.split()[1] for line in proc.stdout.splitlines()}
    assert ops == {"gae", "discounted_returns", "group_advantages", "dpo_loss"}


def test_pytest_benchmark_suite_runs(tmp_path):
    """``pytest bench/`` collects one test per (op, shape, mode, provider) and writes
    pytest-benchmark JSON (here: tiny shapes on the CPU, one op)."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items()  # nothing of the outer (maybe xdist) pytest
           if k != "TRITON_INTERPRET" and not k.startswith(("PYTEST_", "PYTEST_XDIST"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                           "-k", "dpo_loss and not compile and not linear", f"--benchmark-json={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    ran = {(b["extra_info"]["mode"], b["extra_info"]["provider"]) for b in benches}
    assert ran == {(m, p) for m in MODES for p in ("torch", "fastrlhf-triton")}
    assert all(b["group"].startswith("dpo_loss-B5-") for b in benches)


def _record(provider, ms, case="N1-V2", x=1.0, mode="fwd+bwd", **extra):
    r = {"family": "logprobs", "op": "token_logprobs", "case": case, "x": x, "mode": mode,
         "provider": provider, "status": "ok", "ms": ms, "bytes": 3_000_000_000,
         "copy_ms": 1.0, "copy_bytes": 3_000_000_000, "peak_extra_bytes": 2**30, **extra}
    _derive(r)
    return r


def _skipped(provider, reason, **kw):
    return {**_record(provider, 1.0, **kw), "status": "skipped", "reason": reason}


def test_derived_numbers_and_tables():
    """The GPU-side arithmetic of the report, on made-up records: bandwidth, share of the
    copy, FLOP rate, speed-ups (best fastrlhf backend over each other provider)."""
    r = _record("fastrlhf-triton", 2.0, flops=4e12, mm_ms=1.0)
    assert r["GBps"] == pytest.approx(1500) and r["copy_fraction"] == pytest.approx(0.5)
    assert r["TFLOPs"] == pytest.approx(2000) and r["mm_fraction"] == pytest.approx(0.5)
    big, huge = {"case": "N9-V9", "x": 9.0}, {"case": "N99-V9", "x": 99.0}
    records = [_record("torch", 10.0), _record("torch.compile", 4.0), _record("fastrlhf-triton", 2.0),
               _record("fastrlhf-cuda", 1.0), _skipped("liger", "not installed"),
               _record("torch", 80.0, **big), _record("fastrlhf-triton", 10.0, **big),
               _skipped("torch", "out of memory", **huge), _record("fastrlhf-triton", 50.0, **huge)]
    report.add_speedups(records)
    assert records[2]["speedup_vs"] == {"torch": 5.0, "torch.compile": 2.0, "fastrlhf-cuda": 0.5}
    table = report.op_tables(records)
    assert "- liger not run: not installed" in table
    assert ("| N1-V2 | 3000 | 10 ms · 10% BW · +1 GiB | 4 ms · 25% BW · +1 GiB | 2 ms · 50% BW · +1 GiB"
            " | 1 ms · 100% BW · +1 GiB | 10.00 | 4.00 |") in table
    assert "| N99-V9 | 3000 | – [1] | " in table and "[1] out of memory" in table
    assert table.index("| N1-V2 |") < table.index("| N9-V9 |") < table.index("| N99-V9 |")
    # the summary takes the largest shape where the reference ran too
    rows = report.summary_rows(records)
    assert [(s["case"], s["best"]["provider"]) for s in rows] == [("N9-V9", "fastrlhf-triton")]
    env = {"gpu": "GPU X", "date": "2026-01-01", "torch": "t"}
    summary = report.summary_markdown(records, [{"env": env}])
    assert "| token_logprobs | fwd+bwd | N9-V9 | 10 ms (triton) | 10% BW | 8.00 | – | 1 GiB / 1 GiB |" in summary


def test_providers_are_checked_against_the_fp64_reference():
    """A peer whose gradient differs is timed in fwd only; a fastrlhf backend whose output
    differs is an error (never a number)."""
    def reference(x):
        return (x.float() * 2).sum(-1)

    def detached(x):  # right values, no gradient through x
        return reference(x.detach()) + 0 * x.sum(-1)

    op = Op(name="toy", family="logprobs", reference=reference,
            fastrlhf=lambda x, backend: reference(x) + 1,
            probe=lambda device: {"x": torch.randn(4, 5, device=device)}, grad_inputs=("x",),
            peers={"liger": lambda device: Impl(detached)})
    case = Case(op, "B4", {}, 20.0, lambda device: {"x": torch.randn(4, 5, device=device)},
                {"fwd": 96, "bwd": 176, "fwd+bwd": 272})
    runner = Runner(Config(torch.device("cpu"), "smoke"), ["torch", "liger", "fastrlhf-triton"],
                    log=lambda line: None)
    got = {(r["provider"], r["mode"]): r for r in runner.run_case(case)}
    assert all(got["torch", m]["status"] == "ok" for m in MODES)
    assert got["torch", "fwd"]["rel_err"]["out"] < 1e-6
    assert got["liger", "fwd"]["status"] == "ok"
    for m in ("bwd", "fwd+bwd"):
        assert got["liger", m]["status"] == "skipped"
        assert "gradient differs" in got["liger", m]["reason"]
    for m in MODES:
        assert got["fastrlhf-triton", m]["status"] == "error"
        assert "output differs" in got["fastrlhf-triton", m]["reason"]


def test_gpu_check_script_and_import(smoke, tmp_path):
    """scripts/gpu_check.sh parses and writes at most 9 files; its results come home with
    python -m bench.gpu_import: JSON into bench/results/<gpu>/, logs beside, test counts and
    the benchmark summary between the README's markers."""
    import tarfile

    from bench import gpu_import

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    written = {name for name in ("env.txt", "tests.log", "tests.xml", "e2e.tgz", "bench.log", "bench.tgz",
                                 "cuda.log", "cuda.xml", "build-error.log") if name in script}
    assert len(written) <= 9  # what the device machine returns

    _, bench_out = smoke
    src = tmp_path / "gpu-out"
    src.mkdir()
    (src / "env.txt").write_text("GPU 0: a test GPU\ntorch 2.11 triton 3.6\n")
    (src / "tests.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/>'
                                   '</testsuites>')
    with tarfile.open(src / "bench.tgz", "w:gz") as tar:
        for path in bench_out.glob("*.json"):
            tar.add(path, arcname=path.name)
    e2e_json = tmp_path / "e2e-src"
    e2e_json.mkdir()
    (e2e_json / "e2e.log").write_text("a log\n")
    with tarfile.open(src / "e2e.tgz", "w:gz") as tar:
        tar.add(e2e_json / "e2e.log", arcname="e2e.log")
    out = gpu_import.unpack(src, results=tmp_path / "results")
    assert (gpu_import.unpack_e2e(src, out) / "e2e.log").read_text() == "a log\n"
    assert out.name == "cpu" and len(list(out.glob("*.json"))) == len(list(bench_out.glob("*.json")))
    report.render_dir(out, plots=False)
    assert gpu_import.test_counts(src / "tests.xml") == "7 passed, 1 failed, 0 errors, 2 skipped"
    assert "did not finish" in gpu_import.test_counts(src / "cuda.xml")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{gpu_import.MARKERS[0]}\nold\n{gpu_import.MARKERS[1]}\nafter\n")
    gpu_import.update_readme("new block", readme)
    assert readme.read_text() == f"# x\n{gpu_import.MARKERS[0]}\nnew block\n{gpu_import.MARKERS[1]}\nafter\n"
