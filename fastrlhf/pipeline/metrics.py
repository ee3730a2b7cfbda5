"""Metrics as JSONL, PNG plots of the training curves, progress bars, and a timing breakdown."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict

import torch

# Sections of the timing breakdown, in the order they are printed.
GENERATE, MODEL, OPS, REWARD, OPTIM = "generate", "model", "fastrlhf ops", "reward fn", "optimizer"


class Timer:
    """Wall time per named section; a nested section's time is not counted in its parent.

    ``with timer("model"): ... with timer("fastrlhf ops"): ...`` books the op's time to
    ``"fastrlhf ops"`` and the rest to ``"model"``. With ``sync=True`` (CUDA) each boundary
    synchronizes the device so the time is the device's, not the launch's.
    """

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            _, nested = self._stack.pop()
            self.totals[name] += elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed

    def reset(self) -> None:
        self.totals.clear()

    def breakdown(self, total: float) -> dict[str, float]:
        """Seconds per section plus ``"other"`` (data, logging, checkpoints) up to ``total``."""
        out = {k: round(v, 3) for k, v in sorted(self.totals.items(), key=lambda kv: -kv[1])}
        out["other"] = round(max(total - sum(self.totals.values()), 0.0), 3)
        out["total"] = round(total, 3)
        return out


def format_breakdown(times: dict[str, float]) -> str:
    total = times["total"] or 1e-9
    parts = [f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in times.items() if k != "total"]
    return f"{times['total']:.1f}s: " + ", ".join(parts)


class MetricsLog:
    """Writes ``{"step": s, ...}`` lines to ``path`` and shows a tqdm bar with live metrics.

    On resume (``start > 0``) the lines of steps ``>= start`` are dropped, since they are
    about to be written again. Only the main process (``enabled``) writes or shows anything.
    """

    def __init__(self, path: str, *, total: int, start: int = 0, enabled: bool = True,
                 progress: bool = True, desc: str = "", postfix: tuple[str, ...] = ()):
        self.path, self.enabled, self.postfix = path, enabled, postfix
        self.records: list[dict] = []
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if start > 0 and os.path.exists(path):
                self.records = [r for r in read_jsonl_records(path) if r.get("step", -1) < start]
            if self.records:
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.records)
            elif os.path.exists(path):
                os.remove(path)
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{record[k]:.3g}" for k in self.postfix
                                  if isinstance(record.get(k), float)}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(records: list[dict], path: str, title: str, first: tuple[str, ...] = ()) -> str | None:
    """One panel per numeric metric against ``step`` (``first`` first, then by name; metrics
    that never change are listed under the title instead); returns the PNG path (None without
    matplotlib or data). Panels are 3.4 x 2.5 inches at 100 dpi, at most four a row."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    series: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append((r["step"], v))
    if not series:
        return None
    constant = {k: pts[0][1] for k, pts in series.items() if len({v for _, v in pts}) == 1 and len(pts) > 1}
    keys = [k for k in first if k in series and k not in constant]
    keys += sorted(k for k in series if k not in constant and k not in keys)
    if not keys:
        keys = sorted(series)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = zip(*series[key])
        ax.plot(xs, ys, lw=1.4, marker="." if len(xs) < 30 else None, color="C0" if key not in first else "C3")
        ax.set_title(key, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-4, 5), useOffset=False)
        ax.grid(alpha=0.3)
        if i >= len(keys) - cols:
            ax.set_xlabel("step", fontsize=9)
    note = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(constant.items()))
    fig.suptitle(title + (f"\nconstant: {note}" if note else ""), fontsize=11)
    fig.savefig(path)
    return path
