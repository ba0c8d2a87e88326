"""``fedhq bench-overhead``: what the orchestration costs beside the training it drives.

Two fresh processes run the same fp32 FedAvg workload (same config, seed, sampled clients,
shards, local SGD steps):

* ``flow``: ``fedhq run --strategy fp32`` through the full Prefect flow with MLflow tracking on
  (ephemeral Prefect server, sqlite MLflow store in a temporary folder), and
* ``bare``: a plain PyTorch loop in one process - load data, build the model, and for each round
  train the sampled clients one after the other with SGD and average their weights.

Each is timed from outside (process start to exit, so start-up is included) and per round from
inside; peak RSS is the process's own maximum plus its largest child's (the Prefect server).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def bare_loop(cfg_dict: dict[str, Any], out_path: str) -> None:
    """The reference: the same local SGD steps with no framework around them."""
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    from fedhq_core.config import from_mapping
    from fedhq_core.models import build_model
    from fedhq_core.simulation import load_data, split_clients

    cfg = from_mapping(cfg_dict)
    torch.set_num_threads(os.cpu_count() or 1)
    ds = load_data(cfg)
    _, _, shards = split_clients(cfg, ds)  # the same client split as the flow
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.in_shape, ds.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    round_s = []
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        k = max(1, int(round(cfg.fraction * cfg.clients)))
        sampled = sorted(np.random.default_rng([cfg.seed, 17, rnd]).choice(cfg.clients, size=k, replace=False))
        new = {k_: torch.zeros_like(v, dtype=torch.float32) for k_, v in global_state.items()}
        total = sum(len(shards[c]) for c in sampled)
        for c in sampled:
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, 53, rnd, c]).integers(2**62)))
            x, y = shards[c].x, shards[c].y
            model.train()
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for i in range(0, len(y), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            for k_, v in model.state_dict().items():
                new[k_] += v.float() * (len(y) / total)
        global_state = {k_: new[k_].to(v.dtype) for k_, v in global_state.items()}
        model.load_state_dict(global_state)
        model.eval()
        with torch.no_grad():
            acc = float((model(ds.test.x).argmax(1) == ds.test.y).float().mean())
        round_s.append(time.perf_counter() - t0)
    with open(out_path, "w") as f:
        json.dump({"round_s": round_s, "inner_wall_s": time.perf_counter() - t_start, "final_acc": acc}, f)


def _timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, int, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, 0, p


def _rss_child_cmd(inner: list[str]) -> list[str]:
    """Run ``inner`` and print the peak RSS (KiB) of it and its largest descendant."""
    code = ("import resource,subprocess,sys,json;p=subprocess.run(sys.argv[1:]);"
            "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
            "print('FEDHQ_RSS_KIB',r,file=sys.stderr);sys.exit(p.returncode)")
    return [sys.executable, "-c", code, *inner]


def measure(cfg_dict: dict[str, Any], reps: int = 1) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="fedhq-overhead-")
    env = dict(os.environ)
    # the user's Prefect home (as `fedhq run` uses it); a separate MLflow store in the state folder,
    # so the benchmark's runs stay out of the user's registry
    state = os.path.abspath(cfg_dict.get("state_dir", ".fedhq"))
    os.makedirs(state, exist_ok=True)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{state}/overhead-mlflow.db"
    cfg_path = os.path.join(work, "config.yaml")
    import yaml

    with open(cfg_path, "w") as f:
        # the user's state folder keeps its decoded-image and profile caches (both paths use them);
        # Prefect's home and the MLflow store are fresh
        yaml.safe_dump({**cfg_dict, "strategy": "fp32", "tracking": True}, f)
    cwd = os.getcwd()
    results: dict[str, Any] = {"flow_wall_s": [], "bare_wall_s": []}
    for _ in range(reps):
        flow_json = os.path.join(work, "flow.json")
        bare_json = os.path.join(work, "bare.json")
        wf, _, pf = _timed(_rss_child_cmd([sys.executable, "-m", "flows.cli", "run", "--config", cfg_path,
                                           "--no-progress", "--json", flow_json]), env, cwd)
        if pf.returncode != 0:
            raise RuntimeError(f"flow run failed: {pf.stderr.strip().splitlines()[-1:]}")
        wb, _, pb = _timed(_rss_child_cmd([sys.executable, "-m", "flows.overhead", "--bare", cfg_path, bare_json]),
                           env, cwd)
        if pb.returncode != 0:
            raise RuntimeError(f"bare loop failed: {pb.stderr.strip().splitlines()[-1:]}")
        results["flow_wall_s"].append(wf)
        results["bare_wall_s"].append(wb)
        rss = lambda p: int(next(l.split()[1] for l in p.stderr.splitlines() if l.startswith("FEDHQ_RSS_KIB")))  # noqa: E731,E741
        results["flow_peak_rss_mib"] = rss(pf) / 1024
        results["bare_peak_rss_mib"] = rss(pb) / 1024
        with open(flow_json) as f:
            flow = json.load(f)
        with open(bare_json) as f:
            bare = json.load(f)
    flow_rounds = np.diff([0.0] + [r["wall_s"] for r in flow["rounds"]])
    bare_rounds = np.asarray(bare["round_s"])
    skip = min(2, max(0, len(bare_rounds) - 1))  # steady state: after the first rounds
    results.update({
        "rounds": len(bare_rounds),
        "flow_wall_s": float(np.median(results["flow_wall_s"])),
        "bare_wall_s": float(np.median(results["bare_wall_s"])),
        "steady_round_flow_s": float(np.median(flow_rounds[skip:])),
        "steady_round_bare_s": float(np.median(bare_rounds[skip:])),
        "flow_final_acc_fp32": flow["final_acc_fp32"], "bare_final_acc": bare["final_acc"],
    })
    results["ratio_total"] = results["flow_wall_s"] / results["bare_wall_s"]
    results["ratio_steady_round"] = results["steady_round_flow_s"] / results["steady_round_bare_s"]
    return results


if __name__ == "__main__":  # the bare-loop child: python -m flows.overhead --bare CONFIG OUT
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        import yaml

        with open(sys.argv[2]) as fh:
            bare_loop(yaml.safe_load(fh), sys.argv[3])
