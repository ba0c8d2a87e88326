"""Time-to-accuracy and speed-up arithmetic on (simulated time, accuracy) curves."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

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


def running_mean(curve: Curve, k: int = 3) -> list[list[float]]:
    """``curve`` with each accuracy replaced by the mean of its last ``k`` evaluations (fewer at
    the start): one evaluation's dip or spike does not decide a crossing."""
    out = []
    for i, (t, _) in enumerate(curve):
        window = [a for _, a in curve[max(0, i - k + 1):i + 1]]
        out.append([float(t), float(np.mean(window))])
    return out


# Student's t, two-sided 95% (0.975 quantile) for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (beyond 30: the normal's
    quantile with the Cornish-Fisher terms in 1/df and 1/df^2, within 1e-3 of the exact value)."""
    if df < 1:
        raise ValueError("t975: needs df >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values: Iterable[float | None]) -> tuple[float | None, list[float] | None]:
    """Mean and 95% t-interval of paired differences (one per seed). One value: the mean and no
    interval; none: (None, None)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None
    half = t975(len(v) - 1) * float(v.std(ddof=1)) / float(np.sqrt(len(v)))
    return mean, [mean - half, mean + half]


def verdict(interval: list[float] | None, margin: float = 0.0) -> str:
    """better (the interval lies above ``margin``), worse (below ``-margin``), or equal (it
    contains the band, or there is no interval)."""
    if interval is None:
        return "equal"
    lo, hi = interval
    return "better" if lo > margin else "worse" if hi < -margin else "equal"


def commit_audit(by_seed: dict[int, dict[str, dict[str, Any]]], method: str, pure: tuple[str, ...] | list[str]
                 ) -> dict[str, Any] | None:
    """An audit of the method's online commits (``by_seed``: seed -> strategy -> study run record),
    per seed: the mode, the exploring comparisons' mean and standard error (QAT minus PTQ, points),
    whether their 95% t-interval excludes 0 (``evidence``: the commit rests on more than a coin flip
    at this power; a forked run's decision carries its own), and whether the commit matches the
    pure strategy that ended better on *validation* (``right``; the test split only reports).
    None where no run of the setting decided online."""
    rows: dict[str, Any] = {}
    for seed in sorted(by_seed):
        run = by_seed[seed].get(method, {})
        d = run.get("decision")
        if not d or not set(pure) <= set(by_seed[seed]):
            continue
        n, gain, se = int(d.get("online_n", 0)), 100 * float(d["online_gain"]), 100 * float(d.get("online_se") or np.nan)
        half = t975(n - 1) * se if n > 1 and np.isfinite(se) else None
        evident = bool(d["evidence"]) if "evidence" in d else half is not None and abs(gain) > half
        better = max(pure, key=lambda p: by_seed[seed][p]["tail_acc_q_val"])
        mode = "all-qat" if d.get("committed_qat") else "all-ptq"
        rows[str(seed)] = {"commit": mode.split("-")[1], "gain_pts": gain, "se_pts": se, "n": n,
                           "evidence": evident, "better_pure_on_val": better,
                           "right": mode == better}
    if not rows:
        return None
    v = list(rows.values())
    return {"per_seed": rows, "right": sum(r["right"] for r in v), "with_evidence": sum(r["evidence"] for r in v),
            "right_with_evidence": sum(r["right"] and r["evidence"] for r in v), "n": len(v)}


def commit_line(name: str, dec: dict[str, Any] | None) -> str | None:
    """One line for a setting's :func:`commit_audit`, or None."""
    if not dec:
        return None
    return (f"{name}: fedhq's commits (comparisons' mean +- se, points): " + ", ".join(
        f"seed {k}: {r['commit'].upper()} on {r['gain_pts']:+.1f} +- {r['se_pts']:.1f}"
        + ("" if r["evidence"] else " (no evidence)") + ("" if r["right"] else f" (wrong: {r['better_pure_on_val']} "
                                                          "better on validation)")
        for k, r in dec["per_seed"].items())
        + f"; right in {dec['right']}/{dec['n']}, with evidence in {dec['with_evidence']}/{dec['n']}")
