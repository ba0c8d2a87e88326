"""Server side: FedAvg of dequantized updates into an FP32 master, averaging of the clients'
activation ranges, and evaluation of the FP32 master and of the deployed quantized model.

The deployed model is the master quantized at w_bits/a_bits: MSE-optimal per-channel weight
scales computed from the master itself and the clients' averaged activation ranges, so the
server needs no data. Only the fp32 baseline, whose clients send no ranges, is calibrated on a
small server split (:func:`calibrate_on_server`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .client import ClientResult
from .phases import span
from .quant import (get_act_ranges, get_weight_steps, init_weight_steps, load_model_state, prepare_deploy,
                    reset_act_ranges, set_mode, unpack_update)


def fedavg(global_state: dict[str, torch.Tensor], results: Sequence[ClientResult]) -> dict[str, torch.Tensor]:
    """Master += sum_m (|D_m| / sum |D|) * dequantized update_m (floating tensors only)."""
    if not results:
        return global_state
    total = float(sum(r.n_samples for r in results))
    new = {k: v.clone() for k, v in global_state.items()}
    for r in sorted(results, key=lambda r: r.cid):  # fixed order: same sums on any runner
        w = r.n_samples / total
        for k, delta in unpack_update(r.payload).items():
            new[k].add_(delta.to(new[k].device, new[k].dtype), alpha=w)
    return new


def robust_average(global_state: dict[str, torch.Tensor], results: Sequence[ClientResult], method: str,
                   trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Master += the coordinate-wise ``median`` or ``trimmed-mean`` (``trim`` of the uploads cut at
    each end of every coordinate) of the dequantized updates, unweighted: a poisoned update moves a
    coordinate only as far as the honest ones around it allow (Yin et al., ICML 2018)."""
    if not results:
        return global_state
    deltas = [unpack_update(r.payload) for r in sorted(results, key=lambda r: r.cid)]
    new = {k: v.clone() for k, v in global_state.items()}
    for k in deltas[0]:
        stack = torch.stack([d[k] for d in deltas])
        if method == "median":
            agg = stack.median(dim=0).values
        else:
            cut = int(trim * len(deltas))
            agg = stack.sort(dim=0).values[cut:len(deltas) - cut].mean(dim=0)
        new[k].add_(agg.to(new[k].device, new[k].dtype))
    return new


def update_norm(result: ClientResult) -> float:
    """The L2 norm of an upload's dequantized update (the server's norm bound, ``dispatch``)."""
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in unpack_update(result.payload).values())))


def aggregate(global_state: dict[str, torch.Tensor], global_ranges: dict[str, tuple[float, float]] | None,
              results: Sequence[ClientResult], method: str = "fedavg", trim: float = 0.2,
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]] | None, dict[str, torch.Tensor] | None]:
    """One round of the server's aggregation: the master (FedAvg, or a robust ``method``), the
    averaged activation ranges (kept when no client sent any) and the QAT clients' averaged weight
    steps (None without QAT). The clock prices exactly this function from its trace
    (``hardware.server_work``)."""
    master = fedavg(global_state, results) if method == "fedavg" else robust_average(global_state, results, method, trim)
    return nonnegative_variances(master), average_ranges(results, global_ranges), average_steps(results)


VAR_FLOOR = 1e-5   # BatchNorm's default eps: a variance never ends below it


def nonnegative_variances(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm running variances (``*running_var``) clamped at ``VAR_FLOOR``, in place. They
    travel at full precision (``payload.tensor_bits``), so an average of them is one; the floor
    guards what a robust rule or a float rounding could still leave: a variance clamped at
    exactly 0 would scale its channel by 1/sqrt(eps), ~316 at eps 1e-5."""
    for k, v in state.items():
        if k.endswith("running_var"):
            v.clamp_(min=VAR_FLOOR)
    return state


def average_ranges(results: Iterable[ClientResult],
                   previous: dict[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]] | None:
    """Sample-weighted mean of the uploaded activation ranges; keeps ``previous`` if none came."""
    acc: dict[str, list[float]] = {}
    for r in results:
        for k, (lo, hi) in r.payload.act_ranges.items():
            a = acc.setdefault(k, [0.0, 0.0, 0.0])
            a[0] += r.n_samples * lo
            a[1] += r.n_samples * hi
            a[2] += r.n_samples
    if not acc:
        return previous
    return {k: (lo / n, hi / n) for k, (lo, hi, n) in acc.items()}


def average_steps(results: Iterable[ClientResult]) -> dict[str, torch.Tensor] | None:
    """Sample-weighted mean of the QAT clients' learned weight steps (None when no QAT client)."""
    acc: dict[str, torch.Tensor] = {}
    n_tot = 0
    for r in results:
        if not r.payload.weight_steps:
            continue
        n_tot += r.n_samples
        for k, v in r.payload.weight_steps.items():
            acc[k] = acc.get(k, 0) + r.n_samples * torch.from_numpy(v)
    return {k: v / n_tot for k, v in acc.items()} if acc else None


def master_mse_steps(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MSE-optimal per-channel weight scales of ``state`` (what a PTQ deployment uses)."""
    load_model_state(model, state)
    init_weight_steps(model)
    return get_weight_steps(model)


def blend_steps(model: nn.Module, master: dict[str, torch.Tensor], learned: dict[str, torch.Tensor] | None,
                results: Sequence[ClientResult]) -> dict[str, torch.Tensor] | None:
    """The deployed weight steps of a round: the QAT clients' averaged learned steps where every
    upload was QAT; in a hybrid round the data-weighted mean of those and the new master's MSE
    scales (the PTQ clients' share: their weights never trained against the learned steps, and
    one QAT client's steps would otherwise deploy a mostly-PTQ model)."""
    n_all = sum(r.n_samples for r in results)
    n_qat = sum(r.n_samples for r in results if r.payload.weight_steps)
    if learned is None or n_qat >= n_all:
        return learned
    mse = master_mse_steps(model, master)
    return {k: (n_qat * v + (n_all - n_qat) * mse[k].to(v.dtype)) / n_all for k, v in learned.items()}


@torch.no_grad()
def calibrate_on_server(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
                        batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """Percentile activation ranges from a small server split (fp32 baseline only)."""
    load_model_state(model, state)
    reset_act_ranges(model)
    set_mode(model, "observe")
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
    set_mode(model, "fp")
    return get_act_ranges(model)


def proxy_gap(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """The master's quantization gap under server-side PTQ on the proxy split: ranges calibrated
    on ``x``, MSE weight scales; FP32 minus quantized accuracy."""
    ranges = calibrate_on_server(model, state, x)
    m = evaluate_global(model, state, ranges, x, y)
    return m["acc_fp32"] - m["acc_q"]


def upload_quant_loss(model: nn.Module, state: dict[str, torch.Tensor], result: ClientResult, x: torch.Tensor,
                      y: torch.Tensor) -> float:
    """A PTQ client's quantization sensitivity, measured by the server from its upload:
    its local model (``state`` + the dequantized update) deployed with its own activation ranges
    and MSE weight scales, FP32 minus quantized accuracy on the proxy split ``x``, ``y``."""
    delta = unpack_update(result.payload)
    local = {k: v + delta[k].to(v.device, v.dtype) if k in delta else v for k, v in state.items()}
    m = evaluate_global(model, local, result.payload.act_ranges or None, x, y)
    return m["acc_fp32"] - m["acc_q"]


def deployed_acc(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                 results: Sequence[ClientResult], x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on ``x``, ``y`` of ``results`` aggregated (FedAvg) into ``state`` and deployed as a
    run deploys (averaged ranges; :func:`blend_steps`). Accuracy, not
    cross-entropy: a 2-bit model quantized to noise predicts near-uniformly and so scores a
    *lower* loss than a confident model of two classes (measured: it sent digits at w2a2 to PTQ)."""
    master, rng, steps = aggregate(state, ranges, results)
    return evaluate_global(model, master, rng, x, y, blend_steps(model, master, steps, results))["acc_q"]


def partial_gain(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                 results: Sequence[ClientResult], x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, int]:
    """The round's online SigAcc signal: ``k`` of its QAT uploads and ``k`` of its PTQ uploads
    (``k`` the smaller count; the larger side drawn seeded by the round's clients, so neither
    partial averages more updates than the other) aggregated apart from the same master, each
    deployed (:func:`deployed_acc`) and scored on the proxy split: QAT minus PTQ accuracy (None
    when the round had not both strategies), and ``k``."""
    sides = {s: sorted((r for r in results if r.strategy == s), key=lambda r: r.cid) for s in ("qat", "ptq")}
    k = min(len(v) for v in sides.values())
    if k == 0:
        return None, 0
    pick = np.random.default_rng(sorted(r.cid for r in results))
    acc = {}
    for strategy, sub in sides.items():
        if len(sub) > k:
            sub = [sub[i] for i in sorted(pick.choice(len(sub), k, replace=False))]
        acc[strategy] = deployed_acc(model, state, ranges, sub, x, y)
    return acc["qat"] - acc["ptq"], k


def swap_gains(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
               ptq: Sequence[ClientResult], qat: Sequence[ClientResult], picks: Sequence[bool],
               x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-client counterfactual gains of a paired round (``ptq[i]``, ``qat[i]``: client i's two
    uploads from the same master): the hybrid ``picks`` (True: QAT) aggregated with client i's
    QAT upload against with its PTQ upload, QAT minus PTQ deployed accuracy on ``x``, ``y``."""
    base = [q if p else r for r, q, p in zip(ptq, qat, picks)]
    base_acc = deployed_acc(model, state, ranges, base, x, y)
    out = []
    for i in range(len(base)):
        other = list(base)
        other[i] = ptq[i] if picks[i] else qat[i]
        swapped = deployed_acc(model, state, ranges, other, x, y)
        out.append(base_acc - swapped if picks[i] else swapped - base_acc)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Accuracy (0..1) and mean cross-entropy of ``model`` in its current mode."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / max(1, len(y)), loss / max(1, len(y))


def evaluate_global(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                    x: torch.Tensor, y: torch.Tensor, steps: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """FP32 master and deployed (quantized) accuracy/loss on a test split."""
    with span("evaluate fp32"):
        load_model_state(model, state)
        set_mode(model, "fp")
        acc_fp, loss_fp = evaluate(model, x, y)
    with span("evaluate quantized"):
        prepare_deploy(model, ranges, steps)
        acc_q, loss_q = evaluate(model, x, y)
    set_mode(model, "fp")
    return {"acc_fp32": acc_fp, "loss_fp32": loss_fp, "acc_q": acc_q, "loss_q": loss_q}
