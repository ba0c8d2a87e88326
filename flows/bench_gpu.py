"""``make bench-gpu``: ResNet-18 training throughput for fp32 and QAT on the accelerator, their
step-time ratio, and a short federated ResNet-18 run on the same device.

Uses fedhq_core only (no Prefect, no MLflow), so it runs wherever torch does:

    python -m flows.bench_gpu                 # CUDA when present, else CPU
    python -m flows.bench_gpu --device cpu --batch 8 --reps 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fedhq_core.config import ExperimentConfig
from fedhq_core.hardware import measure_step_times
from fedhq_core.models import build_model
from fedhq_core.quant import prepare_model
from fedhq_core.simulation import resolve_device, run


def gpu_bench(device: str = "auto", batch: int = 128, reps: int = 20, w_bits: int = 4, a_bits: int = 4,
              fl_rounds: int = 2, fl_clients: int = 4, fl_profile: tuple[int, ...] = (8, 16, 32),
              fl_samples: int = 0) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = prepare_model(build_model("resnet18", (3, 32, 32), 10), w_bits, a_bits, 8).to(dev)
    ms = {m.mode: m.seconds for m in measure_step_times(model, (3, 32, 32), 10, [batch], reps, dev,
                                                          modes=("fp32", "qat"))}
    out = {"device": str(dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
           "torch": torch.__version__, "batch": batch, "reps": reps, "bits": f"w{w_bits}a{a_bits}",
           "fp32_step_s": ms["fp32"], "qat_step_s": ms["qat"],
           "fp32_images_per_s": batch / ms["fp32"], "qat_images_per_s": batch / ms["qat"],
           "qat_over_fp32_step": ms["qat"] / ms["fp32"]}
    cfg = ExperimentConfig(model="resnet18", clients=fl_clients, rounds=fl_rounds, fraction=1.0, local_epochs=1,
                           batch_size=32, strategy="all-qat", device=device, tracking=False, min_shard_size=8,
                           profile_batch_sizes=list(fl_profile), profile_reps=2, profile_cache=False,
                           max_concurrency=1, state_dir="/tmp/fedhq-bench-gpu", max_train_samples=fl_samples,
                           max_test_samples=fl_samples)
    t0 = time.perf_counter()
    sim = run(cfg)
    out.update({"fl_rounds": fl_rounds, "fl_wall_s": time.perf_counter() - t0,
                "fl_final_acc_q": sim.summary()["final_acc_q"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    r = gpu_bench(a.device, a.batch, a.reps)
    for k, v in r.items():
        print(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
