"""The frontier: the largest completion length that fits, by a bounded search.

``fits(L)`` runs a phase at completion length ``L`` and returns ``(ok, peak_bytes)`` (the
peak may be None: a real run that ran out of memory has none). The grid is tried in
increasing order up to the first failure (with ``stop_above``: on past it, for the plot,
until a peak exceeds ``stop_above`` bytes); when even the first length fails, halving goes
below the grid, down to ``step``. Then the gap between the last length that fitted and the
first that did not is narrowed to ``step`` tokens. The next length tried is the midpoint,
or, when both ends have a peak (fake-tensor runs, where peak memory is close to affine in
``L``), the length where the straight line between them meets ``budget``: then two tries
usually settle it. Memory is assumed to grow with ``L``.
"""

from __future__ import annotations

from collections.abc import Callable


def _next(lo: int, hi: int, step: int, peaks: dict, budget: int | None) -> int:
    guess = (lo + hi) // 2
    p_lo, p_hi = peaks.get(lo), peaks.get(hi)
    if budget is not None and p_lo is not None and p_hi is not None and p_hi > p_lo:
        guess = lo + int((budget - p_lo) * (hi - lo) / (p_hi - p_lo))
    guess = guess // step * step
    return min(max(guess, lo + step), hi - step)


def frontier(fits: Callable[[int], tuple[bool, int | None]], grid: list[int], step: int, *,
             budget: int | None = None, stop_above: int | None = None) -> dict:
    """``{"completion_len": largest L that fitted (0: none), "capped": True when the largest
    grid length fitted (the frontier is at least that), "tries": [[L, ok, peak], ...]}``."""
    tries, peaks = [], {}
    lo = hi = None

    def attempt(L: int) -> bool:
        ok, peak = fits(L)
        tries.append([L, ok, peak])
        if peak is not None:
            peaks[L] = peak
        return ok

    for L in sorted(grid):
        ok = attempt(L)
        if ok and hi is None:
            lo = L
        elif not ok and hi is None:
            hi = L
        if hi is not None and (stop_above is None or peaks.get(L, stop_above + 1) > stop_above):
            break
    while lo is None and hi is not None and hi // 2 >= step:  # below the grid: halve
        if attempt(hi // 2):
            lo = hi // 2
        else:
            hi //= 2
    if lo is None or hi is None:
        return {"completion_len": lo or 0, "capped": hi is None and lo is not None, "tries": tries}
    while hi - lo > step:
        L = _next(lo, hi, step, peaks, budget)
        if attempt(L):
            lo = L
        else:
            hi = L
    return {"completion_len": lo, "capped": False, "tries": tries}
