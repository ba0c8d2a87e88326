"""Local training of one client under one strategy: ``fp32``, ``ptq`` or ``qat``.

* fp32 - FP32 SGD; uploads a 32-bit update and no ranges (the accuracy ceiling baseline).
* ptq  - FP32 SGD, then on-device post-training quantization: calibrate percentile activation
         ranges on ``calib_batches`` local batches, quantize the weights (MSE-optimal scales)
         and measure the local accuracy lost to quantization on those batches.
* qat  - SGD through fake-quantized weights (LSQ steps warm-started from the global weights'
         MSE-optimal scales) and activations (EMA ranges warm-started from the global ranges).

Every client uploads its update (local - global) as a bit-packed payload (``quant.payload``).
What the client *did* (batch sizes of each training step and each forward-only pass) is
returned so the simulated clock can price it on the client's device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .quant import (Payload, get_act_ranges, get_weight_steps, load_model_state, model_state, pack_update,
                    prepare_deploy, reset_act_ranges, set_act_ranges, set_mode, set_weight_steps)

CLIENT_STRATEGIES = ("fp32", "ptq", "qat")


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
    seed: int = 0
    fedfq: tuple[float, int] | None = None   # (average upload bits, annealing iterations)


@dataclass
class ClientResult:
    cid: int
    strategy: str
    payload: Payload
    n_samples: int
    train_batches: list[int]            # batch size of every optimizer step
    forward_batches: list[int]          # batch sizes of forward-only passes (PTQ calibration)
    train_loss: float
    quant_loss: float | None = None     # PTQ: local accuracy lost to quantization (0..1)
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def upload_bytes(self) -> int:
        return self.payload.nbytes


def _sgd_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec,
                gen: torch.Generator) -> tuple[list[int], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    model.train()
    n, batches, total, seen = len(y), [], 0.0, 0
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batches.append(len(idx))
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return batches, total / max(seen, 1)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    return correct / max(1, sum(len(yb) for _, yb in batches))


def train_client(model: nn.Module, cid: int, x: torch.Tensor, y: torch.Tensor, global_state: dict[str, torch.Tensor],
                 global_ranges: dict[str, tuple[float, float]] | None, spec: TrainSpec,
                 global_steps: dict[str, torch.Tensor] | None = None) -> ClientResult:
    """Run one client's local round on ``model`` (re-used; its weights are overwritten)."""
    if spec.strategy not in CLIENT_STRATEGIES:
        raise ValueError(f"strategy: unknown client strategy {spec.strategy!r}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    gen = torch.Generator().manual_seed(spec.seed)
    load_model_state(model, global_state)
    model.zero_grad(set_to_none=True)
    forward_batches: list[int] = []
    quant_loss = None

    steps = None
    if spec.strategy == "qat":
        set_weight_steps(model, global_steps or {})  # warm start LSQ: global steps, else MSE of global weights
        if global_ranges:
            set_act_ranges(model, global_ranges)     # warm start EMA ranges
        else:
            reset_act_ranges(model)
        set_mode(model, "qat")
        batches, loss = _sgd_epochs(model, x, y, spec, gen)
        ranges = get_act_ranges(model)
        steps = get_weight_steps(model)
    else:
        set_mode(model, "fp")
        batches, loss = _sgd_epochs(model, x, y, spec, gen)
        ranges = {}
        if spec.strategy == "ptq":
            perm = torch.randperm(len(y), generator=gen)[: spec.calib_batches * spec.batch_size].to(device)
            calib = [(x[perm[i:i + spec.batch_size]], y[perm[i:i + spec.batch_size]])
                     for i in range(0, len(perm), spec.batch_size)]
            reset_act_ranges(model)
            set_mode(model, "observe")
            acc_fp = _accuracy(model, calib)         # FP32 accuracy while observing ranges
            ranges = get_act_ranges(model)
            prepare_deploy(model, ranges)
            quant_loss = acc_fp - _accuracy(model, calib)
            forward_batches = [len(yb) for _, yb in calib] * 2
    set_mode(model, "fp")
    local = {k: v.detach() for k, v in model_state(model).items()}
    if spec.fedfq is not None:
        from .allocation.fedfq import fedfq_bits

        deltas = {k: local[k].cpu() - global_state[k].cpu() for k in local if local[k].is_floating_point()}
        spec.upload_bits = fedfq_bits(deltas, spec.fedfq[0], spec.fedfq[1], spec.seed)
    payload = pack_update(local, global_state, spec.upload_bits, gen, ranges, n_samples=len(y), weight_steps=steps)
    return ClientResult(cid, spec.strategy, payload, len(y), batches, forward_batches, loss, quant_loss,
                        time.perf_counter() - t0)
