"""The GPU benchmark's path, run on CPU at a tiny size (figures are not asserted)."""
from flows.bench_gpu import gpu_bench


def test_gpu_bench_path_runs_on_cpu():
    r = gpu_bench(device="cpu", batch=4, reps=1, fl_rounds=1, fl_clients=2, fl_profile=(2, 4, 8), fl_samples=160)
    assert r["device"] == "cpu"
    assert r["fp32_images_per_s"] > 0 and r["qat_images_per_s"] > 0
    assert r["qat_over_fp32_step"] > 0 and 0 <= r["fl_final_acc_q"] <= 1
