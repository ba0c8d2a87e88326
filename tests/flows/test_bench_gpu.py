"""The GPU benchmark's path, run on CPU at a tiny size."""
import numpy as np

from flows.bench_gpu import catalog_card, gpu_bench


def test_gpu_bench_path_runs_on_cpu():
    r = gpu_bench(device="cpu", batches=(4, 8), reps=3, fl_rounds=1, fl_clients=2, fl_samples=160)
    assert r["device"] == "cpu" and r["catalog_entry"] is None and "predicted_qat_ms" not in r["batches"]["4"]
    for b in ("4", "8"):
        row = r["batches"][b]
        # throughput is the batch over the median step time
        assert row["fp32_images_per_s"] == int(b) / (row["fp32_step_ms"] / 1e3)
    assert 0 <= r["fl_final_acc_q"] <= 1


def test_catalog_card_matches_cuda_names():
    assert catalog_card("NVIDIA H200") == "nvidia-h200"
    assert catalog_card("NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert catalog_card("NVIDIA A100-SXM4-40GB") == "nvidia-a100"
    assert catalog_card("NVIDIA RTX A6000") == "nvidia-a6000"
    assert catalog_card("NVIDIA GeForce RTX 4090") is None and catalog_card(None) is None
