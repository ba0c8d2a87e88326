"""Figures: the allocation scatter (why each client got PTQ or QAT) and benchmark charts."""
from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedhq_core.strategies import METHOD  # noqa: E402


def save_figure(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


SCATTER_MAX_POINTS = 200   # more points than this are not readable: a seeded sample is drawn
SCATTER_LABEL_MAX = 40     # client ids are written next to the points up to this many


def scatter_sample(data: dict[str, Any], max_points: int = SCATTER_MAX_POINTS) -> tuple[dict[str, Any], int]:
    """At most ``max_points`` of the round's clients (a sample seeded by the round), and how many
    there were; per-client lists are cut to the sample, everything else is kept."""
    n = len(data["cids"])
    if n <= max_points:
        return data, n
    keep = np.sort(np.random.default_rng([int(data.get("round", 0)), 4099]).choice(n, max_points, replace=False))
    return {k: [v[i] for i in keep] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n else v
            for k, v in data.items()}, n


def allocation_scatter(data: dict[str, Any], path: str, title: str | None = None) -> str:
    """Clients at (s_hat, a_hat), coloured by strategy, with the xi line (1-xi)*a = xi*(1-s).
    Clients whose predicted gain is not positive (the sign sent them to PTQ) are drawn apart.
    Past ``SCATTER_MAX_POINTS`` clients a seeded sample is drawn, and the title says so."""
    data, n_all = scatter_sample(data)
    s, a = np.asarray(data["s_hat"]), np.asarray(data["a_hat"])
    qat, free = np.asarray(data["qat"], bool), np.asarray(data["free"], bool)
    excluded = np.asarray(data["gain"]) <= 0 if "gain" in data else np.zeros_like(qat)
    coarse = np.asarray(data.get("coarse", data["qat"]), bool)
    xi = float(data["xi"])
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    if xi < 1:
        xs = np.linspace(0, 1, 50)
        ys = xi * (1 - xs) / (1 - xi)
        ax.plot(xs, ys, "k--", lw=1, label=f"ξ line: (1−ξ)·â = ξ·(1−ŝ), ξ={xi:g}")
        ax.fill_between(xs, ys, 1.05, color="tab:green", alpha=0.06)
    if (qat & ~free).any():
        ax.scatter(s[qat & ~free], a[qat & ~free], c="tab:green", s=50, label="QAT (above the line)", zorder=3)
    if (qat & free).any():
        ax.scatter(s[qat & free], a[qat & free], c="tab:green", marker="*", s=120, label="QAT (free: t_QAT ≤ T*)",
                   zorder=3)
    ptq = ~qat & ~excluded
    if ptq.any():
        ax.scatter(s[ptq], a[ptq], c="tab:red", marker="s", s=45, label="PTQ (below the line)", zorder=3)
    if excluded.any():
        ax.scatter(s[excluded], a[excluded], c="tab:gray", marker="x", s=45, zorder=3,
                   label=f"PTQ: predicted gain ≤ 0 ({int(excluded.sum())})")
    flipped = qat != coarse
    if flipped.any():
        ax.scatter(s[flipped], a[flipped], facecolors="none", edgecolors="k", s=160, lw=1.2,
                   label="flipped by fine search", zorder=4)
    if len(s) <= SCATTER_LABEL_MAX:
        for cid, x, y in zip(data["cids"], s, a):
            ax.annotate(str(cid), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("speed ŝ (normalised 1/t_PTQ, 1 = fastest)")
    ax.set_ylabel("accuracy significance â (normalised positive SigAcc)")
    title = title or f"FedHQ allocation, round {data['round']}"
    if n_all > len(s):
        title += f"\n(a random {len(s)} of the round's {n_all} clients shown)"
    ax.set_title(title, fontsize=10 if n_all > len(s) else None)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def accuracy_vs_time(curves: dict[str, list[list[float]]], path: str, target: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for name, pts in curves.items():
        if pts:
            t, acc = zip(*pts)
            ax.plot(t, np.asarray(acc) * 100, marker=".", label=name, lw=1.4 if name != METHOD else 2.4)
    if target is not None:
        ax.axhline(target * 100, color="gray", ls=":", lw=1, label=f"TTA target {target * 100:.1f}%")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("deployed quantized test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def tta_bars(tta: dict[str, float | None], path: str) -> str:
    names = list(tta)
    vals = [tta[n] if tta[n] is not None else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    bars = ax.bar(names, vals, color=["tab:green" if n == METHOD else "tab:blue" for n in names])
    for b, n in zip(bars, names):
        if tta[n] is None:
            ax.annotate("not reached", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=7,
                        rotation=90)
    ax.set_ylabel("simulated time to target accuracy (s)")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def accuracy_bands(curves: dict[str, list[list[list[float]]]], path: str, title: str = "") -> str:
    """Deployed test accuracy against simulated time, per strategy: the mean over seeds on a
    common time grid (each seed's curve held between its evaluations) with the range as a band."""
    fig, ax = plt.subplots(figsize=(6.6, 4.4), dpi=110)
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        end = min(r[-1][0] for r in runs)
        grid = np.linspace(min(r[0][0] for r in runs), end, 200)
        ys = np.array([np.interp(grid, [t for t, _ in r], [a for _, a in r]) for r in runs]) * 100
        line, = ax.plot(grid, ys.mean(0), label=f"{name} (n={len(runs)})", lw=2.4 if name == METHOD else 1.4)
        ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("simulated time (s), fit charged")
    ax.set_ylabel("deployed quantized test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def paired_differences(paired: dict[str, dict[str, Any]], path: str, title: str = "") -> str:
    """fedhq minus each baseline in tail accuracy (points): each seed a dot, the mean with its 95%
    t-interval as an error bar, and zero and -1 point marked."""
    names = list(paired)
    fig, ax = plt.subplots(figsize=(6.6, 0.5 + 0.55 * len(names)), dpi=110)
    for i, n in enumerate(names):
        e = paired[n]
        ax.scatter([100 * v for v in e["acc_per_seed"]], [i] * len(e["acc_per_seed"]), color="gray", s=14, zorder=2)
        ci = e["acc_ci95"]
        err = None if ci is None else [[100 * (e["acc_mean"] - ci[0])], [100 * (ci[1] - e["acc_mean"])]]
        ax.errorbar([100 * e["acc_mean"]], [i], xerr=err, fmt="o", color="tab:green", capsize=4, zorder=3)
    ax.axvline(0, color="k", lw=1)
    ax.axvline(-1, color="tab:red", lw=1, ls=":", label="-1 point")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("tail accuracy difference (points); dots: seeds; bar: 95% t-interval")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
