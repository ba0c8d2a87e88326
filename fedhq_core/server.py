"""Server side: FedAvg of dequantized updates into an FP32 master, averaging of the clients'
activation ranges, and evaluation of the FP32 master and of the deployed quantized model.

The deployed model is the master quantized at w_bits/a_bits: MSE-optimal per-channel weight
scales computed from the master itself (or the QAT clients' learned steps) and the clients'
activation ranges, so deploying needs no data. The server does hold data: a proxy split of
``server_calib_size`` training images (at most a tenth of the training set: 143 on digits, 256 on
CIFAR-10's 10k), held out of every client's shard. The fp32 baseline, whose clients send no
ranges, is calibrated on it (:func:`calibrate_on_server`), and fedhq's measurements (the gap,
sensitivities, partial aggregates) are scored on it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .client import ClientResult, Mode
from .phases import span
from .quant import (get_act_ranges, get_weight_steps, init_weight_steps, load_model_state, prepare_deploy,
                    reset_act_ranges, set_mode, unpack_update)
from .quant.payload import dequantize_tensor


STATS = ("running_mean", "running_var")   # BatchNorm statistics (uploaded at full precision)


def bound_keep(sizes: torch.Tensor, bound: float, two_sided: bool, ref: float | None = None) -> torch.Tensor:
    """Which of a round's values (one per upload, of one layer) to keep: those whose ``sizes``
    lie within ``bound`` x a centre, and, ``two_sided``, at least the centre over ``bound``. The
    centre is the round's median where there are three values or more and it agrees with
    ``ref`` (the server's own value of the last round) within ``bound``; otherwise ``ref``: a
    lone upload, or a round whose majority is poisoned, cannot move it. Everything is kept with
    ``bound`` 0, or with neither a median nor a reference to go by. Torch ops throughout, so the
    aggregation's trace prices it."""
    keep_all = torch.ones(len(sizes), dtype=torch.bool)
    med = sizes.median()
    if bound <= 0:
        return keep_all
    centre = med if len(sizes) >= 3 and bool(med > 0) else None
    if ref is not None and ref > 0 and (centre is None or not ref / bound <= float(centre) <= ref * bound):
        centre = torch.tensor(ref, dtype=sizes.dtype)
    if centre is None:
        return keep_all
    keep = sizes <= bound * centre
    if two_sided:
        keep &= sizes >= centre / bound
    return keep


def combine(values: torch.Tensor, weights: torch.Tensor, method: str, trim: float) -> torch.Tensor:
    """One value from a stack (uploads first): the ``weights``-weighted mean (``fedavg``), or the
    unweighted coordinate-wise ``median`` or ``trimmed-mean``."""
    if method == "median":
        return values.median(dim=0).values
    if method == "trimmed-mean":
        cut = int(trim * len(values))
        return values.sort(dim=0).values[cut:len(values) - cut].mean(dim=0)
    w = weights.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (w * values).sum(dim=0) / w.sum()


def bounded_combine(values: torch.Tensor, weights: torch.Tensor, sizes: torch.Tensor, method: str, trim: float,
                    bound: float, reference: torch.Tensor | None = None, ref_size: float | None = None) -> torch.Tensor:
    """One layer's value of a round: the uploads' ``values`` whose ``sizes`` lie within ``bound``
    either way (:func:`bound_keep`, centred with ``ref_size``), combined by ``method``;
    ``reference`` (the server's own value) where none is kept, or all of them without one."""
    keep = bound_keep(sizes, bound, True, ref_size)
    if not bool(keep.any()):
        if reference is not None:
            return reference
        keep = torch.ones_like(keep)
    return combine(values[keep], weights[keep], method, trim)


def stats_keep(results: Sequence[ClientResult], bound: float) -> dict[str, set[int]]:
    """For each BatchNorm statistic, the clients whose delta's norm is within ``bound`` x the
    round's median (a poisoned mean or variance passes the update norm when the weights are
    honest). Only these 32-bit tensors are decoded for it."""
    if bound <= 0:
        return {}                        # nothing to leave out: every upload averages
    keys = [k for k in (results[0].payload.tensors if results else {}) if k.endswith(STATS)]
    out = {}
    for k in keys:
        norms = torch.stack([dequantize_tensor(r.payload.tensors[k]).double().norm() for r in results])
        keep = bound_keep(norms, bound, two_sided=False)
        out[k] = {r.cid for r, kept in zip(results, keep.tolist()) if kept}
    return out


def fedavg(global_state: dict[str, torch.Tensor], results: Sequence[ClientResult],
           bound: float = 0.0) -> dict[str, torch.Tensor]:
    """Master += sum_m (|D_m| / sum |D|) * dequantized update_m (floating tensors only); a
    BatchNorm statistic averages only the uploads within ``bound`` (:func:`stats_keep`)."""
    if not results:
        return global_state
    keep = stats_keep(results, bound)
    total = float(sum(r.n_samples for r in results))
    kept_total = {k: float(sum(r.n_samples for r in results if r.cid in cids)) for k, cids in keep.items()}
    new = {k: v.clone() for k, v in global_state.items()}
    for r in sorted(results, key=lambda r: r.cid):  # fixed order: same sums on any runner
        for k, delta in unpack_update(r.payload).items():
            if k in keep and r.cid not in keep[k]:
                continue
            w = r.n_samples / (kept_total[k] if k in keep else total)
            new[k].add_(delta.to(new[k].device, new[k].dtype), alpha=w)
    return new


def robust_average(global_state: dict[str, torch.Tensor], results: Sequence[ClientResult], method: str,
                   trim: float = 0.2, bound: float = 0.0) -> dict[str, torch.Tensor]:
    """Master += the coordinate-wise ``median`` or ``trimmed-mean`` (``trim`` of the uploads cut at
    each end of every coordinate) of the dequantized updates, unweighted: a poisoned update moves a
    coordinate only as far as the honest ones around it allow (Yin et al., ICML 2018). A
    BatchNorm statistic takes only the uploads within ``bound`` (:func:`stats_keep`)."""
    if not results:
        return global_state
    ordered = sorted(results, key=lambda r: r.cid)
    keep = stats_keep(ordered, bound)
    deltas = [unpack_update(r.payload) for r in ordered]
    new = {k: v.clone() for k, v in global_state.items()}
    for k in deltas[0]:
        rows = [d[k] for r, d in zip(ordered, deltas) if k not in keep or r.cid in keep[k]]
        agg = combine(torch.stack(rows), torch.ones(len(rows)), method, trim)
        new[k].add_(agg.to(new[k].device, new[k].dtype))
    return new


def update_norm(result: ClientResult) -> float:
    """The L2 norm of an upload's dequantized update (the server's norm bound, ``dispatch``)."""
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in unpack_update(result.payload).values())))


def aggregate(global_state: dict[str, torch.Tensor], global_ranges: dict[str, tuple[float, float]] | None,
              results: Sequence[ClientResult], method: str = "fedavg", trim: float = 0.2, bound: float = 0.0,
              ref_steps: dict[str, torch.Tensor] | Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]] | None, dict[str, torch.Tensor] | None]:
    """One round of the server's aggregation: the master (FedAvg, or a robust ``method``), the
    clients' activation ranges (kept when no client sent any) and the QAT clients' weight steps
    (None without QAT). Everything a client uploads goes through the same rule: the weights, the
    BatchNorm statistics, the ranges and the steps are each combined by ``method``, after the
    values beyond ``bound`` (:func:`bound_keep`) are left out: BatchNorm statistics against the
    round's median, ranges against the round's median and ``global_ranges``, steps against the
    round's median and ``ref_steps`` (the steps the server deployed last, or a function of the new
    master that gives them); whole updates by their norm in ``dispatch``. The clock prices exactly
    this function from its trace (``hardware.server_work``)."""
    master = (fedavg(global_state, results, bound) if method == "fedavg"
              else robust_average(global_state, results, method, trim, bound))
    ref = ref_steps(master) if callable(ref_steps) else ref_steps
    return (nonnegative_variances(master), average_ranges(results, global_ranges, method, trim, bound),
            average_steps(results, method, trim, bound, ref))


def momentum_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The master's trained tensors: floating, and not a BatchNorm statistic (those are
    measurements of the activations, averaged as they come)."""
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(STATS)]


def momentum_on(momentum: float, lr: float) -> bool:
    """Whether FedAvgM changes FedAvg's master (momentum 0 at server lr 1 is FedAvg)."""
    return momentum > 0 or lr != 1


def server_momentum_step(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                         velocity: dict[str, torch.Tensor] | None, momentum: float, lr: float,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FedAvgM (Hsu et al., 2019; Flower's ``FedAvgM``): with the pseudo-gradient ``d = old -
    new`` (``new``: this round's aggregate), ``velocity = momentum * velocity + d`` and the master
    ``old - lr * velocity``, on the trained tensors (:func:`momentum_keys`); the rest are
    ``new``'s. ``velocity`` None: the first round (zero). Returns the master and the velocity. The
    clock prices it from its trace (``s_mom``)."""
    out = dict(new)
    vel = {}
    for k in momentum_keys(new):
        d = old[k] - new[k]
        vel[k] = d if velocity is None else velocity[k].mul(momentum).add_(d)
        out[k] = old[k] - lr * vel[k]
    return out, vel


def running_average(avg: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor], n: int,
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """The uniform average of ``n`` states (``avg``) with ``state`` added: ``avg + (state - avg) /
    (n + 1)`` on the floating tensors, BatchNorm statistics included (SWA without its refresh
    pass over data); the rest are ``state``'s. Returns it and ``n + 1``. The clock prices it from
    its trace (``s_avg``)."""
    if avg is None or n == 0:
        return {k: v.clone() for k, v in state.items()}, 1
    out = dict(state)
    for k, v in state.items():
        if v.is_floating_point():
            out[k] = avg[k] + (v - avg[k]) / (n + 1)
    return out, n + 1


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


def average_ranges(results: Iterable[ClientResult], previous: dict[str, tuple[float, float]] | None = None,
                   method: str = "fedavg", trim: float = 0.2, bound: float = 0.0,
                   ) -> dict[str, tuple[float, float]] | None:
    """The uploaded activation ranges, per layer: those whose width lies within ``bound`` of the
    round's median and ``previous`` width (:func:`bound_keep`, either way: a range scaled up or
    down breaks the deployed layer alike), combined by ``method`` (sample-weighted mean for
    ``fedavg``); ``previous`` if none came, or (per layer) if none was kept."""
    by_layer: dict[str, list[tuple[float, float, int]]] = {}
    for r in results:
        for k, (lo, hi) in r.payload.act_ranges.items():
            by_layer.setdefault(k, []).append((lo, hi, r.n_samples))
    if not by_layer:
        return previous
    out = {}
    for k, rows in by_layer.items():
        t = torch.tensor(rows, dtype=torch.float64)
        ref = torch.tensor(previous[k], dtype=torch.float64) if previous and k in previous else None
        lo, hi = bounded_combine(t[:, :2], t[:, 2], t[:, 1] - t[:, 0], method, trim, bound, ref,
                                 None if ref is None else float(ref[1] - ref[0])).tolist()
        out[k] = (lo, hi)
    return out


def average_steps(results: Iterable[ClientResult], method: str = "fedavg", trim: float = 0.2,
                  bound: float = 0.0, reference: dict[str, torch.Tensor] | None = None,
                  ) -> dict[str, torch.Tensor] | None:
    """The QAT clients' learned weight steps, per layer: those whose norm lies within ``bound`` of
    the round's median and of ``reference`` (:func:`bound_keep`, either way), combined by
    ``method`` (sample-weighted mean for ``fedavg``); the reference's where none was kept; None
    when no client trained with QAT."""
    qat = [r for r in results if r.payload.weight_steps]
    if not qat:
        return None
    weights = torch.tensor([float(r.n_samples) for r in qat], dtype=torch.float64)
    out = {}
    for k in qat[0].payload.weight_steps:
        stack = torch.stack([torch.from_numpy(r.payload.weight_steps[k]).double() for r in qat])
        ref = reference[k].detach().double() if reference and k in reference else None
        out[k] = bounded_combine(stack, weights, stack.flatten(1).norm(dim=1), method, trim, bound, ref,
                                 None if ref is None else float(ref.norm())).float()
    return out


def master_mse_steps(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MSE-optimal per-channel weight scales of ``state`` (what a PTQ deployment uses)."""
    load_model_state(model, state)
    init_weight_steps(model)
    return get_weight_steps(model)


def blend_steps(model: nn.Module, master: dict[str, torch.Tensor], learned: dict[str, torch.Tensor] | None,
                results: Sequence[ClientResult], mse: dict[str, torch.Tensor] | None = None,
                ) -> dict[str, torch.Tensor] | None:
    """The deployed weight steps of a round: the QAT clients' averaged learned steps where every
    upload was QAT; in a hybrid round the data-weighted mean of those and the new master's MSE
    scales (the PTQ clients' share: their weights never trained against the learned steps, and
    one QAT client's steps would otherwise deploy a mostly-PTQ model). ``mse``: the master's
    MSE-optimal steps where the caller has searched them already."""
    n_all = sum(r.n_samples for r in results)
    n_qat = sum(r.n_samples for r in results if r.payload.weight_steps)
    if learned is None or n_qat >= n_all:
        return learned
    mse = mse if mse is not None else master_mse_steps(model, master)
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


def deployed_scores(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                    results: Sequence[ClientResult], x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image of ``x``, ``y``, of ``results`` aggregated (FedAvg) into ``state`` and deployed
    as a run deploys (averaged ranges; :func:`blend_steps`): whether the answer is right, and
    :func:`true_class_prob` (one pass for both). Not cross-entropy: a 2-bit model quantized to
    noise predicts near-uniformly and so scores a *lower* loss than a confident model of two
    classes (measured: it sent digits at w2a2 to PTQ)."""
    with aggregated_deployment(model, state, ranges, results):
        return image_scores(model, x, y)


def partial_gain(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                 results: Sequence[ClientResult], x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, float] | None, int]:
    """The round's online SigAcc signal: ``k`` of its QAT uploads and ``k`` of its PTQ uploads
    (``k`` the smaller count; the larger side drawn seeded by the round's clients, so neither
    partial averages more updates than the other) aggregated apart from the same master, each
    deployed (:func:`deployed_scores`) and scored on the same proxy images; QAT minus PTQ as
    ``{"accuracy", "accuracy_se", "tcp", "tcp_se"}`` (accuracy, mean true-class probability,
    each with its paired standard error over the images: what the proxy's finite sample alone
    contributes to the comparison's noise; fractions; None when the round had not both
    strategies), and ``k``.

    Paired, where two or more clients trained both ways from the same master (a result with
    ``extra["shadow"]``): the QAT and the PTQ uploads of those same clients, so the two partials
    hold the same shards and differ by the mode alone (unpaired, which classes land on which side
    decided the comparison at Dirichlet 0.1)."""
    pairs = sorted((r for r in results if r.extra.get("shadow") is not None), key=lambda r: r.cid)
    if len(pairs) >= 2:
        both = [(r, r.extra["shadow"]) for r in pairs]
        sides = {s: [a if a.strategy == s else b for a, b in both] for s in (Mode.QAT, Mode.PTQ)}
        k = len(pairs)
    else:
        sides = {s: sorted((r for r in results if r.strategy == s), key=lambda r: r.cid) for s in (Mode.QAT, Mode.PTQ)}
        k = min(len(v) for v in sides.values())
        if k == 0:
            return None, 0
        pick = np.random.default_rng(sorted(r.cid for r in results))
        sides = {st: [sub[i] for i in sorted(pick.choice(len(sub), k, replace=False))] if len(sub) > k else sub
                 for st, sub in sides.items()}
    (cq, tq), (cp, tp) = (deployed_scores(model, state, ranges, sides[m], x, y) for m in (Mode.QAT, Mode.PTQ))
    # the accuracy itself as before (the paired mean, x100 then /100, differs in the last bit
    # and would move a commit on a tie); its standard error from the same per-image differences
    (_, acc_se), (tcp, tcp_se) = paired_points(cq, cp), paired_points(tq, tp)
    return {"accuracy": float(cq.mean() - cp.mean()), "accuracy_se": acc_se / 100.0, "tcp": tcp / 100.0,
            "tcp_se": tcp_se / 100.0}, k


@torch.no_grad()
def image_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether ``model`` (in its current mode) answers right (as :func:`evaluate`
    counts it), and :func:`true_class_prob`."""
    model.eval()
    device = next(model.parameters()).device
    right, prob = [], []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        right.append((out.argmax(1) == yb).cpu())
        prob.append(F.softmax(out, dim=1).gather(1, yb[:, None])[:, 0].cpu())
    if not right:
        return np.zeros(0, dtype=bool), np.zeros(0)
    # a diverged model (non-finite logits) gives the true class nothing
    return torch.cat(right).numpy(), torch.nan_to_num(torch.cat(prob).double(), nan=0.0).numpy()


def true_class_prob(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Per image, the probability ``model`` (in its current mode) gives the true class. Its mean is
    the accuracy of answering by sampling the prediction: it orders models as accuracy does (a
    model quantized to noise scores 1/C, below a confident one of two classes, which cross-entropy
    does not: see :func:`deployed_scores`), yet moves smoothly with the weights, so two models scored
    on the same images differ by a paired, low-variance amount (:func:`paired_points`). A
    diverged model's non-finite outputs score 0."""
    return image_scores(model, x, y, batch_size)[1]


def deployed_soft(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                  results: Sequence[ClientResult], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """:func:`true_class_prob` per image of ``results`` aggregated and deployed as a run deploys
    (as :func:`deployed_scores`)."""
    return deployed_scores(model, state, ranges, results, x, y)[1]


def paired_points(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images, in points (x100), and its standard error."""
    d = 100.0 * (np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def swap_gains(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
               ptq: Sequence[ClientResult], qat: Sequence[ClientResult], picks: Sequence[bool],
               x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-client counterfactual gains of a paired round (``ptq[i]``, ``qat[i]``: client i's two
    uploads from the same master): the hybrid ``picks`` (True: QAT) aggregated with client i's
    QAT upload against with its PTQ upload, deployed, each scored on the same images ``x``, ``y``
    (:func:`deployed_soft`): QAT minus PTQ in points, and each gain's paired standard error."""
    base = [q if p else r for r, q, p in zip(ptq, qat, picks)]
    base_p = deployed_soft(model, state, ranges, base, x, y)
    gains, ses = [], []
    for i in range(len(base)):
        other = list(base)
        other[i] = ptq[i] if picks[i] else qat[i]
        swapped = deployed_soft(model, state, ranges, other, x, y)
        g, se = paired_points(base_p, swapped) if picks[i] else paired_points(swapped, base_p)
        gains.append(g)
        ses.append(se)
    return gains, ses


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
                    x: torch.Tensor, y: torch.Tensor, steps: dict[str, torch.Tensor] | None = None,
                    val: Any = None) -> dict[str, float]:
    """FP32 master and deployed (quantized) accuracy/loss on a test split; with ``val`` (a
    split), the deployed model's accuracy/loss there too (``val_acc_q``, ``val_loss_q``)."""
    with span("evaluate fp32"):
        load_model_state(model, state)
        set_mode(model, "fp")
        acc_fp, loss_fp = evaluate(model, x, y)
    with span("evaluate quantized"):
        prepare_deploy(model, ranges, steps)
        acc_q, loss_q = evaluate(model, x, y)
        out = {"acc_fp32": acc_fp, "loss_fp32": loss_fp, "acc_q": acc_q, "loss_q": loss_q}
        if val is not None:
            out["val_acc_q"], out["val_loss_q"] = evaluate(model, val.x, val.y)
    set_mode(model, "fp")
    return out


@contextmanager
def deployment(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
               steps: dict[str, torch.Tensor] | None, what: str = "evaluate quantized") -> Iterator[nn.Module]:
    """``model`` holding ``state`` and deployed (activation ranges, weight steps) inside the block;
    back in FP32 mode after it."""
    with span(what):
        load_model_state(model, state)
        prepare_deploy(model, ranges, steps)
        try:
            yield model
        finally:
            set_mode(model, "fp")


@contextmanager
def aggregated_deployment(model: nn.Module, state: dict[str, torch.Tensor],
                          ranges: dict[str, tuple[float, float]] | None,
                          results: Sequence[ClientResult]) -> Iterator[nn.Module]:
    """:func:`deployment` of ``results`` aggregated (FedAvg) into ``state``, as a run deploys
    (averaged ranges, :func:`blend_steps`)."""
    master, rng, steps = aggregate(state, ranges, results)
    with deployment(model, master, rng, blend_steps(model, master, steps, results)) as m:
        yield m


def evaluate_deployed(model: nn.Module, state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]] | None,
                      val: Any, steps: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The deployed (quantized) model's accuracy/loss on the validation split alone."""
    with deployment(model, state, ranges, steps, "evaluate quantized (validation)"):
        acc, loss = evaluate(model, val.x, val.y)
    return {"val_acc_q": acc, "val_loss_q": loss}
