"""FedFQ's fine-grained uplink bit allocation (arXiv 2408.08977), by constraint-guided simulated
annealing: the arithmetic a FedFQ client runs on its update before packing it (``client``); the
allocator that asks for it lives in ``allocation.fedfq``.

[design] FedFQ allocates bits per parameter; here the unit is one parameter *tensor* (its rows
share a width), which keeps the payload format of ``quant.payload``. The objective is the
stochastic-rounding error of the update, sum_i n_i * s_i^2 / 4 with s_i = range_i / (2^(b_i-1) - 1),
under the budget sum_i n_i * b_i <= avg_bits * sum_i n_i. Moves change one tensor's width by one
bit; a move that breaks the budget is repaired by taking bits from the tensor whose error grows
least (the "constraint guidance"), otherwise it is rejected.
"""
from __future__ import annotations

import numpy as np
import torch

MIN_BITS, MAX_BITS = 2, 8


def _error(n: np.ndarray, r2: np.ndarray, b: np.ndarray) -> float:
    return float((n * r2 / (4.0 * (2.0 ** (b - 1) - 1) ** 2)).sum())


def fedfq_bits(deltas: dict[str, torch.Tensor], avg_bits: float, iters: int, seed: int) -> dict[str, int]:
    names = [k for k, v in deltas.items() if v.is_floating_point()]
    if not names:
        return {}
    n = np.array([deltas[k].numel() for k in names], dtype=float)
    r2 = np.array([float(deltas[k].abs().max()) ** 2 for k in names])
    budget = avg_bits * n.sum()
    b = np.full(len(names), int(np.clip(np.floor(avg_bits), MIN_BITS, MAX_BITS)), dtype=float)
    rng = np.random.default_rng(seed)
    cur = _error(n, r2, b)
    best_b, best = b.copy(), cur
    temp0 = max(cur, 1e-30) * 0.1
    for it in range(iters):
        temp = temp0 * (1 - it / iters) + 1e-30
        cand = b.copy()
        i = int(rng.integers(len(names)))
        cand[i] = np.clip(cand[i] + rng.choice((-1, 1)), MIN_BITS, MAX_BITS)
        # constraint guidance: repair an over-budget move by lowering the cheapest other tensor
        while (n * cand).sum() > budget:
            lowerable = np.flatnonzero((cand > MIN_BITS) & (np.arange(len(names)) != i))
            if lowerable.size == 0:
                break
            growth = [n[j] * r2[j] * (1 / (2.0 ** (cand[j] - 2) - 1 + 1e-12) ** 2 - 1 / (2.0 ** (cand[j] - 1) - 1) ** 2)
                      for j in lowerable]
            cand[lowerable[int(np.argmin(growth))]] -= 1
        if (n * cand).sum() > budget:
            continue
        e = _error(n, r2, cand)
        if e < cur or rng.random() < np.exp(-(e - cur) / temp):
            b, cur = cand, e
            if e < best:
                best_b, best = cand.copy(), e
    return {k: int(v) for k, v in zip(names, best_b)}
