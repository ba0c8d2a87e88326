"""Benchmark flow: every strategy side by side on the same clients, shards, devices and seeds.

The host is profiled once and the data loaded once; each run obtains its SigAcc model in its own
set-up (charged to it); random-hybrid takes fedhq's measured QAT share. Each
strategy run is an MLflow run nested under the benchmark's parent run.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

from flows import configure_prefect_env

configure_prefect_env()

import torch  # noqa: E402
from prefect import flow  # noqa: E402

from fedhq_core.config import ExperimentConfig, from_mapping  # noqa: E402
from fedhq_core.metrics import accuracy_at, mean_std, running_mean, speedup, time_to_accuracy  # noqa: E402
from fedhq_core.simulation import Simulation, cpu_model, load_data  # noqa: E402
from fedhq_core.strategies import ACCURATE, FAST, METHOD, NAMES as STRATEGY_NAMES, PURE as PURE_STRATEGIES  # noqa: E402
from fedhq_core.strategies import run_order, with_shares  # noqa: E402
from tasks import training as T  # noqa: E402

from flows.runners import set_torch_threads, task_runner_for  # noqa: E402
from flows.train import execute_run  # noqa: E402
from tasks.run_tracking import tracker_for  # noqa: E402

ALL_STRATEGIES = STRATEGY_NAMES     # every registered strategy (fedhq_core.strategies)
METRICS = ("final_acc_q", "tail_acc_q", "tail_acc_q_val", "final_acc_fp32", "tta_sim_s", "tta_uncharged_sim_s", "total_sim_s",
           "charged_total_sim_s", "fit_sim_s", "fit_wall_s", "wall_s", "upload_bytes", "qat_share", "alloc_overhead_s",
           "ptq_extras_share", "label_hist_sim_s", "host_work_priced_s", "host_work_measured_s", "shadow_device_s")


def host_info(device: str) -> dict[str, Any]:
    info = {"cpu": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "python": platform.python_version()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_curves(res: dict[str, Any]) -> dict[str, Any]:
    """A run's deployed accuracy against simulated time: ``curve_uncharged`` as its rounds ran,
    and ``curve``, shifted by a SigAcc pilot made for this run (``fit_charged_sim_s``): the pilot
    ran before the first round, on the same fleet."""
    res["curve_uncharged"] = [[r["sim_time_s"], r["acc_q"]] for r in res["rounds"]]
    res["curve"] = [[t + res.get("fit_charged_sim_s", 0.0), a] for t, a in res["curve_uncharged"]]
    if all("val_acc_q" in r.get("extra", {}) for r in res["rounds"]):   # the run held out a validation split
        res["curve_val"] = val_curve(res)
    return res


def val_curve(res: dict[str, Any]) -> list[list[float]]:
    """Validation accuracy against simulated time, the fit charged: one point per evaluation."""
    return [[r["sim_time_s"] + res.get("fit_charged_sim_s", 0.0), r["extra"]["val_acc_q"]]
            for r in evaluated_rounds(res, "val_evaluated")]


TAIL = 3   # evaluations averaged into tail_acc_q: one evaluation is noisy
RUNNING = 3          # evaluations in the running mean that decides a TTA crossing
TARGET_SHARE = 0.95  # TTA target: this share of the better pure strategy's validation tail


def evaluated_rounds(res: dict[str, Any], flag: str = "evaluated") -> list[dict[str, Any]]:
    """The round records of a run whose model was evaluated on the test split (``flag``
    ``val_evaluated``: on the validation split); the others carry the last figures forward."""
    rounds = res["rounds"]
    return [r for r in rounds if r.get("extra", {}).get(flag, True) or r is rounds[-1]]


def tail_accuracy(res: dict[str, Any], n: int = TAIL, key: str = "acc_q") -> float:
    """Mean quantized accuracy of a run's last ``n`` evaluations (``key``: ``acc_q`` on the test
    split, ``val_acc_q`` on the validation split)."""
    val = key.startswith("val_")
    evaluated = [r["extra"][key] if val else r[key] for r in evaluated_rounds(res, "val_evaluated" if val
                                                                               else "evaluated")][-n:]
    return float(sum(evaluated) / len(evaluated))


PURE = PURE_STRATEGIES


def dominance(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """fedhq against the better pure strategy, on the means over seeds: tail accuracy minus the
    better pure tail accuracy; TTA (to 95% of that better accuracy) over the faster pure
    strategy's; simulated time over all-ptq's. Per-seed values beside them."""
    seeds = sorted(per_seed)
    if not {METHOD, *PURE} <= set(per_seed[seeds[0]]):
        return None

    def mean(name: str, m: str) -> float | None:
        return mean_std(per_seed[s][name][m] for s in seeds)[0]

    def one(acc: dict[str, float], tta: dict[str, float | None], sim: dict[str, float]) -> dict[str, Any]:
        ttas = [tta[n] for n in PURE if tta[n] is not None]
        return {"acc_vs_best": acc[METHOD] - max(acc[n] for n in PURE),
                "tta_vs_best": None if tta[METHOD] is None or not ttas else tta[METHOD] / min(ttas),
                "sim_vs_all_ptq": sim[METHOD] / sim[FAST]}

    names = (METHOD,) + PURE
    # charged: a SigAcc pilot made for the run is on its clock (tta_sim_s and charged_total_sim_s
    # include it); the uncharged figures stand beside them, labelled
    out = one({n: mean(n, "tail_acc_q") for n in names}, {n: mean(n, "tta_sim_s") for n in names},
              {n: mean(n, "charged_total_sim_s") for n in names})
    out["per_seed"] = {str(s): one({n: per_seed[s][n]["tail_acc_q"] for n in names},
                                   {n: per_seed[s][n]["tta_sim_s"] for n in names},
                                   {n: per_seed[s][n]["charged_total_sim_s"] for n in names}) for s in seeds}
    unc = one({n: mean(n, "tail_acc_q") for n in names}, {n: mean(n, "tta_uncharged_sim_s") for n in names},
              {n: mean(n, "total_sim_s") for n in names})
    out["uncharged"] = {"tta_vs_best": unc["tta_vs_best"], "sim_vs_all_ptq": unc["sim_vs_all_ptq"]}
    out["bar"] = {"acc_vs_best": ">= -0.01", "tta_vs_best": "<= 1.05", "sim_vs_all_ptq": "<= 1.10"}
    out["met"] = {"acc_vs_best": out["acc_vs_best"] >= -0.01,
                  "tta_vs_best": out["tta_vs_best"] is not None and out["tta_vs_best"] <= 1.05,
                  "sim_vs_all_ptq": out["sim_vs_all_ptq"] <= 1.10}
    return out


def attach_tta(runs: dict[str, dict[str, Any]], target: float | None = None) -> None:
    """One seed's runs: the TTA target (``target``, else 95% of the better pure strategy's
    validation tail, or of the best run's without both; the test tail's only where the runs hold
    out no validation split, labelled ``target_split``), and each run's TTA, the first simulated
    time (fit charged, and without it) at which the running mean of its last 3 evaluations on
    that split reaches the target."""
    val = all(r.get("curve_val") for r in runs.values())
    key, curve = ("tail_acc_q_val", "curve_val") if val else ("tail_acc_q", "curve")
    pure = [runs[n][key] for n in PURE if n in runs] or [r[key] for r in runs.values()]
    tgt = target if target is not None else TARGET_SHARE * max(pure)
    for r in runs.values():
        r["target"], r["target_split"] = tgt, "validation" if val else "test"
        r["tta_sim_s"] = time_to_accuracy(running_mean(r[curve], RUNNING), tgt)
        r["tta_uncharged_sim_s"] = None if r["tta_sim_s"] is None else r["tta_sim_s"] - r.get("fit_charged_sim_s", 0.0)


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]], target: float | None) -> dict[str, Any]:
    """Per-seed results -> strategies table (means, spreads), speedups, gains and dominance. The
    TTA target and crossings per seed are :func:`attach_tta`'s (the validation tails, unless
    ``target`` fixes it)."""
    seeds = sorted(per_seed)
    for seed in seeds:
        attach_tta(per_seed[seed], target)
    names = list(per_seed[seeds[0]])
    strategies: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {}
        for m in METRICS:
            mean, std = mean_std(per_seed[s][name].get(m) for s in seeds)
            entry[m] = mean
            if len(seeds) > 1:
                entry[f"{m}_std"] = std
        parts = sorted({k for s in seeds for k in per_seed[s][name].get("sim_breakdown_s", {})})
        entry["sim_breakdown_s"] = {k: mean_std(per_seed[s][name].get("sim_breakdown_s", {}).get(k, 0.0)
                                                for s in seeds)[0] for k in parts}
        entry["curve"] = per_seed[seeds[0]][name]["curve"]
        entry["curve_uncharged"] = per_seed[seeds[0]][name]["curve_uncharged"]
        entry["fit_source"] = per_seed[seeds[0]][name]["fit_source"]
        entry["fit_detail"] = per_seed[seeds[0]][name]["fit_detail"]
        for k in ("family_build_sim_s", "family_build_wall_s", "family_settings"):   # a one-off, not charged
            entry[k] = per_seed[seeds[0]][name].get(k, 0)
        entry["run_id"] = per_seed[seeds[0]][name].get("run_id")
        strategies[name] = entry
    out: dict[str, Any] = {"strategies": strategies, "target": mean_std(per_seed[s][names[0]]["target"]
                                                                         for s in seeds)[0],
                           "target_split": per_seed[seeds[0]][names[0]]["target_split"]}
    if METHOD in names:
        out["speedup_tta_vs"] = {}
        for base in names:
            if base == METHOD:
                continue
            vals = [speedup(per_seed[s][base]["tta_sim_s"], per_seed[s][METHOD]["tta_sim_s"]) for s in seeds]
            out["speedup_tta_vs"][base] = mean_std(vals)[0]
        if FAST in names:
            gains = [accuracy_at(per_seed[s][METHOD]["curve"], per_seed[s][FAST]["total_sim_s"])
                     - per_seed[s][FAST]["final_acc_q"] for s in seeds]
            out["acc_gain_vs_all_ptq"] = mean_std(gains)[0]
        if {FAST, ACCURATE} <= set(names):
            rec = []
            for s in seeds:
                gap = per_seed[s][ACCURATE]["final_acc_q"] - per_seed[s][FAST]["final_acc_q"]
                rec.append((per_seed[s][METHOD]["final_acc_q"] - per_seed[s][FAST]["final_acc_q"]) / gap
                           if gap > 0 else None)
            out["gap_recovered_vs_all_ptq"] = mean_std(rec)[0]
            out["sim_time_vs_all_ptq"] = mean_std(per_seed[s][METHOD]["charged_total_sim_s"]
                                                  / per_seed[s][FAST]["charged_total_sim_s"] for s in seeds)[0]
        out["dominance"] = dominance(per_seed)
    return out


@flow(name="fedhq-bench", persist_result=False)
def bench_flow(config: dict[str, Any], strategies: list[str], seeds: list[int], target: float | None = None,
               progress: bool = False) -> dict[str, Any]:
    base = from_mapping(config)
    set_torch_threads(base)
    ds = load_data(base)
    tracker = tracker_for(base)
    parent = None
    speed = None
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        per_seed[seed] = {}
        for name in run_order(strategies):
            cfg = with_shares(base.replace(strategy=name, seed=seed), per_seed[seed])
            sim = Simulation(cfg, dataset=ds)
            if speed is None:
                speed = T.profile_hardware(sim, None)
                if tracker:
                    parent = tracker.start(f"bench-{ds.name}", {**base.public_dict(), "strategies": strategies,
                                                                 "seeds": seeds}, tags={"kind": "bench"})
            # execute_run's set-up (loop.prepare) starts the clock and obtains SigAcc
            print(f"fedhq bench: seed {seed} {name}", file=sys.stderr, flush=True)
            res = execute_run(cfg, speed=speed, sim=sim, parent_run_id=parent, progress=progress)
            add_curves(res)
            res["tail_acc_q"] = tail_accuracy(res)
            if "curve_val" in res:
                res["tail_acc_q_val"] = tail_accuracy(res, key="val_acc_q")
            per_seed[seed][name] = res
    out = summarize(per_seed, target)
    sigs = {str(s): runs[METHOD].get("significance") for s, runs in per_seed.items() if METHOD in runs}
    out["significance"] = {s: v for s, v in sigs.items() if v} or None
    out["config"] = base.public_dict()
    out["seeds"] = list(seeds)
    out["host"] = host_info(str(sim.device.type))
    out["speed_model"] = speed.describe(base.batch_size) if speed else None
    out["per_seed"] = {str(s): {n: {m: r.get(m) for m in METRICS} for n, r in runs.items()}
                       for s, runs in per_seed.items()}
    publish_bench(out, ds.name, base.state_dir, seeds, tracker, parent)
    return out


def publish_bench(out: dict[str, Any], dataset: str, state_dir: str, seeds: list[int], tracker,
                  parent: str | None) -> None:
    """The benchmark's plots (accuracy against simulated time, TTA bars), logged on its parent
    MLflow run with ``bench.json``, and its table as a Prefect artifact."""
    from tasks.plots import accuracy_vs_time, tta_bars

    plot_dir = os.path.join(state_dir, "plots", f"bench-{dataset}")
    out["plots"] = {
        "accuracy_vs_time": accuracy_vs_time({n: e["curve"] for n, e in out["strategies"].items()},
                                             os.path.join(plot_dir, "accuracy_vs_time.png"), out["target"]),
        "tta": tta_bars({n: e["tta_sim_s"] for n, e in out["strategies"].items()}, os.path.join(plot_dir, "tta.png")),
    }
    if tracker and parent:
        tracker.run_id = parent
        for p in out["plots"].values():
            tracker.log_artifact(p, "plots")
        tracker.log_dict({k: v for k, v in out.items() if k != "per_seed"}, "bench.json")
        run_url = tracker.run_url()
        tracker.end()
    from flows.artifacts import publish_table

    headers, rows = bench_table(out)
    publish_table(f"bench-{dataset}", [dict(zip(headers, r)) for r in rows],
                  f"fedhq bench on {dataset}, seeds {list(seeds)}: target accuracy {out['target']:.4f}",
                  {"MLflow benchmark run": run_url} if tracker and parent else None)


def run_bench(cfg: ExperimentConfig, strategies: list[str], seeds: list[int], target: float | None,
              progress: bool = False) -> dict[str, Any]:
    set_torch_threads(cfg)
    # the runner the config asks for, as `fedhq run` uses it: threads, or Dask (--dask-local N,
    # --dask-address) where each client trains on a worker that reloads the split from its key
    f = bench_flow.with_options(task_runner=task_runner_for(cfg))
    return f(cfg.public_dict(), strategies, seeds, target, progress)


def bench_table(out: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["strategy", "acc_q", "tail_acc_q", "acc_fp32", "TTA_sim_s", "total_sim_s", "fit_sim_s", "fit",
               "wall_s", "upload_MB", "qat_share", "alloc_s"]
    rows = []
    for name, e in out["strategies"].items():
        fmt = lambda v, nd=3: "-" if v is None else round(v, nd)  # noqa: E731
        rows.append([name, fmt(e["final_acc_q"], 4), fmt(e["tail_acc_q"], 4), fmt(e["final_acc_fp32"], 4), fmt(e["tta_sim_s"]),
                     fmt(e["charged_total_sim_s"]), fmt(e["fit_sim_s"]), e["fit_source"], fmt(e["wall_s"], 1),
                     fmt(e["upload_bytes"] / 1e6, 2), fmt(e["qat_share"], 2), fmt(e["alloc_overhead_s"])])
    return headers, rows


BREAKDOWN_PARTS = ("fp32", "qat", "calib", "wsearch", "fwd", "pack", "shadow", "upload", "alloc", "server", "server_wait",
                   "deploy", "failed")


def breakdown_table(out: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Each strategy's simulated time split by what the critical client of each round spent it on."""
    def part(e: dict[str, Any], p: str) -> float:   # "shadow": every shadow_<kind> (a paired measurement's work)
        split = e.get("sim_breakdown_s", {})
        return sum(v for k, v in split.items() if k.startswith("shadow_")) if p == "shadow" else split.get(p, 0.0)
    parts = [p for p in BREAKDOWN_PARTS if any(part(e, p) for e in out["strategies"].values())]
    rows = [[name] + [round(part(e, p), 2) for p in parts] + [round(e["total_sim_s"], 2)]
            for name, e in out["strategies"].items()]
    return ["strategy"] + [f"{p}_s" for p in parts] + ["total_sim_s"], rows
