"""The GPU benchmark's path, run on CPU at a tiny size."""
from flows.bench_gpu import catalog_card, gpu_bench


def test_gpu_bench_path_runs_on_cpu_and_prices_the_card_it_names(monkeypatch):
    """The path a lent GPU takes, run here on CPU at a tiny size as if the card were an H100: the
    card's catalog entry prices ResNet-18's FP32 and QAT steps from their traces. Every batch gets
    the clock's prediction, a QAT step (fake quantization: several times the ops) above an FP32 one,
    a larger batch never below a smaller one; throughput is the batch over the median step time.
    (Its short FL run is an ordinary ResNet-18 run: test_quant's BatchNorm test runs one.)"""
    import flows.bench_gpu as B

    monkeypatch.setattr(B, "catalog_card", lambda name: "nvidia-h100")
    r = B.gpu_bench(device="cpu", batches=(4, 8), reps=2, fl_rounds=0)
    assert r["device"] == "cpu" and r["catalog_entry"] == "nvidia-h100"
    small, large = r["batches"]["4"], r["batches"]["8"]
    for b, row in (("4", small), ("8", large)):
        assert row["fp32_images_per_s"] == int(b) / (row["fp32_step_ms"] / 1e3)
        assert row["qat_images_per_s"] == int(b) / (row["qat_step_ms"] / 1e3)
        assert row["predicted_qat_ms"] > row["predicted_fp32_ms"] > 0
        assert row["predicted_qat_over_fp32"] == row["predicted_qat_ms"] / row["predicted_fp32_ms"] > 1.2
    assert large["predicted_fp32_ms"] >= small["predicted_fp32_ms"]      # at 4 and 8: launch-bound, equal
    assert "fl_final_acc_q" not in r


def test_catalog_card_matches_cuda_names():
    assert catalog_card("NVIDIA H200") == "nvidia-h200"
    assert catalog_card("NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert catalog_card("NVIDIA A100-SXM4-40GB") == "nvidia-a100"
    assert catalog_card("NVIDIA RTX A6000") == "nvidia-a6000"
    assert catalog_card("NVIDIA GeForce RTX 4090") is None and catalog_card(None) is None
