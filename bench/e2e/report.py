"""Results of ``python -m bench.e2e`` on disk: one JSON per (model, method[, checkpointing]),
rewritten after every measurement, and ``results.md`` and ``plots/*.png`` made from every
JSON in the folder (the conventions of ``bench.report``; a separate schema, ``kind`` =
``"e2e"`` for device runs or ``"memory"`` for fake-tensor runs)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.report import SMOKE_BANNER

SCHEMA = "e2e-1"
ORDER = ("naive", "trl", "liger", "fastrlhf", "trl+fastrlhf")
COLORS = dict(zip(ORDER, ("tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:red")))
STYLES = {"naive": {"marker": "o"}, "trl": {"marker": "s", "ls": "--", "ms": 8, "mfc": "none"},
          "fastrlhf": {"marker": "^"}}
FAKE_BANNER = ("FAKE-TENSOR MEASUREMENT: peak memory counted by PyTorch's MemTracker on fake tensors "
               "on a CPU (no GPU ran); it claims no times.")


def _plain(value):
    """Plain JSON: non-finite floats become None, other objects their ``str``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


def write_json(path: Path, meta: dict, records: list[dict]) -> Path:
    """Write ``{"schema", **meta, "records"}`` atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_plain({"schema": SCHEMA, **meta, "records": records}), indent=1,
                              allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def load_dir(out: Path) -> list[dict]:
    docs = []
    for path in sorted(out.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            docs.append(doc)
    return docs


def _gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.3g}"


def _x(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _frontier_cell(f: dict) -> str:
    """``L (tokens)``, ``≥ L (tokens)`` when the largest length tried fitted, ``< L`` when none did."""
    if not f["completion_len"]:
        return f"< {f['tries'][0][0]}" if f.get("tries") else "–"
    return f"{'≥ ' if f.get('capped') else ''}{f['completion_len']} ({f['tokens']})"


def _sorted(records):
    return sorted(records, key=lambda r: ORDER.index(r["variant"]) if r["variant"] in ORDER else len(ORDER))


# ------------------------------------------------------------------ device runs
def e2e_table(doc: dict) -> str:
    """Per variant: part times, speed-ups, peak memory, frontier, parity."""
    recs = _sorted(doc["records"])
    by = {r["variant"]: r for r in recs}
    parts = doc["parts"]
    head = ["variant", *[f"{p} ms" for p in parts], "phase ms", "× vs naive", "× vs trl", "peak GiB",
            "frontier L (tokens)", "frontier × naive", "loss / grad-norm rel. err vs naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict[str, int] = {}
    for r in recs:
        f, fn = r.get("frontier") or {}, (by.get("naive") or {}).get("frontier") or {}
        front = _frontier_cell(f) if f else "–"
        if r["status"] != "ok":  # (one that ran out of memory at the timing length may have a frontier)
            mark = notes.setdefault(r["reason"], len(notes) + 1)
            cells = [r["variant"], f"{r['status']} [{mark}]", *[""] * (len(head) - 5), front,
                     _x(f.get("tokens"), fn.get("tokens")), ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        par = r.get("parity")
        cells = [r["variant"], *[f"{r['parts_ms'].get(p, 0):.4g}" for p in parts], f"{r['phase_ms']:.4g}",
                 _x((by.get("naive") or {}).get("phase_ms"), r["phase_ms"]),
                 _x((by.get("trl") or {}).get("phase_ms"), r["phase_ms"]), _gib(r.get("peak_phase_bytes")),
                 front, _x(f.get("tokens"), fn.get("tokens")),
                 "–" if not par else f"{par['loss_rel_err']:.1e} / {par['grad_norm_rel_err']:.1e}"
                                     f"{'' if par['ok'] else ' (over tolerance)'}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    return text + "".join(f"\n[{n}] {why}\n" for why, n in notes.items())


def _title(doc: dict) -> str:
    ckpt = ", gradient checkpointing" if doc.get("checkpointing") else ""
    return f"{doc['model']} · {doc['method']}{ckpt}"


def _e2e_markdown(docs: list[dict]) -> str:
    parts = ["# fastrlhf end-to-end training phase\n"]
    if any(d.get("smoke") for d in docs):
        parts.append(f"**{SMOKE_BANNER}**\n")
    parts.append("Made by `python -m bench.e2e` from the JSON beside this file (method: bench/README.md, "
                 "\"End-to-end training phase\"). One phase: reference pass, old-policy pass, policy "
                 "forward + backward (optimizer excluded); times are medians; peak: "
                 "`torch.cuda.max_memory_allocated` (weights included); frontier: the largest completion "
                 "length (micro-batch tokens) that fits; × vs: that variant's phase time over this one's.\n")
    for d in docs:
        env = d["env"]
        parts.append(f"## {_title(d)}\n")
        parts.append(f"{env.get('gpu') or 'CPU'}, torch {env['torch']}, bf16; batch {d['batch']}; "
                     f"`{env['command']}`\n")
        parts.append(e2e_table(d))
    notes = {r["variant"]: r["note"] for d in docs for r in d["records"] if r.get("note")}
    parts.append("Variants:\n\n" + "\n".join(f"- {v}: {notes[v]}" for v in ORDER if v in notes) + "\n")
    return "\n".join(parts)


def plot_e2e(doc: dict, path: Path) -> None:
    """Stacked part times per variant (left) and frontier tokens per variant (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in _sorted(doc["records"]) if r["status"] == "ok"]
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [r["variant"] for r in recs]
    bottom = [0.0] * len(recs)
    for part, hatch in zip(doc["parts"], ("", "//", "..")):
        vals = [r["parts_ms"].get(part, 0.0) for r in recs]
        ax_t.bar(names, vals, bottom=bottom, label=part, hatch=hatch,
                 color=[COLORS.get(n, "grey") for n in names], edgecolor="black", alpha=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_t.set(ylabel="median time (ms)", title="phase time by part")
    ax_t.legend(fontsize=7)
    front = [(r["variant"], (r.get("frontier") or {}).get("tokens") or 0) for r in recs]
    ax_f.bar([n for n, _ in front], [t for _, t in front], color=[COLORS.get(n, "grey") for n, _ in front])
    ax_f.set(ylabel="micro-batch tokens", title="frontier: largest micro-batch that fits")
    if not any(t for _, t in front):
        ax_f.text(0.5, 0.5, "no frontier search in this run", ha="center", transform=ax_f.transAxes)
    for ax in (ax_t, ax_f):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(doc) + (" — SMOKE RUN, claims no numbers" if doc.get("smoke") else ""))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.85, wspace=0.25)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ memory (fake tensors)
def doc_parts(doc: dict) -> tuple[str, ...]:
    return ("ref", "train") if doc["method"] == "dpo" else ("ref", "old", "train")


def frontier_rows(doc: dict) -> list[dict]:
    return _sorted([r for r in doc["records"] if r.get("kind") == "frontier"])


def memory_tables(doc: dict) -> str:
    """The frontier per variant and checkpointing, and the peak's breakdown at one length."""
    budget = doc["budget_bytes"]
    lines = [f"Fits: peak ≤ {_gib(budget)} GiB. Micro-batch: {doc['batch']}.\n",
             "| checkpointing | variant | largest completion L | micro-batch tokens | × naive | "
             "peak at that L (GiB) |", "|---|---|---|---|---|---|"]
    naive = {r["checkpointing"]: r for r in frontier_rows(doc) if r["variant"] == "naive"}
    for ckpt in (False, True):
        for r in [r for r in frontier_rows(doc) if r["checkpointing"] == ckpt]:
            n = naive.get(ckpt)
            cap = "≥ " if r.get("capped") else ""
            L = f"{cap}{r['completion_len']}" if r["completion_len"] else f"< {min(t[0] for t in r['tries'])}"
            lines.append(f"| {'on' if ckpt else 'off'} | {r['variant']} | {L} | {cap}{r['tokens'] or '–'} | "
                         f"{_x(r['tokens'], n and n['tokens'])} | {_gib(r.get('bytes'))} |")
    L = doc["breakdown_len"]
    cats = ("Parameter", "Gradient", "Activation", "Temp", "Other")
    lines += ["", f"Where the peak is, at completion length {L}, every part tracked (GiB by MemTracker "
                  "category; `Activation`: created in a forward, incl. no-grad passes; `Temp`: created in "
                  "the backward, incl. the fused head's workspace; the frontier search tracks the train "
                  "part, which holds the phase's peak):\n",
              "| checkpointing | variant | peak | " + " | ".join(cats) + " | part · pass · op | "
              + " / ".join(doc_parts(doc)) + " peaks |",
              "|" + "---|" * (len(cats) + 5)]
    for r in _sorted([r for r in doc["records"] if r.get("kind") == "peak" and r["completion_len"] == L]):
        w = r["where"]
        where = f"{w.get('part')} · {w.get('pass')} · `{w.get('op', '').removeprefix('aten.')}`"
        if w.get("module"):
            where += f" in `{w['module']}`"
        parts = " / ".join(_gib(r["parts"][p]) for p in doc_parts(doc) if p in r["parts"])
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['variant']} | {_gib(r['bytes'])} | "
                     + " | ".join(_gib(r["categories"].get(c, 0)) for c in cats) + f" | {where} | {parts} |")
    return "\n".join(lines) + "\n"


def _memory_markdown(docs: list[dict]) -> str:
    parts = ["# fastrlhf training-phase memory (fake tensors)\n", f"**{FAKE_BANNER}**\n",
             "Made by `python -m bench.e2e --memory` from the JSON beside this file (method: "
             "bench/README.md, \"Memory without a GPU\").\n"]
    for d in docs:
        env = d["env"]
        parts.append(f"## {d['model']} · {d['method']}\n")
        parts.append(f"torch {env['torch']}, transformers {d.get('transformers')}, trl {d.get('trl')}; "
                     f"`{env['command']}`\n")
        parts.append(memory_tables(d))
    return "\n".join(parts)


def plot_memory(doc: dict, path: Path) -> None:
    """Peak memory against completion length per variant, without and with checkpointing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    peaks = [r for r in doc["records"] if r.get("kind") == "peak"]
    for ax, ckpt in zip(axes, (False, True)):
        for v in ORDER:
            pts = sorted((r["completion_len"], r["bytes"] / 2**30) for r in peaks
                         if r["variant"] == v and r["checkpointing"] == ckpt)
            if pts:  # distinct markers and dashes: curves that coincide stay visible
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, color=COLORS.get(v), **STYLES.get(v, {}))
        ax.axhline(doc["budget_bytes"] / 2**30, color="grey", ls="--", lw=1, label="budget")
        ax.set(xscale="log", yscale="log", xlabel="completion length (tokens per sequence)",
               title=f"gradient checkpointing {'on' if ckpt else 'off'}")
        grid = set(doc.get("lengths") or ()) | {doc["breakdown_len"]}
        below = {r["completion_len"] for r in peaks if r["completion_len"] < min(grid)}  # halving below it
        ax.set_xticks(sorted(grid | below))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("peak memory (GiB)")
    fig.suptitle(f"{doc['model']} · {doc['method']} · {doc['batch']} — fake tensors (MemTracker), not a GPU run",
                 fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.87, wspace=0.08)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- folder
def render_dir(out: Path, plots: bool = True) -> dict:
    """(Re)write ``results.md`` and ``plots/<stem>.png`` from every JSON in ``out``."""
    docs = load_dir(out)
    e2e = [d for d in docs if d.get("kind") == "e2e"]
    mem = [d for d in docs if d.get("kind") == "memory"]
    text = []
    if e2e:
        text.append(_e2e_markdown(e2e))
    if mem:
        text.append(_memory_markdown(mem))
    results = out / "results.md"
    results.write_text("\n".join(text) if text else "no results\n")
    pngs = []
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for d in e2e:
            if any(r["status"] == "ok" for r in d["records"]):
                pngs.append(out / "plots" / f"{d['stem']}.png")
                plot_e2e(d, pngs[-1])
        for d in mem:
            pngs.append(out / "plots" / f"{d['stem']}.png")
            plot_memory(d, pngs[-1])
    return {"results": results, "plots": pngs}
