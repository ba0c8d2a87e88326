"""`fedhq bench` end to end on a tiny digits config: the JSON schema (outcomes are not asserted)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_writes_the_documented_schema(tmp_path, monkeypatch):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--rounds", "2", "--clients", "6", "--local-epochs", "1", "--no-progress",
               "--strategies", "fedhq,all-qat,all-ptq", "--seeds", "0,1",
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--set", "pilot_rounds=1",
               "--set", "profile_reps=1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"config", "seeds", "strategies", "speedup_tta_vs", "acc_gain_vs_all_ptq", "host"} <= set(res)
    assert res["seeds"] == [0, 1]
    assert set(res["strategies"]) == {"fedhq", "all-qat", "all-ptq"}
    for entry in res["strategies"].values():
        for key in ("final_acc_q", "final_acc_fp32", "tta_sim_s", "total_sim_s", "wall_s", "upload_bytes",
                    "qat_share", "alloc_overhead_s", "curve", "final_acc_q_std"):
            assert key in entry
        assert len(entry["curve"]) == 2 and all(len(p) == 2 for p in entry["curve"])
    assert set(res["speedup_tta_vs"]) == {"all-qat", "all-ptq"}
    assert {"cpu", "cores", "torch", "device"} <= set(res["host"])
    for png in res["plots"].values():
        assert png.endswith(".png")


@pytest.mark.slow
def test_bench_overhead_measures_both_paths(tmp_path, monkeypatch):
    from flows.overhead import measure

    monkeypatch.chdir(tmp_path)
    r = measure({"rounds": 2, "clients": 6, "local_epochs": 1, "profile_reps": 1})
    assert r["rounds"] == 2
    assert r["flow_wall_s"] > 0 and r["bare_wall_s"] > 0
    assert r["ratio_total"] == pytest.approx(r["flow_wall_s"] / r["bare_wall_s"])
    assert r["flow_peak_rss_mib"] > 50 and r["bare_peak_rss_mib"] > 50
    # same SGD steps on the same shards: the FP32 models agree
    assert r["flow_final_acc_fp32"] == pytest.approx(r["bare_final_acc"], abs=0.02)
