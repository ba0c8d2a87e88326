"""``make bench-gpu``: ResNet-18 training throughput for fp32 and QAT on the accelerator, their
step-time ratio, and a short federated ResNet-18 run on the same device.

Uses fedhq_core only (no Prefect, no MLflow), so it runs wherever torch does:

    python -m flows.bench_gpu                 # CUDA when present, else CPU
    python -m flows.bench_gpu --device cpu --batches 8,16 --reps 2

With a catalog entry for the card (H100, H200, A100, ...), the measured FP32 and QAT step times
stand beside what the clock predicts for it: a held-out check of the GPU constants.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from fedhq_core.config import ExperimentConfig
from fedhq_core.hardware import DEVICES, RooflineModel, TraceBook, measure_kinds
from fedhq_core.models import build_model
from fedhq_core.quant import prepare_model
from fedhq_core.loop import run
from fedhq_core.simulation import resolve_device


def catalog_card(gpu_name: str | None) -> str | None:
    """The catalog entry of a CUDA device name ("NVIDIA H200" -> "nvidia-h200"), if any."""
    if not gpu_name:
        return None
    low = gpu_name.lower()
    hits = [n for n in DEVICES if n.startswith("nvidia-") and n.split("-", 1)[1] in low.replace("rtx ", "")]
    return max(hits, key=len) if hits else None


def gpu_bench(device: str = "auto", batches: tuple[int, ...] = (128, 256), reps: int = 20, w_bits: int = 4,
              a_bits: int = 4, fl_rounds: int = 2, fl_clients: int = 4, fl_samples: int = 0) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(0)
    shape = (3, 32, 32)

    def build() -> torch.nn.Module:
        return prepare_model(build_model("resnet18", shape, 10), w_bits, a_bits, 8)

    timings = measure_kinds(lambda: build().to(dev), shape, 10, ("fp32", "qat"), list(batches), reps, dev)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    card = catalog_card(gpu)
    speed = RooflineModel(TraceBook(build, shape, 10)) if card else None
    out = {"device": str(dev), "gpu": gpu, "catalog_entry": card, "torch": torch.__version__, "reps": reps,
           "bits": f"w{w_bits}a{a_bits}", "batches": {}}
    for b in batches:
        fp, qat = timings[("fp32", b)], timings[("qat", b)]
        row = {"fp32_step_ms": 1e3 * fp.seconds, "qat_step_ms": 1e3 * qat.seconds,
               "fp32_images_per_s": b / fp.seconds, "qat_images_per_s": b / qat.seconds,
               # FP32 and QAT reps run back to back: the ratio is taken pair by pair
               "qat_over_fp32": float(np.median([q / f for q, f in zip(qat.reps, fp.reps)]))}
        if speed is not None:
            d = DEVICES[card]
            pf, pq = (1e3 * speed.step_time(k, b, d) for k in ("fp32", "qat"))
            row.update(predicted_fp32_ms=pf, predicted_qat_ms=pq, predicted_qat_over_fp32=pq / pf)
        out["batches"][str(b)] = row
    cfg = ExperimentConfig(model="resnet18", clients=fl_clients, rounds=fl_rounds, fraction=1.0, local_epochs=1,
                           batch_size=32, strategy="all-qat", device=device, tracking=False, min_shard_size=8,
                           max_concurrency=1, state_dir="/tmp/fedhq-bench-gpu", max_train_samples=fl_samples,
                           max_test_samples=fl_samples)
    if fl_rounds:      # 0: the step timings alone
        t0 = time.perf_counter()
        sim = run(cfg)
        out.update({"fl_rounds": fl_rounds, "fl_wall_s": time.perf_counter() - t0,
                    "fl_final_acc_q": sim.summary()["final_acc_q"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batches", default="128,256", help="comma-separated batch sizes (default 128,256)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    r = gpu_bench(a.device, tuple(int(b) for b in a.batches.split(",")), a.reps)
    print(json.dumps(r, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
