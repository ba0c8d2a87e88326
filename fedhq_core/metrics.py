"""Time-to-accuracy and speed-up arithmetic on (simulated time, accuracy) curves."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Curve = Sequence[Sequence[float]]  # [[sim_s, acc], ...] in time order


def time_to_accuracy(curve: Curve, target: float) -> float | None:
    """First simulated time at which accuracy reaches ``target`` (None if never)."""
    for t, acc in curve:
        if acc >= target:
            return float(t)
    return None


def accuracy_at(curve: Curve, t: float) -> float:
    """Accuracy of the last evaluation at or before time ``t`` (0 before the first)."""
    best = 0.0
    for ti, acc in curve:
        if ti <= t + 1e-12:
            best = float(acc)
        else:
            break
    return best


def speedup(tta_baseline: float | None, tta_method: float | None) -> float | None:
    """How many times faster the method reaches the target (None if either never does)."""
    if tta_baseline is None or tta_method is None or tta_method <= 0:
        return None
    return tta_baseline / tta_method


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v))
