"""`fedhq bench` end to end on a tiny digits config: the JSON schema, and the outcomes that hold
whatever the host (simulated times are deterministic): QAT costs all-qat more simulated time than
PTQ costs all-ptq, QAT shares are what each strategy assigns, the verdicts agree with their figures."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_writes_the_documented_schema(tmp_path, monkeypatch):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--rounds", "3", "--clients", "10", "--local-epochs", "1", "--no-progress",
               "--strategies", "fedhq,all-qat,all-ptq", "--seeds", "0,1",
               "--no-tracking",   # MLflow logging: test_mlops (tune), infra
               "--set", "profile_reps=1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"config", "seeds", "strategies", "speedup_tta_vs", "acc_gain_vs_all_ptq", "host"} <= set(res)
    assert res["seeds"] == [0, 1]
    assert set(res["strategies"]) == {"fedhq", "all-qat", "all-ptq"}
    assert set(res["dominance"]) >= {"acc_vs_best", "tta_vs_best", "sim_vs_all_ptq", "per_seed", "met"}
    assert res["significance"] is None          # fedhq decides online: no SigAcc model (below)
    assert res["target_split"] == "validation"  # the TTA target reads the validation split
    for entry in res["strategies"].values():
        for key in ("final_acc_q", "tail_acc_q", "final_acc_fp32", "tta_sim_s", "total_sim_s", "wall_s", "upload_bytes",
                    "qat_share", "alloc_overhead_s", "curve", "final_acc_q_std", "fit_sim_s", "fit_wall_s", "fit_source",
                    "charged_total_sim_s", "tta_uncharged_sim_s", "curve_uncharged"):
            assert key in entry
        assert len(entry["curve"]) == 3 and all(len(p) == 2 for p in entry["curve"])
    # the shipped digits family covers 10 clients but predicts nothing (leave-one-setting-out R²
    # below 0.5): fedhq neither refits nor reads it, and decides online; nothing is charged for it
    fedhq = res["strategies"]["fedhq"]
    assert fedhq["fit_source"] == "online" and fedhq["fit_sim_s"] == 0 and "R²" in fedhq["fit_detail"]
    assert fedhq["charged_total_sim_s"] == pytest.approx(fedhq["total_sim_s"])
    for name in ("all-qat", "all-ptq"):
        e = res["strategies"][name]
        assert e["fit_source"] == "none" and e["fit_sim_s"] == 0 and e["charged_total_sim_s"] == e["total_sim_s"]
    assert res["dominance"]["sim_vs_all_ptq"] == pytest.approx(
        fedhq["charged_total_sim_s"] / res["strategies"]["all-ptq"]["charged_total_sim_s"], rel=0.05)
    assert set(res["speedup_tta_vs"]) == {"all-qat", "all-ptq"}
    # outcomes, per seed: same clients and shards, so QAT's slower steps cost all-qat more time
    for seed in ("0", "1"):
        runs = res["per_seed"][seed]
        assert runs["all-qat"]["total_sim_s"] > 1.2 * runs["all-ptq"]["total_sim_s"]
        assert runs["all-qat"]["qat_share"] == 1.0 and runs["all-ptq"]["qat_share"] == 0.0
        assert 0.0 <= runs["fedhq"]["qat_share"] <= 1.0
        chance = 0.1 + 3 * (0.1 * 0.9 / 360) ** 0.5        # 3 standard errors above chance on 360 images
        for name in ("fedhq", "all-qat", "all-ptq"):
            assert runs[name]["tail_acc_q"] > chance
    dom = res["dominance"]
    assert dom["met"]["sim_vs_all_ptq"] == (dom["sim_vs_all_ptq"] <= 1.10)
    assert dom["met"]["acc_vs_best"] == (dom["acc_vs_best"] >= -0.01)
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
    import os

    assert r["bare_concurrency"] == os.cpu_count()   # like with like: the flow's thread runner trains that many
    # same SGD steps on the same shards: the FP32 models agree
    assert r["flow_final_acc_fp32"] == pytest.approx(r["bare_final_acc"], abs=0.02)


def _run(accs: list[float], sim_per_round: float, fit_s: float = 0.0) -> dict:
    from flows.bench import add_curves

    rounds = [{"round": i, "acc_q": a, "sim_time_s": sim_per_round * (i + 1)} for i, a in enumerate(accs)]
    total = sim_per_round * len(accs)
    return add_curves({"rounds": rounds, "final_acc_q": accs[-1], "final_acc_fp32": accs[-1], "total_sim_s": total,
                       "charged_total_sim_s": total + fit_s, "fit_sim_s": fit_s, "fit_wall_s": 0.0,
                       "fit_charged_sim_s": fit_s, "fit_source": "pilot" if fit_s else "none", "fit_detail": "",
                       "wall_s": 1.0, "upload_bytes": 1, "qat_share": 0.0, "alloc_overhead_s": 0.0})


def test_dominance_compares_tails_with_the_better_pure_strategy():
    """Tail accuracy (mean of the last 3 evaluations), TTA to 95% of the better pure tail (its
    running mean of 3 evaluations; these runs hold out no validation split, so the test one's),
    and simulated time, on hand-made curves whose answers are known."""
    from flows.bench import summarize, tail_accuracy

    per_seed = {0: {"fedhq": _run([0.2, 0.6, 0.80, 0.90, 0.86], 1.0),
                    "all-ptq": _run([0.6, 0.8, 0.90, 0.80, 0.85], 1.0),     # better pure tail: 0.85
                    "all-qat": _run([0.1, 0.3, 0.50, 0.70, 0.90], 1.2)}}    # its last evaluation is higher
    for r in per_seed[0].values():
        r["tail_acc_q"] = tail_accuracy(r)
    assert per_seed[0]["all-ptq"]["tail_acc_q"] == pytest.approx(0.85)
    out = summarize(per_seed, None)
    dom = out["dominance"]
    assert out["target"] == pytest.approx(0.95 * 0.85) and out["target_split"] == "test"
    assert dom["acc_vs_best"] == pytest.approx((0.80 + 0.90 + 0.86) / 3 - 0.85)
    # running means: fedhq 0.2 0.4 0.53 0.77 0.85 reaches 0.8075 at 5 s; all-ptq 0.6 0.7 0.77 0.83 at 4 s
    assert dom["tta_vs_best"] == pytest.approx(5.0 / 4.0)
    assert dom["sim_vs_all_ptq"] == pytest.approx(1.0)
    assert dom["met"] == {"acc_vs_best": True, "tta_vs_best": False, "sim_vs_all_ptq": True}
    assert dom["uncharged"] == pytest.approx({"tta_vs_best": 5.0 / 4.0, "sim_vs_all_ptq": 1.0})
    # a pilot made for fedhq's run (2 simulated s) is on its bill: its curve, TTA and time shift
    per_seed[0]["fedhq"] = _run([0.2, 0.6, 0.80, 0.90, 0.86], 1.0, fit_s=2.0)
    per_seed[0]["fedhq"]["tail_acc_q"] = tail_accuracy(per_seed[0]["fedhq"])
    dom = summarize(per_seed, None)["dominance"]
    assert dom["tta_vs_best"] == pytest.approx(7.0 / 4.0) and dom["sim_vs_all_ptq"] == pytest.approx(7.0 / 5.0)
    assert dom["uncharged"] == pytest.approx({"tta_vs_best": 5.0 / 4.0, "sim_vs_all_ptq": 1.0})
    assert dom["met"]["sim_vs_all_ptq"] is False
    # evaluations every 2 rounds: the tail takes evaluated rounds only (1, 3 and the last)
    run = _run([0.0, 0.3, 0.0, 0.6, 0.9], 1.0)
    for r in run["rounds"]:
        r["extra"] = {"evaluated": r["round"] % 2 == 1}
    assert tail_accuracy(run) == pytest.approx(0.6)
