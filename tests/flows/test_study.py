"""fedhq study: a paired digits smoke study, its cache (reuse, stale code, a kill -9 mid-study),
its statistics on hand-made numbers, and bad input refused before any run starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["study", "--dataset", "digits", "--seeds", "0,1", "--strategies", "fedhq,all-ptq,all-qat", "--rounds", "3",
         "--clients", "6", "--local-epochs", "1", "--no-tracking", "--no-progress", "--set", "profile_reps=1"]


@pytest.mark.slow
def test_smoke_study_survives_a_kill_is_paired_and_reuses_its_runs(tmp_path, capsys):
    """A digits smoke study (2 seeds, 3 strategies, 3 rounds) is killed with SIGKILL once its first
    run is cached; the same command then finishes without rerunning it, writes the documented
    JSON, and a third call reuses every run."""
    from flows.cli import main

    state, out = tmp_path / "st", tmp_path / "study.json"
    args = SMOKE + ["--state-dir", str(state), "--json", str(out)]
    first = state / "study" / "study" / "default" / "fedhq-seed0.json"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli"] + args, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.is_file(), "the first run never finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "default fedhq seed 0: cached" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp                  # the finished run was not run again
    res = json.loads(out.read_text())
    assert res["runs_cached"] >= 1 and res["runs_ran"] + res["runs_cached"] == 6
    assert res["validation"]["size"] == round(0.1 * 1437) and res["wall_s"] > 0 and res["host"]["cores"]
    assert res["run_cpus"] == [res["host"]["cpu"]]       # each run records the CPU it ran on
    (s,) = res["settings"]
    assert s["name"] == "default" and s["config"]["rounds"] == 3
    assert {(r["strategy"], r["seed"]) for r in s["runs"]} == {(n, k) for n in ("fedhq", "all-ptq", "all-qat")
                                                                for k in (0, 1)}
    for r in s["runs"]:
        assert {"tail_acc_q", "tail_acc_q_val", "tta_sim_s", "total_sim_s", "fit_sim_s", "qat_share", "curve"} <= set(r)
        assert len(r["curve"]) == 3 and len(r["curve_val"]) == 3
        assert r["tail_acc_q"] == pytest.approx(sum(a for _, a in r["curve"]) / 3)
    # paired by seed: fedhq minus each baseline, per seed, with the interval around the mean
    p = s["paired"]["fedhq-vs-all-ptq"]
    by = {(r["strategy"], r["seed"]): r for r in s["runs"]}
    assert p["acc_per_seed"] == pytest.approx([by["fedhq", k]["tail_acc_q"] - by["all-ptq", k]["tail_acc_q"]
                                               for k in (0, 1)])
    assert p["verdict"] in ("better", "equal", "worse") and len(p["acc_ci95"]) == 2
    assert p["acc_ci95"][0] <= p["acc_mean"] <= p["acc_ci95"][1]
    assert "fedhq-vs-better-pure" in s["paired"] and "per_seed" in s["bar"]
    # fedhq's online decision is on record (3 rounds: 3 exploring, so no commit yet) and weighed
    # against the shipped digits family (built for 10-30 clients, its per-client model predicting nothing)
    assert by["fedhq", 0]["qat_per_round"][0] >= 1 and by["fedhq", 0]["measure_sim_s"] > 0
    # with its comparisons and their per-image standard errors (the last round's is never measured: none follows)
    parts = by["fedhq", 0]["partials"]
    assert [p[0] for p in parts] == [0, 1] and all(-1 <= a <= 1 and se >= 0 for _, a, se in parts)
    assert by["all-ptq", 0]["partials"] == []
    fam = s["family"]
    assert not fam["covers"] and "clients=6" in fam["why"] and fam["fields"]["clients"] == "outside"
    assert fam["fields"]["w_bits"] == "grid value" and fam["fields"]["classes_per_client"] == "n/a"
    assert not fam["used_by_fedhq"] and fam["payback"].startswith("never") and fam["build_sim_s"] > 0
    assert fam["r2_setting_level"] >= 0.5
    assert all(Path(f).is_file() for f in res["plots"].values())
    # run again: every run comes from the cache, and the figures are the same
    capsys.readouterr()
    assert main(args) == 0
    again = json.loads(out.read_text())
    assert again["runs_ran"] == 0 and again["runs_cached"] == 6
    assert again["settings"][0]["paired"] == s["paired"]
    assert "0 runs ran, 6 reused" in capsys.readouterr().out
    # a fresh checkout resumes from the committed JSON: its runs go into an empty cache and are reused
    fresh = args[:args.index("--state-dir")] + ["--state-dir", str(tmp_path / "fresh"), "--json", str(tmp_path / "r.json"),
                                                "--restore-from", str(out)]
    assert main(fresh) == 0
    assert "6 runs restored" in capsys.readouterr().err
    restored = json.loads((tmp_path / "r.json").read_text())
    assert restored["runs_ran"] == 0 and restored["settings"][0]["paired"] == s["paired"]
    # fedhq of a newer build against an older build's baselines pairs as the study itself does
    from flows.compare_builds import combine, main as compare_main

    new_study = json.loads(json.dumps(res))
    new_study["settings"][0]["runs"] = [r for r in new_study["settings"][0]["runs"] if r["strategy"] == "fedhq"]
    old_study = json.loads(json.dumps(res))
    del old_study["settings"][0]["config"]["paired_explore"]       # a key the older build lacked
    both = combine(new_study, old_study)
    assert both["compare_builds"]["keys_the_baselines_lack"] == ["paired_explore"]
    assert both["compare_builds"]["cpus"] == {"method": res["run_cpus"], "baselines": res["run_cpus"]}
    assert both["settings"][0]["paired"] == s["paired"] and both["settings"][0]["bar"]["per_seed"] == s["bar"]["per_seed"]
    old_study["settings"][0]["config"]["lr"] = 0.5
    (tmp_path / "old.json").write_text(json.dumps(old_study))
    (tmp_path / "new.json").write_text(json.dumps(new_study))
    capsys.readouterr()
    assert compare_main(["--method", str(tmp_path / "new.json"), "--baselines", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "configs differ in 'lr'" in err
    # a strategy taken from the newer study (here all-qat) pairs with the older study's others
    qat_only = json.loads(json.dumps(res))
    qat_only["settings"][0]["runs"] = [r for r in qat_only["settings"][0]["runs"] if r["strategy"] == "all-qat"]
    taken = combine(qat_only, json.loads(json.dumps(res)), ("all-qat",))
    assert taken["settings"][0]["paired"] == s["paired"] and taken["compare_builds"]["taken_from_method"] == ["all-qat"]
    assert sorted(taken["strategies"]) == ["all-ptq", "all-qat", "fedhq"]
    # the seeds of two studies (here the smoke study split by seed) pool into the study of both
    from flows.compare_builds import pool

    halves = [json.loads(json.dumps(res)) for _ in (0, 1)]
    for k, h in enumerate(halves):
        h["settings"][0]["runs"] = [r for r in h["settings"][0]["runs"] if r["seed"] == k]
    pooled = pool(halves)
    assert pooled["settings"][0]["paired"] == s["paired"] and pooled["settings"][0]["builds"] == {res["code_digest"]: [0, 1]}
    # a newer build's fedhq against a pooled study's baselines (a pool has builds, not one digest)
    against_pool = combine(new_study, pooled)
    assert against_pool["settings"][0]["paired"] == s["paired"]
    assert against_pool["compare_builds"]["baselines"] == res["code_digest"]
    for k, h in enumerate(halves):
        (tmp_path / f"half{k}.json").write_text(json.dumps(h))
    assert compare_main(["--pool", str(tmp_path / "half0.json"), str(tmp_path / "half0.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("seed 0 is in two studies")
    # a run of another build is put back with its own digest, so the cache check refuses it
    from flows.study import RunCache, restore_runs
    from flows.commands import protocol_from_args
    from flows.cli import build_parser

    r0 = s["runs"][0]
    real, r0["digest"] = r0["digest"], "0" * 16
    (tmp_path / "old.json").write_text(json.dumps(res))
    a = build_parser().parse_args(SMOKE + ["--state-dir", str(tmp_path / "old")])
    proto = protocol_from_args(a, a.strategies, a.seeds, a.only, a.name)
    assert restore_runs([str(tmp_path / "old.json")], proto) == 6
    cache = RunCache(tmp_path / "old" / "study" / "study")
    assert cache.get("default", r0["strategy"], r0["seed"], real) is None
    assert "another version of the code or another config" in capsys.readouterr().err
    # a replicate (only the minibatch order redrawn) of one run: it runs (its digest is its own),
    # prints how far the tail moved, and the JSON carries the same figures
    rep = SMOKE[:SMOKE.index("--seeds")] + ["--seeds", "0", "--strategies", "all-ptq"] + SMOKE[SMOKE.index("--rounds"):]
    rep += ["--set", "replicate=1", "--replicate-of", str(out), "--state-dir", str(state), "--json", str(tmp_path / "rep.json")]
    assert main(rep) == 0
    printed = capsys.readouterr().out
    rj = json.loads((tmp_path / "rep.json").read_text())
    rn = rj["settings"][0]["replicate_noise"]
    assert rj["runs_ran"] == 1 and rn["n"] == 1 and rn["pairs"][0]["main"] == by["all-ptq", 0]["tail_acc_q"]
    assert f"default: replicate of {out}: 1 runs, tails moved by up to {100 * rn['max_abs_diff']:.1f} points" in printed


def test_cache_refuses_another_code_version_or_config(tmp_path, capsys):
    from fedhq_core.config import ExperimentConfig
    from flows.study import RunCache, code_digest, run_digest

    cache = RunCache(tmp_path)
    cfg = ExperimentConfig(tracking=False)
    d = run_digest(cfg, code_digest())
    cache.put("s", "fedhq", 0, d, {"x": 1})
    assert cache.get("s", "fedhq", 0, d) == {"x": 1}
    # where or how visibly a run executes is not part of its result; what it computes is
    assert run_digest(cfg.replace(state_dir="elsewhere", tracking=True), code_digest()) == d
    assert run_digest(cfg.replace(lr=0.01), code_digest()) != d
    assert run_digest(cfg.replace(replicate=1), code_digest()) != d     # a replicate is another run
    assert cache.get("s", "fedhq", 0, run_digest(cfg, "other-code")) is None
    assert "another version of the code or another config" in capsys.readouterr().err
    # the code digest reads the source of the run's code: a changed file changes it
    root = tmp_path / "src"
    (root / "fedhq_core").mkdir(parents=True)
    for part in ("tasks/training.py", "flows/train.py", "flows/significance.py", "flows/runners.py"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).write_text("x = 1\n")
    (root / "fedhq_core" / "a.py").write_text("a = 1\n")
    before = code_digest(root)
    (root / "fedhq_core" / "a.py").write_text("a = 2\n")
    assert code_digest(root) != before


@pytest.mark.parametrize("args, field", [
    (["--seeds", "0,x"], "--seeds"),
    (["--strategies", "fedhq,nope"], "strategies: unknown strategy 'nope'"),
    (["--dataset", "cifar10-folder", "--data-dir", "/no/such/folder"], "data_dir"),
    (["--set", "val_fraction=0"], "val_fraction"),
    (["--replicate-of", "/no/such/study.json", "--set", "replicate=1"], "--replicate-of: cannot read"),
    (["--restore-from", "/no/such/study.json"], "--restore-from: cannot read"),
])
def test_bad_input_is_one_line_exit_2_and_starts_nothing(tmp_path, capsys, args, field):
    from flows.cli import main

    assert main(["study", "--no-tracking", "--state-dir", str(tmp_path / "st")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err and "Traceback" not in err
    assert not (tmp_path / "st" / "study").exists()


def test_protocol_fields_are_checked_by_name(tmp_path, capsys):
    from flows.cli import main

    bad = {"unknown-setting-field": "settings:\n  - {name: a, alpah: 0.5}\n",
           "unknown-key": "name: x\nsetings: []\n",
           "seeds": "seeds: [0, one]\n",
           "no-setting": "settings:\n  - {name: a}\n"}
    expect = {"unknown-setting-field": "alpah: unknown key in setting 'a'", "unknown-key": "setings: unknown key",
              "seeds": "seeds: expected integers", "no-setting": "settings: no setting 'b'"}
    for name, text in bad.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        extra = ["--settings", "b"] if name == "no-setting" else []
        assert main(["study", "--protocol", str(f), "--no-tracking", "--state-dir", str(tmp_path / "st")] + extra) == 2
        err = capsys.readouterr().err
        assert expect[name] in err, err
    # the shipped protocol parses, and every setting validates (its data folder is checked too)
    from flows.study import load_protocol

    if (ROOT.parent / "shared" / "data" / "cifar10").is_dir():
        proto = load_protocol(str(ROOT / "configs" / "study-cifar10.yaml"), {}, None, None)
        assert len(proto.seeds) >= 3 and {"fedhq", "all-ptq", "all-qat", "random-hybrid", "fp32"} <= set(proto.strategies)
        assert {c.alpha for _, c in proto.configs()} >= {0.5, 0.1}
        # a replicate study: the seeds' SGD noise, without the central reference
        from flows.cli import build_parser
        from flows.commands import protocol_from_args

        args = build_parser().parse_args(["study", "--protocol", str(ROOT / "configs" / "study-cifar10.yaml"),
                                          "--no-central", "--set", "replicate=1", "--seeds", "1"])
        rep = protocol_from_args(args, args.strategies, args.seeds, args.only, args.name)
        assert proto.central and not rep.central and rep.seeds == [1]
        assert {c.replicate for _, c in rep.configs()} == {1} and {c.replicate for _, c in proto.configs()} == {0}


def test_statistics_on_known_numbers():
    from flows.study import attach_targets, paired, plateau_gain, stability

    def run(strategy, seed, val, test, total):
        curve = [[float(i + 1), a] for i, a in enumerate(test)]
        return {"strategy": strategy, "seed": seed, "curve": curve, "curve_val": [[float(i + 1), a] for i, a in
                                                                                  enumerate(val)],
                "tail_acc_q": sum(test[-2:]) / 2, "tail_acc_q_val": sum(val[-2:]) / 2, "total_sim_s": total,
                "fit_charged_sim_s": 0.0, "curve_fp32": [[i, a] for i, a in enumerate(test)], "rounds": len(test)}

    by_seed = {}
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        by_seed[seed] = {"fedhq": run("fedhq", seed, [0.5, 0.8, 0.9, 0.9], [0.5 + shift, 0.8, 0.9, 0.92], 4.0),
                         "all-ptq": run("all-ptq", seed, [0.5, 0.7, 0.8, 0.8], [0.5, 0.7, 0.8, 0.8 + shift], 4.0),
                         "all-qat": run("all-qat", seed, [0.3, 0.5, 0.9, 0.9], [0.3, 0.5, 0.7, 0.9], 8.0)}
        attach_targets(by_seed[seed])
    r = by_seed[0]["fedhq"]
    assert r["target_val"] == pytest.approx(0.95 * 0.9)          # the better pure validation tail
    # running mean of 3 validation evaluations: (0.8 + 0.9 + 0.9) / 3 = 0.867 >= 0.855 at t = 4
    assert r["tta_sim_s"] == pytest.approx(4.0)
    assert by_seed[0]["all-ptq"]["tta_sim_s"] is None
    p = paired(by_seed, ["fedhq", "all-ptq", "all-qat"])
    e = p["fedhq-vs-all-ptq"]
    diffs = [0.91 - 0.80, 0.91 - 0.81, 0.91 - 0.82]
    assert e["acc_per_seed"] == pytest.approx(diffs)
    import numpy as np
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert e["acc_ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half], abs=1e-4)
    assert e["verdict"] == "better"
    assert p["fedhq-vs-all-qat"]["acc_ci95"] is not None
    # stability: the spread of the last evaluations; plateau: the last 20% of rounds against before
    assert stability(r, 2) == pytest.approx(np.std([0.9, 0.92]) * 100)
    # a miss names the FP32 master's spread at the same evaluations beside the deployed one
    from flows.study import criteria

    shaky = dict(r, curve=[[1.0, 0.5], [2.0, 0.9]], curve_fp32=[[0, 0.80], [1, 0.81]])
    c = criteria([shaky], {"stability_window": 2, "stability_points": 1.0, "plateau_share": 0.2, "plateau_points": 1.0})
    assert c["stability_fp32_master_points"]["fedhq/seed0"] == pytest.approx(0.5)
    assert not c["met"] and c["misses"] == ["fedhq/seed0: spread 20.00 points over the last 2 evaluations (bound 1; "
                                            "its FP32 master's 0.50)"]
    flat = {"strategy": "fp32", "rounds": 10, "curve_fp32": [[i, 0.5 + 0.05 * min(i, 6)] for i in range(10)]}
    assert plateau_gain(flat, 0.2) == pytest.approx(100 * (0.8 - (0.75 + 0.8 + 0.8) / 3))


def test_t_quantiles_match_scipy():
    from scipy import stats

    from fedhq_core.metrics import running_mean, t975, t_interval, verdict

    for df in (1, 2, 4, 9, 29, 30, 31, 60, 200):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_interval([0.1]) == (0.1, None) and t_interval([]) == (None, None)
    assert verdict([-0.1, 0.2]) == "equal" and verdict([0.01, 0.2]) == "better" and verdict([-0.3, -0.1]) == "worse"
    smooth = running_mean([[1, 0.0], [2, 0.3], [3, 0.6], [4, 0.9]], 3)
    assert [t for t, _ in smooth] == [1, 2, 3, 4] and [a for _, a in smooth] == pytest.approx([0.0, 0.15, 0.3, 0.6])


def test_replicate_noise_on_known_numbers(tmp_path, capsys):
    """Two replicates of each run: the pooled sd of one run's tail, the paired sd, the seeds a
    1-point half-width takes from that noise alone, and fedhq minus the better pure per seed."""
    import numpy as np

    from flows.cli import main
    from fedhq_core.metrics import t975
    from flows.study import replicate_noise

    def setting(tails):
        return {"name": "s", "runs": [{"strategy": st, "seed": sd, "tail_acc_q": v} for (st, sd), v in tails.items()]}

    main_tails = {("fedhq", 0): 0.40, ("all-ptq", 0): 0.35, ("all-qat", 0): 0.42, ("fp32", 0): 0.30}
    moved = {("fedhq", 0): 0.37, ("all-ptq", 0): 0.36, ("all-qat", 0): 0.40}
    rn = replicate_noise(setting(main_tails), setting(moved))
    d = np.array([-0.03, -0.01, -0.02])                     # all-qat, all-ptq, fedhq (sorted by strategy)
    assert rn["n"] == 3 and rn["run_sd"] == pytest.approx(np.sqrt(np.mean(d ** 2) / 2))
    assert rn["paired_sd"] == pytest.approx(rn["run_sd"] * np.sqrt(2)) and rn["max_abs_diff"] == pytest.approx(0.03)
    n = rn["seeds_for_halfwidth"]["0.01"]
    assert t975(n - 1) * rn["paired_sd"] / np.sqrt(n) <= 0.01 < t975(n - 2) * rn["paired_sd"] / np.sqrt(n - 1)
    assert rn["fedhq_vs_better_pure"] == {"0": [pytest.approx(-0.02), pytest.approx(-0.03)]}
    # a replicate must be one, and of a study holding its settings: refused before a run starts
    other = tmp_path / "other.json"
    other.write_text('{"settings": [{"name": "elsewhere", "runs": []}]}')
    for extra, msg in (([], "--set replicate=N"), (["--set", "replicate=1"], "has no setting 'default'")):
        assert main(["study", "--no-tracking", "--state-dir", str(tmp_path / "st"), "--replicate-of", str(other)]
                    + extra) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "st" / "study").exists()
