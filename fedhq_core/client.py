"""Local training of one client under one strategy: ``fp32``, ``ptq`` or ``qat``.

* fp32 - FP32 SGD; uploads a 32-bit update and no ranges (the accuracy ceiling baseline).
* ptq  - FP32 SGD, then on-device post-training quantization: calibrate percentile activation
         ranges in one forward pass over ``calib_batches`` x ``batch_size`` local samples; with
         ``report_sensitivity`` (on only in runs whose allocator reads it) also quantize the
         weights (MSE-optimal scales) and measure the local accuracy lost to quantization on
         those same samples.
* qat  - SGD through fake-quantized weights (LSQ steps warm-started from the global weights'
         MSE-optimal scales) and activations (EMA ranges warm-started from the global ranges).

Every client uploads its update (local - global) as a bit-packed payload (``quant.payload``).
What the client *did* (``ClientResult.work``: each step kind with its batch sizes) is
returned so the simulated clock can price it on the client's device. The training loop has no
device sync: the loss is accumulated on the device and read once per round.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .phases import span
from .quant.modules import is_quant_state_key
from .quant import (Payload, get_act_ranges, get_weight_steps, load_model_state, model_state,
                    pack_update, prepare_deploy, reset_act_ranges, set_act_ranges, set_mode, set_weight_steps)

class Mode:
    """A client's mode for one round, as an allocator assigns it: train in FP32 (and send a float32
    update), train in FP32 then quantize on the device (PTQ), or train through fake quantization
    (QAT). Plain strings on the wire and in the records."""

    FP32, PTQ, QAT = "fp32", "ptq", "qat"
    ALL = (FP32, PTQ, QAT)



@dataclass
class TrainSpec:
    """Hyper-parameters of one local training job (everything but the data)."""

    strategy: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    upload_bits: int | dict[str, int] = 8
    calib_batches: int = 4
    report_sensitivity: bool = False          # PTQ: measure the local accuracy lost to quantization
    seed: int = 0
    fedfq: tuple[float, int] | None = None   # (average upload bits, annealing iterations)
    step_lr_scale: float = 0.01              # LSQ weight steps' lr relative to ``lr``
    max_samples: int | None = None           # partial work: train on this many of the shard's samples (seeded draw)


@dataclass
class ClientResult:
    cid: int
    strategy: str
    payload: Payload
    n_samples: int
    work: dict[str, list[int]]          # what ran on the device, by step kind (see ``STEP_KINDS``)
    train_loss: float
    quant_loss: float | None = None     # PTQ with report_sensitivity: local accuracy lost to quantization (0..1)
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def upload_bytes(self) -> int:
        """Bytes uploaded: the update's, plus its shadow's (``extra["shadow"]``: the same client
        trained the other way from the same start, for the server's paired comparison only)."""
        shadow = self.extra.get("shadow")
        return self.payload.nbytes + (shadow.payload.nbytes if shadow is not None else 0)

    @property
    def device_work(self) -> dict[str, list[int]]:
        """What ran on the device: ``work``, plus its shadow's (see ``upload_bytes``) under its
        step kinds prefixed ``SHADOW_PREFIX``: priced as those kinds, itemized apart."""
        shadow = self.extra.get("shadow")
        if shadow is None:
            return self.work
        return {**self.work, **{SHADOW_PREFIX + k: list(v) for k, v in shadow.work.items()}}


# Step kinds a client runs; the clock prices each from an op trace of these very functions
# (``hardware.trace``). Values in ``ClientResult.work`` are batch sizes, one per step; for
# ``wsearch`` one 0 per search; for ``pack`` the upload bits, one per packed update.
STEP_KINDS = ("fp32", "qat", "fwd", "calib", "wsearch", "pack")
SHADOW_PREFIX = "shadow_"   # a paired measurement's work in ``ClientResult.device_work``: priced as its kind


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """The model's SGD optimizer, built once per (pooled) model and reused by every client that
    borrows it: each client sets its hyper-parameters and starts with fresh momentum (the state
    is cleared), so a reused optimizer steps exactly like a new one.

    Two groups: the model's weights, and the LSQ weight steps at ``step_lr_scale`` x ``lr``
    with no weight decay. At the weights' own learning rate the steps ran away (the 8-bit edge
    layers' steps grew to 13x their MSE-optimal value on CIFAR-10 at w2a8, and QAT ended 10
    points below FP32); measured in ``tests/fedhq_core/test_ptq_qat.py``."""
    # foreach: one multi-tensor op per update on every device, so the traced op count is the
    # same on CPU and GPU
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[p for n, p in named if not is_quant_state_key(n)], [p for n, p in named if is_quant_state_key(n)]]
    opt = model.__dict__.get("_fedhq_sgd")
    if opt is None or len(opt.param_groups) != 2 or any(
            len(g["params"]) != len(ps) or any(a is not b for a, b in zip(g["params"], ps))
            for g, ps in zip(opt.param_groups, groups)):
        opt = torch.optim.SGD([{"params": ps} for ps in groups], lr=spec.lr, foreach=True)
        model.__dict__["_fedhq_sgd"] = opt
    opt.state.clear()
    opt.param_groups[0].update(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    opt.param_groups[1].update(lr=spec.lr * spec.step_lr_scale, momentum=spec.momentum, weight_decay=0.0)
    return opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
    """One optimizer step on ``x[idx]``; adds the batch's summed loss to ``loss_sum`` on the
    device (no sync)."""
    xb, yb = x[idx], y[idx]
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss_sum.add_(loss.detach(), alpha=len(idx))


@torch.no_grad()
def correct_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward-only pass (calibration or quantized check): correct predictions as a device tensor."""
    return (model(x).argmax(1) == y).sum()


def calib_size(n: int, calib_batches: int, batch_size: int) -> int:
    """Samples a PTQ client calibrates on, in one forward pass: ``calib_batches`` x ``batch_size``,
    never beyond its shard of ``n`` (the client and the clock's expected work both use this)."""
    return min(n, calib_batches * batch_size)


def _sgd_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec,
                gen: torch.Generator) -> tuple[list[int], float]:
    opt = make_optimizer(model, spec)
    model.train()
    n, batches = len(y), []
    total = torch.zeros((), device=x.device)
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            train_step(model, opt, x, y, idx, total)
            batches.append(len(idx))
    return batches, float(total) / max(sum(batches), 1)   # the round's one sync


def _accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = sum(correct_count(model, xb, yb) for xb, yb in batches)
    return float(correct) / max(1, sum(len(yb) for _, yb in batches))


def calibrate(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], report_sensitivity: bool,
              work: dict[str, list[int]]) -> tuple[dict[str, tuple[float, float]], float | None]:
    """PTQ on the device: percentile activation ranges from the calibration batches and, with
    ``report_sensitivity``, the local accuracy lost to quantization on those same batches (the
    FP32 accuracy comes free with the calibration pass; the weight-scale search and one
    quantized pass are what the measurement adds)."""
    reset_act_ranges(model)
    set_mode(model, "observe")
    acc_fp = _accuracy(model, calib)
    work["calib"] = [len(yb) for _, yb in calib]
    ranges = get_act_ranges(model)
    if not report_sensitivity:
        return ranges, None
    prepare_deploy(model, ranges)
    work["wsearch"] = [0]
    work["fwd"] = [len(yb) for _, yb in calib]
    return ranges, acc_fp - _accuracy(model, calib)


def train_client(model: nn.Module, cid: int, x: torch.Tensor, y: torch.Tensor, global_state: dict[str, torch.Tensor],
                 global_ranges: dict[str, tuple[float, float]] | None, spec: TrainSpec,
                 global_steps: dict[str, torch.Tensor] | None = None,
                 warm_steps: dict[str, torch.Tensor] | None = None) -> ClientResult:
    """Run one client's local round on ``model`` (re-used; its weights are overwritten).
    ``warm_steps``: the MSE-optimal weight steps of ``global_state`` when the caller already has
    them (the same for every client of a round); the client is billed for the search either way."""
    if spec.strategy not in Mode.ALL:
        raise ValueError(f"strategy: unknown client strategy {spec.strategy!r}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.max_samples is not None and spec.max_samples < len(y):
        # partial work (the allocator's cap: what fits the round's deadline): a seeded subset of
        # the shard; the upload declares the samples it trained on, so FedAvg weighs it by them
        keep = torch.randperm(len(y), generator=gen)[:max(1, spec.max_samples)].to(device)
        x, y = x[keep], y[keep]
    load_model_state(model, global_state)
    model.zero_grad(set_to_none=True)
    quant_loss = None
    work: dict[str, list[int]] = {}

    steps = None
    if spec.strategy == Mode.QAT:
        if not global_steps:
            work["wsearch"] = [0]                    # LSQ warm start: MSE scales of the global weights
        set_weight_steps(model, global_steps or warm_steps or {})
        if global_ranges:
            set_act_ranges(model, global_ranges)     # warm start EMA ranges
        else:
            reset_act_ranges(model)
        set_mode(model, "qat")
        work["qat"], loss = _sgd_epochs(model, x, y, spec, gen)
        ranges = get_act_ranges(model)
        steps = get_weight_steps(model)
    else:
        set_mode(model, "fp")
        work["fp32"], loss = _sgd_epochs(model, x, y, spec, gen)
        ranges = {}
        if spec.strategy == Mode.PTQ:
            # calib_batches x batch_size samples, never beyond the shard, in ONE forward pass: a
            # forward-only pass keeps no activations for a backward, so it fits where a training
            # step of batch_size does, and one pass issues a quarter of the ops of four
            perm = torch.randperm(len(y), generator=gen)[: calib_size(len(y), spec.calib_batches, spec.batch_size)].to(device)
            calib = [(x[perm], y[perm])]
            ranges, quant_loss = calibrate(model, calib, spec.report_sensitivity, work)
    set_mode(model, "fp")
    local = {k: v.detach() for k, v in model_state(model).items()}
    if spec.fedfq is not None:
        from .quant.bit_allocation import fedfq_bits

        deltas = {k: local[k].cpu() - global_state[k].cpu() for k in local if local[k].is_floating_point()}
        spec.upload_bits = fedfq_bits(deltas, spec.fedfq[0], spec.fedfq[1], spec.seed)
    with span("pack (quantize)"):
        payload = pack_update(local, global_state, spec.upload_bits, gen, ranges, n_samples=len(y),
                              weight_steps=steps)
    bits = spec.upload_bits
    work["pack"] = [bits if isinstance(bits, int) else round(sum(bits.values()) / max(1, len(bits)))]
    return ClientResult(cid, spec.strategy, payload, len(y), work, loss, quant_loss, time.perf_counter() - t0)
