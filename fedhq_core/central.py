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


def train_central(cfg: ExperimentConfig, ds: Dataset, sample_steps: int | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` centrally on the clients' pooled images for ``sample_steps`` samples
    (default: the federated run's, :func:`federated_sample_steps`), the learning rate following
    ``cfg``'s schedule over the same number of 'rounds'. Returns test (and validation) accuracy."""
    from .simulation import Simulation   # the same split, model and seed as the federated run

    sim = Simulation(cfg, dataset=ds)
    pool = np.concatenate([s.idx for s in sim.shards])
    x, y = ds.train.x[torch.from_numpy(pool)].to(sim.device), ds.train.y[torch.from_numpy(pool)].to(sim.device)
    steps = sample_steps if sample_steps is not None else federated_sample_steps(cfg, [len(s) for s in sim.shards])
    model = sim.new_model()
    model.load_state_dict(sim.server.eval_model.state_dict())
    gen = torch.Generator().manual_seed(cfg.seed)
    per_round = max(1, math.ceil(steps / cfg.rounds))
    done, losses = 0, torch.zeros(())
    spec = TrainSpec("fp32", 1, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay,
                     step_lr_scale=cfg.qat_step_lr_scale)
    opt = make_optimizer(model, spec)      # one optimizer: its momentum carries over, as in one process
    model.train()
    for rnd in range(cfg.rounds):
        opt.param_groups[0]["lr"] = cfg.round_lr(rnd)
        opt.param_groups[1]["lr"] = cfg.round_lr(rnd) * spec.step_lr_scale
        budget = min(per_round, steps - done)
        while budget > 0:
            perm = torch.randperm(len(y), generator=gen).to(x.device)
            for i in range(0, min(len(y), budget), cfg.batch_size):
                idx = perm[i:min(i + cfg.batch_size, budget)]
                train_step(model, opt, x, y, idx, losses)
                done += len(idx)
                budget -= len(idx)
    acc, loss = evaluate(model, ds.test.x, ds.test.y)
    val = sim.server.val
    out = {"sample_steps": done, "acc_fp32": acc, "loss_fp32": loss, "pool_size": int(len(y))}
    if val is not None:
        out["val_acc_fp32"] = evaluate(model, val.x, val.y)[0]
    return out
