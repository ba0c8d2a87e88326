"""GPU check of the scale-out and failure paths (library only: torch, numpy, scikit-learn).

    python -m flows.check_gpu_faults [--device cuda] [--out DIR]

On the given device: a seeded digits run with 20% injected client faults and per-round
checkpoints; a second run killed (an exception) after round 1 and resumed from its checkpoint,
which must end with the uninterrupted run's weights and accuracies; and one training task per
local-worker slot, which must land on ``cuda:(slot % GPU count)``. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from fedhq_core.allocation import Allocation
from fedhq_core.checkpoint import Checkpoints
from fedhq_core.config import ExperimentConfig
from fedhq_core.loop import run
from fedhq_core.simulation import Simulation
from fedhq_core.worker import run_jobs, worker_device


class _Stop(Exception):
    pass


def check(device: str, state_dir: str) -> dict:
    cfg = ExperimentConfig(clients=10, rounds=4, fraction=0.6, local_epochs=1, strategy="fedhq",
                           significance="none", adjust_every=1, fault_rate=0.2, device=device, tracking=False,
                           state_dir=state_dir, max_concurrency=2)
    t0 = time.perf_counter()
    ref = run(cfg, checkpoints=Checkpoints(f"{state_dir}/runs/ref"))
    wall = time.perf_counter() - t0
    again = Simulation(cfg)             # the same run once more: how deterministic is this device?
    again.profile(ref.speed)
    run(cfg, sim=again)

    def stop_after_1(rec):
        if rec.round == 1:
            raise _Stop

    ck = Checkpoints(f"{state_dir}/runs/killed")
    sim = Simulation(cfg)
    sim.profile(ref.speed)
    try:
        run(cfg, sim=sim, on_round=stop_after_1, checkpoints=ck)
    except _Stop:
        pass
    tensors, meta, _ = ck.load_latest()
    resumed = Simulation(cfg)
    resumed.load_state_dict(tensors, meta)
    run(cfg, sim=resumed)
    def diff(a: Simulation) -> float:
        return max(float((a.global_state[k].double() - v.double()).abs().max()) for k, v in ref.global_state.items())

    slots = {}
    for slot in range(3):
        (up,) = run_jobs(ref.round_inputs(), ref.jobs(0, Allocation({0: "qat"}), [0]), slot)
        slots[slot] = {"device": str(worker_device(device, slot)), "ok": up.error is None}
    return {"device": str(ref.device), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "master_on": str(next(iter(ref.global_state.values())).device),
            "resumed_master_on": str(next(iter(resumed.global_state.values())).device),
            "final_acc_q": ref.records[-1].acc_q, "resumed_final_acc_q": resumed.records[-1].acc_q,
            "same_acc_every_round": [r.acc_q for r in ref.records] == [r.acc_q for r in resumed.records],
            "max_weight_diff": diff(resumed), "rerun_max_weight_diff": diff(again),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "rejected": ref.summary()["rejected"], "wall_s": wall,
            "worker_slots": slots}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.check_gpu_faults", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN/cuBLAS kernels")
    a = p.parse_args(argv)
    if a.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as tmp:
        r = check(a.device, tmp)
    print(json.dumps(r, indent=2))
    ok = r["same_acc_every_round"] and r["max_weight_diff"] < 1e-5 and all(s["ok"] for s in r["worker_slots"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
