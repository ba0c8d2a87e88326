"""The centralized reference of a federated run: the same network trained on the pooled images
of every client (IID, one process), for the same number of sample-steps, with the same batch
size, optimizer and learning-rate schedule, in FP32. It tells how far federated training on
non-IID shards is from what the network reaches on these images (the study protocol reports
it beside the fp32 strategy). It is the experimenter's measurement: no clock prices it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .client import TrainSpec, make_optimizer, train_step
from .config import ExperimentConfig
from .data import Dataset
from .server import evaluate


def federated_sample_steps(cfg: ExperimentConfig, shard_sizes: list[int]) -> int:
    """The samples a run's clients train on, in expectation over the client sample: each round
    a ``fraction`` of the clients run ``local_epochs`` over their shards."""
    k = max(1, int(round(cfg.fraction * cfg.clients)))
    return int(round(cfg.rounds * k / cfg.clients * cfg.local_epochs * sum(shard_sizes)))


LR_SCALES = (1.0, 0.3)     # the peak learning rates tried, as multiples of the federated run's


def train_central(cfg: ExperimentConfig, ds: Dataset, sample_steps: int | None = None,
                  lr_scales: tuple[float, ...] = LR_SCALES) -> dict[str, Any]:
    """Train ``cfg.model`` centrally on the clients' pooled images for ``sample_steps`` samples
    (default: the federated run's, :func:`federated_sample_steps`), the learning rate following
    ``cfg``'s schedule over the same number of 'rounds'.

    One process keeps its momentum over thousands of steps where a client restarts it every few
    dozen, so the federated run's learning rate need not suit it: the peak rate is chosen on the validation
    split from ``cfg.lr`` times each of ``lr_scales``, largest first; a candidate whose loss turns
    non-finite stops there and counts as diverged. Without a validation split there is nothing to
    choose on: only ``cfg.lr`` is trained. Returns the chosen rate's test and validation accuracy
    and every candidate's outcome."""
    from .simulation import Simulation   # the same split, model and seed as the federated run

    sim = Simulation(cfg, dataset=ds)
    pool = np.concatenate([s.idx for s in sim.shards])
    x, y = ds.train.x[torch.from_numpy(pool)].to(sim.device), ds.train.y[torch.from_numpy(pool)].to(sim.device)
    steps = sample_steps if sample_steps is not None else federated_sample_steps(cfg, [len(s) for s in sim.shards])
    val = sim.server.val
    scales = tuple(lr_scales) if val is not None else (1.0,)
    tried, best = [], None
    for scale in scales:
        model = sim.new_model()
        model.load_state_dict(sim.server.eval_model.state_dict())
        done, finite = _train_pooled(model, cfg, x, y, steps, scale)
        row = {"lr": cfg.lr * scale, "diverged": not finite, "sample_steps": done}
        if finite and val is not None:
            row["val_acc_fp32"] = evaluate(model, val.x, val.y)[0]
        tried.append(row)
        if finite and (best is None or row.get("val_acc_fp32", 0.0) > best[0].get("val_acc_fp32", 0.0)):
            best = (row, model)
    if best is None:
        return {"sample_steps": steps, "pool_size": int(len(y)), "diverged": True, "candidates": tried,
                "acc_fp32": float("nan"), "loss_fp32": float("nan")}
    row, model = best
    acc, loss = evaluate(model, ds.test.x, ds.test.y)
    out = {"sample_steps": row["sample_steps"], "acc_fp32": acc, "loss_fp32": loss, "pool_size": int(len(y)),
           "lr": row["lr"], "diverged": False, "candidates": tried}
    if "val_acc_fp32" in row:
        out["val_acc_fp32"] = row["val_acc_fp32"]
    return out


def _train_pooled(model: torch.nn.Module, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, steps: int,
                  lr_scale: float) -> tuple[int, bool]:
    """``steps`` samples of SGD on the pool with ``cfg``'s schedule scaled by ``lr_scale``; stops
    at the first round whose loss is not finite. Returns the samples trained and whether the loss
    stayed finite."""
    gen = torch.Generator().manual_seed(cfg.seed)
    per_round = max(1, math.ceil(steps / cfg.rounds))
    done = 0
    spec = TrainSpec("fp32", 1, cfg.batch_size, cfg.lr * lr_scale, cfg.momentum, cfg.weight_decay,
                     step_lr_scale=cfg.qat_step_lr_scale)
    opt = make_optimizer(model, spec)      # one optimizer: its momentum carries over, as in one process
    model.train()
    for rnd in range(cfg.rounds):
        losses = torch.zeros((), device=x.device)
        opt.param_groups[0]["lr"] = cfg.round_lr(rnd) * lr_scale
        opt.param_groups[1]["lr"] = cfg.round_lr(rnd) * lr_scale * spec.step_lr_scale
        budget = min(per_round, steps - done)
        while budget > 0:
            perm = torch.randperm(len(y), generator=gen).to(x.device)
            for i in range(0, len(y), cfg.batch_size):
                if budget <= 0:
                    break
                idx = perm[i:i + min(cfg.batch_size, budget)]   # never empty (an empty batch's loss is NaN)
                train_step(model, opt, x, y, idx, losses)
                done += len(idx)
                budget -= len(idx)
        if not bool(torch.isfinite(losses)):
            return done, False
    return done, True
