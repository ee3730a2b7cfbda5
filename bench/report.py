"""Results on disk: one JSON per op, and the Markdown tables, summary and PNG plots made
from every JSON in a results folder (so runs of different ops, in different calls, add up).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import defaultdict
from pathlib import Path

from bench.core import FAMILIES, FASTRLHF, MODES, PROVIDERS

SCHEMA = 1
SMOKE_BANNER = ("SMOKE RUN: tiny shapes on the CPU (torch backend, Triton interpreter); "
                "it claims no numbers: the timings below mean nothing.")


# -------------------------------------------------------------------------- JSON
def add_speedups(records: list[dict]) -> None:
    """``speedup_vs[p]`` on each measured record: provider ``p``'s median over this one's,
    for the same op, case and mode (> 1: this provider is faster)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["op"], r["case"], r["mode"])].append(r)
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        for r in ok:
            r["speedup_vs"] = {o["provider"]: o["ms"] / r["ms"] for o in ok if o is not r}


def write_op_json(out_dir: Path, op: str, meta: dict, records: list[dict]) -> Path:
    """Write ``<out_dir>/<op>.json`` atomically (called after each case: a run cut short
    still leaves what it measured)."""
    add_speedups(records)
    doc = {"schema": SCHEMA, **meta, "op": op, "records": records}
    path = out_dir / f"{op}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _clean(value):
    """Plain JSON: non-finite floats become None, other objects their ``str``."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def load_dir(out_dir: Path) -> list[dict]:
    """Every results JSON in ``out_dir`` (files of another schema are left out)."""
    docs = []
    for path in out_dir.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA and "records" in doc:
            docs.append(doc)
    return sorted(docs, key=lambda d: (*d.get("rank", (len(FAMILIES), 0)), d["op"]))


# ---------------------------------------------------------------------- formatting
def _ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fraction(r: dict) -> str:
    if "mm_fraction" in r:
        return f"{100 * r['mm_fraction']:.0f}% mm"
    if "copy_fraction" in r:
        return f"{100 * r['copy_fraction']:.0f}% BW"
    return ""


def _cell(r: dict, notes: dict) -> str:
    if r["status"] != "ok":
        mark = notes.setdefault(r["reason"], len(notes) + 1)
        return f"{'–' if r['status'] == 'skipped' else 'error'} [{mark}]"
    bits = [_ms(r["ms"]), _fraction(r)]
    if r.get("peak_extra_bytes") is not None:
        bits.append(f"+{_bytes(r['peak_extra_bytes'])}")
    return " · ".join(b for b in bits if b)


def _best_fastrlhf(rows: dict) -> dict | None:
    ok = [rows[p] for p in FASTRLHF if p in rows and rows[p]["status"] == "ok"]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _providers(records) -> list[str]:
    seen = {r["provider"] for r in records}
    return [p for p in PROVIDERS if p in seen] + sorted(seen - set(PROVIDERS))


def _ran(records) -> list[str]:
    """Providers with at least one measured record, in table order."""
    return [p for p in _providers(records) if any(r["provider"] == p and r["status"] == "ok"
                                                  for r in records)]


def op_tables(records: list[dict]) -> str:
    """Markdown for one op: per mode, one row per case, one column per provider that ran at
    least once, and the speed-up of the faster fastrlhf backend over each other provider.
    Providers that never ran are listed once, with their reason."""
    ran = _ran(records)
    others = [p for p in ran if p not in FASTRLHF]
    has_flops = any(r.get("flops") for r in records)
    out = [f"### {records[0]['op']}\n",
           "Cells: median time · " + ("FLOP rate as a share of bare `torch.mm` running the same "
           "GEMMs" if has_flops else "effective bandwidth as a share of a device-to-device copy of "
           "the same byte count") + " · peak memory above the inputs. × vs: the faster fastrlhf "
           "backend's speed-up over that provider.\n"]
    idle = [p for p in _providers(records) if p not in ran]
    for p in idle:
        reasons = sorted({r["reason"] for r in records if r["provider"] == p})
        out.append(f"- {p} not run: {'; '.join(reasons)}")
    for p in ran:
        for note in sorted({r["note"] for r in records if r["provider"] == p and r.get("note")}):
            out.append(f"- {p}: {note}")
    if idle or any(r.get("note") for r in records):
        out.append("")
    notes: dict[str, int] = {}
    for mode in MODES:
        rows = defaultdict(dict)
        for r in records:
            if r["mode"] == mode:
                rows[r["case"]][r["provider"]] = r
        if not rows:
            continue
        cols = ["case", "MB moved", *ran, *[f"× vs {p}" for p in others]]
        lines = [f"**{mode}**\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for case in sorted(rows, key=lambda c: next(iter(rows[c].values()))["x"]):
            row = rows[case]
            any_r = next(iter(row.values()))
            cells = [case, f"{any_r['bytes'] / 1e6:.4g}" if any_r.get("bytes") else ""]
            cells += [_cell(row[p], notes) if p in row else "" for p in ran]
            best = _best_fastrlhf(row)
            for p in others:
                o = row.get(p)
                ok = best is not None and o is not None and o["status"] == "ok"
                cells.append(f"{o['ms'] / best['ms']:.2f}" if ok else "")
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
    out += [f"[{n}] {reason}\n" for reason, n in notes.items()]
    return "\n".join(out)


def _env_lines(doc: dict) -> list[str]:
    env = doc["env"]
    gpu = env.get("gpu") or f"no GPU ({env.get('cpu')})"
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    versions = (f"- torch {env['torch']} (CUDA {env.get('cuda') or 'none'}), triton {env.get('triton')}, "
                f"liger-kernel {env.get('liger_kernel') or 'not installed'}, fastrlhf {env['fastrlhf']}")
    lines = [f"- device: {gpu}{driver}", versions]
    peak = doc.get("copy_peak")
    if peak:
        lines.append(f"- device-to-device copy: {peak['GBps']:.0f} GB/s (read + write, "
                     f"{_bytes(peak['bytes'])} moved)")
    lines.append(f"- timer: {doc.get('timer')}")
    if doc.get("compile"):
        lines.append(f"- {doc['compile']}" + (" (smoke: aot_eager backend)" if doc.get("smoke") else ""))
    return lines


def summary_rows(records: list[dict]) -> list[dict]:
    """Per op, in fwd+bwd (fwd for forward-only ops): the largest case where fastrlhf and the
    torch reference both ran, else the largest where fastrlhf ran."""
    rows = []
    ops = []
    for r in records:
        if r["op"] not in ops:
            ops.append(r["op"])
    for op in ops:
        recs = [r for r in records if r["op"] == op]
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in recs) else "fwd"
        by_case = defaultdict(dict)
        for r in recs:
            if r["mode"] == mode:
                by_case[r["case"]][r["provider"]] = r
        ranked = sorted(by_case.items(), key=lambda kv: -next(iter(kv[1].values()))["x"])
        ranked = [(c, row) for c, row in ranked if _best_fastrlhf(row) is not None]
        both = [(c, row) for c, row in ranked if row.get("torch", {}).get("status") == "ok"]
        if both or ranked:
            case, row = (both or ranked)[0]
            rows.append({"op": op, "mode": mode, "case": case, "best": _best_fastrlhf(row), "row": row})
    return rows


def summary_markdown(records: list[dict], docs: list[dict]) -> str:
    """A short table for the README: per op, fastrlhf's time, share of the ceiling and
    speed-ups at its largest measured shape."""
    others = [p for p in _ran(records) if p not in FASTRLHF]
    head = ["op", "mode", "shape", "fastrlhf", "of ceiling", *[f"× vs {p}" for p in others],
            "peak mem (fastrlhf / torch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary_rows(records):
        best, row = s["best"], s["row"]
        cells = [s["op"], s["mode"], s["case"],
                 f"{_ms(best['ms'])} ({best['provider'].removeprefix('fastrlhf-')})", _fraction(best)]
        for p in others:
            o = row.get(p)
            cells.append(f"{o['ms'] / best['ms']:.2f}" if o and o["status"] == "ok" else "–")
        torch_r = row.get("torch")
        torch_mem = (_bytes(torch_r.get("peak_extra_bytes")) if torch_r and torch_r["status"] == "ok"
                     else "–")
        cells.append(f"{_bytes(best.get('peak_extra_bytes'))} / {torch_mem}")
        lines.append("| " + " | ".join(cells) + " |")
    env = max(docs, key=lambda d: d["env"]["date"])["env"] if docs else {}
    where = env.get("gpu") or "CPU"
    text = (f"{where}, torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date', '')[:10]}. "
            "Per op, the largest shape where fastrlhf and the torch reference both ran; 'of "
            "ceiling': effective bandwidth over a same-size "
            "device-to-device copy (BW), or FLOP rate over bare torch.mm running the same GEMMs "
            "(mm); × vs: speed-up of fastrlhf over that provider.\n\n" + "\n".join(lines) + "\n")
    if any(d.get("smoke") for d in docs):
        text = f"**{SMOKE_BANNER}**\n\n" + text
    return text


# ---------------------------------------------------------------------------- plots
_COLORS = dict(zip(PROVIDERS, ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:green", "tab:red")))


def plot_op(records: list[dict], path: Path, smoke: bool) -> None:
    """One PNG per op: for each mode, time vs size and share of the ceiling vs size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    has_flops = any(r.get("flops") for r in records)
    x_label = records[0].get("x_label", "size")
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.4 * len(modes)), squeeze=False)
    for (ax_t, ax_f), mode in zip(axes, modes):
        for provider in _ran(records):
            pts = sorted((r["x"], r["ms"], r.get("mm_fraction", r.get("copy_fraction")))
                         for r in records if r["mode"] == mode and r["provider"] == provider
                         and r["status"] == "ok")
            if not pts:
                continue
            style = {"marker": "o", "label": provider, "color": _COLORS.get(provider)}
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            fr = [(x, 100 * f) for x, _, f in pts if f is not None]
            if fr:
                ax_f.plot([p[0] for p in fr], [p[1] for p in fr], **style)
        ax_t.set(xscale="log", yscale="log", xlabel=x_label, ylabel="median time (ms)",
                 title=f"{mode}: time")
        ax_f.set(xscale="log", xlabel=x_label,
                 ylabel="% of torch.mm FLOP rate" if has_flops else "% of copy bandwidth",
                 title=f"{mode}: " + ("share of the torch.mm rate" if has_flops else
                                      "share of the copy bandwidth"))
        ax_f.axhline(100, color="grey", lw=0.8, ls="--")
        for ax in (ax_t, ax_f):
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(records[0]["op"] + (" — SMOKE RUN, claims no numbers" if smoke else ""))
    # a fixed layout: tight_layout measures every tick label, half the time of a plot
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.22 / len(modes), top=1 - 0.2 / len(modes),
                        hspace=0.55, wspace=0.22)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- folder
def render_dir(out_dir: Path, plots: bool = True) -> dict:
    """(Re)write ``results.md``, ``summary.md`` and (with ``plots``) ``plots/<op>.png`` from
    every JSON in ``out_dir``. Returns ``{"results": path, "summary": path, "plots": [paths]}``."""
    docs = load_dir(out_dir)
    records = [r for d in docs for r in d["records"]]
    smoke = any(d.get("smoke") for d in docs)
    parts = ["# fastrlhf benchmark results\n"]
    if smoke:
        parts.append(f"**{SMOKE_BANNER}**\n")
    parts.append("Made by `python -m bench` from the JSON files beside this one (method: "
                 "bench/README.md).\n")
    if docs:
        latest = max(docs, key=lambda d: d["env"]["date"])
        parts.append("\n".join(_env_lines(latest)) + "\n")
    not_run = sorted({why for d in docs for why in d.get("unavailable", {}).values()})
    if not_run:
        parts.append("\n".join(f"- not run: {why}" for why in not_run) + "\n")
    for d in docs:
        if d["records"]:
            parts.append(op_tables(d["records"]))
            gpu = d["env"].get("gpu")
            parts.append(f"_{d.get('tier')} tier, {d['env']['date']}{', ' + gpu if gpu else ''}: "
                         f"`{d['env']['command']}`_\n")
    results = out_dir / "results.md"
    results.write_text("\n".join(parts))
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(records, docs))
    pngs = []
    if plots and importlib.util.find_spec("matplotlib") is None:
        print("plots not made: matplotlib is not installed (pip install matplotlib)")
        plots = False
    for d in docs if plots else ():
        if any(r["status"] == "ok" for r in d["records"]):
            (out_dir / "plots").mkdir(exist_ok=True)
            path = out_dir / "plots" / f"{d['op']}.png"
            plot_op(d["records"], path, bool(d.get("smoke")))
            pngs.append(path)
    return {"results": results, "summary": summary, "plots": pngs}
