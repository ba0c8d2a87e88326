"""``fedhq study``: a protocol of settings x strategies x seeds, paired, cached, with intervals.

* **Paired.** Per seed, every strategy of a setting gets the same shards, validation split,
  device assignment and initial weights (all are drawn from the run's seed), and the data are
  loaded once per setting.
* **Cached.** Every finished (setting, strategy, seed) run is written atomically to
  ``<state_dir>/study/<study>/<setting>/<strategy>-seed<seed>.json`` with a digest of its config
  and of the code that computes a run (``RUN_CODE``). A study run again, or after a kill -9,
  reuses every finished run whose digest matches and starts only what is missing; a run written
  by another version of the code or another config is never reused (one line says so).
* **Statistics** (``run_figures``, ``paired``): the tail is the mean of the last ``TAIL``
  evaluations; the TTA target is 95% of the better pure strategy's *validation* tail, per seed,
  and a run's TTA is the first simulated time (fit charged) at which the running mean over 3
  evaluations of its validation accuracy reaches it; paired differences fedhq - baseline per
  seed, with the mean and a 95% t-interval over seeds, and a verdict.
* **Criteria** (``criteria``): the fp32 reference's gain over the last 20% of rounds (plateau)
  and every run's spread over its last 10 evaluations (stability), each against its bound.

The test split is only reported; selections (the TTA target) read the validation split.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flows import configure_prefect_env

configure_prefect_env()

import numpy as np  # noqa: E402
from prefect import flow  # noqa: E402

from fedhq_core.config import STRATEGIES, ExperimentConfig, from_mapping, read_yaml  # noqa: E402
from fedhq_core.errors import ConfigError  # noqa: E402
from fedhq_core.metrics import accuracy_at, commit_audit, running_mean, t975, t_interval, verdict  # noqa: E402
from fedhq_core.records import write_json  # noqa: E402
from fedhq_core.simulation import Simulation, data_key  # noqa: E402
from fedhq_core.strategies import METHOD, REFERENCE, run_order, with_shares  # noqa: E402
from tasks import training as T  # noqa: E402

from flows.bench import PURE, RUNNING, TARGET_SHARE, attach_tta, dominance, evaluated_rounds, host_info, tail_accuracy, val_curve  # noqa: E402
from flows.runners import set_torch_threads, task_runner_for  # noqa: E402
from flows.train import execute_run  # noqa: E402
from tasks.run_tracking import tracker_for  # noqa: E402

TAIL = 5                  # evaluations averaged into a run's tail accuracy
PROTOCOL_KEYS = ("name", "base", "settings", "strategies", "seeds", "criteria", "central")
CRITERIA = {"plateau_share": 0.2, "plateau_points": 1.0, "stability_window": 10, "stability_points": 1.0}
# the code that computes a run's figures: a change to any of it makes every cached run stale
RUN_CODE = ("fedhq_core", "tasks/training.py", "flows/train.py", "flows/significance.py", "flows/runners.py")
# config keys that change where or how visibly a run executes, not what it computes
NOT_RESULTS = ("tracking", "tracking_uri", "experiment", "registered_model", "state_dir", "checkpoint",
               "checkpoint_keep", "checkpoint_log_every", "max_concurrency", "clients_per_task", "server_tasks",
               "dask_address", "dask_local", "download")


@dataclass
class Protocol:
    """What a study runs: ``settings`` (each a name and the config fields it changes from
    ``base``) x ``strategies`` x ``seeds``."""

    name: str
    base: dict[str, Any]
    settings: list[dict[str, Any]]
    strategies: list[str]
    seeds: list[int]
    criteria: dict[str, float] = field(default_factory=lambda: dict(CRITERIA))
    central: bool = False           # also train each setting's network centrally (seed of the first run)

    def configs(self) -> list[tuple[str, ExperimentConfig]]:
        """Every setting's validated config (a bad field raises ConfigError naming it)."""
        out = []
        for s in self.settings:
            fields = {k: v for k, v in s.items() if k != "name"}
            out.append((s["name"], from_mapping({**self.base, **fields}, source=f"setting {s['name']!r}")))
        return out


def load_protocol(path: str | None, flags: dict[str, Any], strategies: list[str] | None, seeds: list[int] | None,
                  only: list[str] | None = None, name: str | None = None) -> Protocol:
    """A protocol YAML (or none: one setting, the flags' config) with the command line's config
    flags over its ``base``, and ``--strategies``/``--seeds``/``--settings`` over its lists.
    Everything is validated before any run starts."""
    raw: dict[str, Any] = read_yaml(path) if path else {}
    unknown = [k for k in raw if k not in PROTOCOL_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path} (a protocol has {', '.join(PROTOCOL_KEYS)})")
    base = dict(raw.get("base") or {})
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a mapping of config keys in {path}")
    base.update(flags)
    settings = raw.get("settings") or [{"name": "default"}]
    if not isinstance(settings, list) or not all(isinstance(s, dict) and s.get("name") for s in settings):
        raise ConfigError(f"settings: expected a list of mappings, each with a name, in {path}")
    names = [str(s["name"]) for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError("settings: two settings share a name")
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ConfigError(f"settings: no setting {missing[0]!r} (the protocol has {', '.join(names)})")
        settings = [s for s in settings if s["name"] in only]
    strategies = strategies or list(raw.get("strategies") or [METHOD, *PURE])
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"strategies: unknown strategy {s!r} (choose from {', '.join(STRATEGIES)})")
    try:
        seeds = seeds or [int(s) for s in (raw.get("seeds") or [base.get("seed", 0)])]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds: expected integers, got {raw.get('seeds')!r}") from None
    criteria = dict(CRITERIA)
    for k, v in (raw.get("criteria") or {}).items():
        if k not in CRITERIA:
            raise ConfigError(f"criteria: unknown key {k!r} (choose from {', '.join(CRITERIA)})")
        try:
            criteria[k] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"criteria: {k} must be a number, got {v!r}") from None
    proto = Protocol(name or str(raw.get("name") or "study"), base, [dict(s, name=str(s["name"])) for s in settings],
                     list(strategies), list(seeds), criteria, bool(raw.get("central", False)))
    for _, cfg in proto.configs():     # every setting validates now, before a run starts
        if cfg.val_fraction <= 0:
            raise ConfigError("val_fraction: a study selects on the validation split; it must be > 0")
    return proto


# --- the cache ----------------------------------------------------------------------------------
def code_digest(root: Path | None = None) -> str:
    """sha256 over the source of the code that computes a run (``RUN_CODE``) and torch's version."""
    import torch

    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.sha256(torch.__version__.encode())
    for part in RUN_CODE:
        p = root / part
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".json")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_digest(cfg: ExperimentConfig, code: str) -> str:
    keep = {k: v for k, v in cfg.public_dict().items() if k not in NOT_RESULTS}
    return hashlib.sha256(json.dumps([keep, code], sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunCache:
    """One JSON file per finished run; written atomically, so a kill leaves whole files only."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, setting: str, strategy: str, seed: int) -> Path:
        return self.root / setting / f"{strategy}-seed{seed}.json"

    def get(self, setting: str, strategy: str, seed: int, digest: str) -> dict[str, Any] | None:
        p = self.path(setting, strategy, seed)
        if not p.is_file():
            return None
        try:
            entry = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"fedhq study: {p}: unreadable cache entry; running again", file=sys.stderr)
            return None
        if entry.get("digest") != digest:
            print(f"fedhq study: {p}: written by another version of the code or another config "
                  f"(digest {entry.get('digest')} != {digest}); running again", file=sys.stderr)
            return None
        return entry["run"]

    def put(self, setting: str, strategy: str, seed: int, digest: str, run: dict[str, Any]) -> None:
        write_json(self.path(setting, strategy, seed), {"digest": digest, "run": run})


def restore_runs(paths: list[str], proto: Protocol) -> int:
    """``--restore-from``: put the runs of committed study JSONs into this study's cache, so that a
    fresh checkout resumes a study from its results. Each run carries the digest it was written
    with, so the cache's check still decides: a run of another build or config is not reused (the
    study says so in one line and runs it again). Entries already in the cache are kept. Returns
    how many runs were restored."""
    cache = RunCache(Path(proto.configs()[0][1].state_dir) / "study" / proto.name)
    wanted = {name for name, _ in proto.configs()}
    n = 0
    for path in paths:
        try:
            settings = json.loads(Path(path).read_text())["settings"]
            found = [(s["name"], r) for s in settings for r in s["runs"] + ([s["central"]] if s.get("central") else [])]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--restore-from: cannot read a study JSON from {path} ({type(err).__name__})") from None
        for name, run in found:
            if name not in wanted or "digest" not in run:     # central references before this build carry none
                continue
            strategy, seed = run.get("strategy", "central"), int(run["seed"])
            if not cache.path(name, strategy, seed).is_file():
                cache.put(name, strategy, seed, run["digest"], run)
                n += 1
    return n


# --- one run's figures --------------------------------------------------------------------------
RUN_KEEP = ("final_acc_q", "final_acc_q_val", "final_acc_fp32", "total_sim_s", "charged_total_sim_s", "fit_sim_s",
            "fit_charged_sim_s", "fit_source", "wall_s", "upload_bytes", "qat_share", "alloc_overhead_s", "host_work_priced_s",
            "host_work_measured_s", "shadow_device_s",
            "sim_breakdown_s", "label_hist_sim_s", "run_id", "significance")


def run_record(res: dict[str, Any], strategy: str, seed: int) -> dict[str, Any]:
    """What the study keeps of a run: its figures and its evaluated curves (test and validation
    accuracy against simulated time, the fit charged), and the round-level numbers needed for
    the criteria."""
    shift = res.get("fit_charged_sim_s", 0.0)
    ev = evaluated_rounds(res)
    out = {"strategy": strategy, "seed": seed, **{k: res.get(k) for k in RUN_KEEP}}
    out["curve"] = [[r["sim_time_s"] + shift, r["acc_q"]] for r in ev]
    out["curve_val"] = val_curve(res)
    out["curve_fp32"] = [[r["round"], r["acc_fp32"]] for r in ev]
    out["rounds"] = len(res["rounds"])
    out["tail_acc_q"] = tail_accuracy(res, TAIL)
    out["tail_acc_q_val"] = tail_accuracy(res, TAIL, "val_acc_q")
    out["tail_acc_fp32"] = tail_accuracy(res, TAIL, "acc_fp32")
    out["fit_sim_s"] = res.get("fit_sim_s", 0.0)
    # what deciding cost and what was decided: the server's priced measurements (overlapping the
    # clients' training), the QAT clients per round and, for an online fedhq run, its commit
    out["measure_sim_s"] = float(sum(r["extra"].get("server_measure_s", 0.0) for r in res["rounds"]))
    out["qat_per_round"] = [r["n_qat"] for r in res["rounds"]]
    out["partial_qat_per_round"] = [int(r["extra"].get("n_partial_qat", 0)) for r in res["rounds"]]
    out["paired_per_round"] = [int(r["extra"].get("n_paired", 0)) for r in res["rounds"]]   # exploring: shadows
    # the server's checks turned these uploads away (by reason, and per round)
    out["rejected"] = res.get("rejected", {})
    out["rejected_per_round"] = [len(r.get("rejected", {})) for r in res["rounds"]]
    # the exploring rounds' comparisons (round, QAT minus PTQ accuracy, its per-image standard error)
    out["partials"] = [[r["round"], r["extra"]["partial_accuracy"], r["extra"].get("partial_accuracy_se")]
                       for r in res["rounds"] if "partial_accuracy" in r["extra"]]
    last = res["rounds"][-1]["extra"] if res["rounds"] else {}
    if "committed_qat" in last:
        out["decision"] = {k: last[k] for k in ("committed_qat", "online_gain", "online_se", "online_n", "evidence")
                           if k in last}
    out["total_sim_s"] = res["charged_total_sim_s"]          # fit charged, as fedhq bench charges it
    out["uncharged_total_sim_s"] = res["total_sim_s"]
    return out


def stability(run: dict[str, Any], window: int, curve: str = "curve") -> float:
    """Standard deviation (points) of the deployed test accuracy over the last ``window``
    evaluations (``curve_fp32``: of the FP32 master's, at the same evaluations)."""
    accs = [a for _, a in run[curve]][-window:]
    return float(np.std(accs) * 100)


def plateau_gain(run: dict[str, Any], share: float) -> float:
    """Points of FP32 accuracy gained in the last ``share`` of rounds: the mean of the last 3
    evaluations minus the mean of the 3 evaluations up to round (1 - share) x rounds."""
    cut = (1 - share) * run["rounds"]
    before = [a for r, a in run["curve_fp32"] if r + 1 <= cut][-RUNNING:]
    end = [a for _, a in run["curve_fp32"]][-RUNNING:]
    return float((np.mean(end) - np.mean(before)) * 100) if before else float("nan")


def attach_targets(runs: dict[str, dict[str, Any]]) -> None:
    """Per seed: the TTA target from the pure strategies' validation tails and each run's TTA on
    its running-mean validation curve (``bench.attach_tta``), and its accuracy at each pure
    strategy's total time."""
    attach_tta(runs)
    for r in runs.values():
        r["target_val"] = r.pop("target")
        smooth = running_mean(r["curve"], RUNNING)
        r["acc_at"] = {n: accuracy_at(smooth, runs[n]["total_sim_s"]) for n in PURE if n in runs}


def vs_better_pure(tail: Callable[[str], float]) -> float:
    """fedhq's tail minus the better pure strategy's, one seed (``tail``: strategy -> its tail)."""
    return tail(METHOD) - max(tail(p) for p in PURE)


def paired(by_seed: dict[int, dict[str, dict[str, Any]]], strategies: list[str]) -> dict[str, Any]:
    """fedhq minus each baseline, per seed: tail accuracy (test), TTA ratio, accuracy at each
    pure strategy's total time; mean, 95% t-interval over seeds and a verdict."""
    out: dict[str, Any] = {}
    seeds = sorted(by_seed)
    if METHOD not in strategies:
        return out
    for base in [s for s in strategies if s != METHOD]:
        acc = [by_seed[s][METHOD]["tail_acc_q"] - by_seed[s][base]["tail_acc_q"] for s in seeds]
        ratio = [None if by_seed[s][METHOD]["tta_sim_s"] is None or not by_seed[s][base]["tta_sim_s"]
                 else by_seed[s][METHOD]["tta_sim_s"] / by_seed[s][base]["tta_sim_s"] for s in seeds]
        m, ci = t_interval(acc)
        rm, rci = t_interval(ratio)
        entry = {"acc_per_seed": acc, "acc_mean": m, "acc_ci95": ci, "verdict": verdict(ci),
                 "tta_ratio_per_seed": ratio, "tta_ratio_mean": rm, "tta_ratio_ci95": rci,
                 "tta_verdict": "equal" if rci is None else "better" if rci[1] < 1 else "worse" if rci[0] > 1
                 else "equal", "tta_reached": f"{sum(r is not None for r in ratio)}/{len(seeds)}"}
        for p in PURE:
            if p in by_seed[seeds[0]]:
                d = [by_seed[s][METHOD]["acc_at"][p] - by_seed[s][base]["acc_at"][p] for s in seeds]
                em, eci = t_interval(d)
                entry[f"acc_at_{p}_time"] = {"per_seed": d, "mean": em, "ci95": eci, "verdict": verdict(eci)}
        out[f"{METHOD}-vs-{base}"] = entry
    if set(PURE) <= set(by_seed[seeds[0]]):   # against the better pure strategy of each seed
        best = [vs_better_pure(lambda n, s=s: by_seed[s][n]["tail_acc_q"]) for s in seeds]
        m, ci = t_interval(best)
        out[f"{METHOD}-vs-better-pure"] = {"acc_per_seed": best, "acc_mean": m, "acc_ci95": ci, "verdict": verdict(ci)}
    return out


def replicate_noise(main: dict[str, Any], rep: dict[str, Any], halfwidths: tuple[float, ...] = (0.01, 0.025)
                    ) -> dict[str, Any]:
    """How far a run's test tail moves when only its SGD noise is redrawn (``replicate``): ``rep``
    is a setting of a replicate study, ``main`` the same setting of the study it replicates (same
    shards, devices, samples and initial weights). Per (strategy, seed) in both: the two tails
    and their difference. ``run_sd`` pools the differences (each has variance 2 sd², mean 0);
    a paired difference of two runs (fedhq minus a baseline, one seed) carries ``paired_sd`` =
    sd x sqrt(2) of noise alone, so ``seeds_for_halfwidth`` is the fewest seeds whose 95%
    t-interval is that narrow from replicate noise alone (a lower bound: the effect also varies
    between seeds). Also fedhq minus the better pure strategy per seed in both studies."""
    tails = {k: {(r["strategy"], r["seed"]): r["tail_acc_q"] for r in s["runs"]} for k, s in (("main", main), ("rep", rep))}
    pairs = [{"strategy": st, "seed": sd, "main": tails["main"][st, sd], "replicate": v,
              "diff": v - tails["main"][st, sd]} for (st, sd), v in sorted(tails["rep"].items()) if (st, sd) in tails["main"]]
    d = np.array([p["diff"] for p in pairs], dtype=float)
    run_sd = float(np.sqrt(np.mean(d ** 2) / 2)) if len(d) else None
    out: dict[str, Any] = {"pairs": pairs, "n": len(pairs), "run_sd": run_sd,
                           "paired_sd": None if run_sd is None else run_sd * float(np.sqrt(2)),
                           "max_abs_diff": float(np.abs(d).max()) if len(d) else None}
    if run_sd:
        out["seeds_for_halfwidth"] = {f"{h:g}": next(n for n in range(2, 1000)
                                                    if t975(n - 1) * out["paired_sd"] / np.sqrt(n) <= h)
                                      for h in halfwidths}
    best = {}
    for sd in sorted({p["seed"] for p in pairs}):
        if all((st, sd) in t for t in tails.values() for st in (METHOD, *PURE)):
            best[str(sd)] = [vs_better_pure(lambda n, t=t: t[n, sd]) for t in (tails["main"], tails["rep"])]
    out["fedhq_vs_better_pure"] = best     # seed -> [main study, replicate]
    return out


def criteria(runs: list[dict[str, Any]], crit: dict[str, float]) -> dict[str, Any]:
    """Stability of every run and the fp32 reference's plateau, each against its bound; misses named."""
    window = int(crit["stability_window"])
    stab = {f"{r['strategy']}/seed{r['seed']}": stability(r, window) for r in runs}
    # the same spread of the FP32 master: a deployment that moves more than its master is the cause
    master = {f"{r['strategy']}/seed{r['seed']}": stability(r, window, "curve_fp32") for r in runs}
    plat = {f"{REFERENCE}/seed{r['seed']}": plateau_gain(r, crit["plateau_share"]) for r in runs
            if r["strategy"] == REFERENCE}
    misses = [f"{k}: spread {v:.2f} points over the last {window} evaluations (bound {crit['stability_points']:g}; "
              f"its FP32 master's {master[k]:.2f})" for k, v in stab.items() if not v <= crit["stability_points"]]
    misses += [f"{k}: gained {v:.2f} points in the last {crit['plateau_share']:.0%} of rounds "
               f"(bound {crit['plateau_points']:g}: not at a plateau)" for k, v in plat.items()
               if not v < crit["plateau_points"]]
    return {"stability_points": stab, "stability_fp32_master_points": master, "plateau_gain_points": plat,
            "bounds": dict(crit),
            "met": not misses, "misses": misses}


def family_report(cfg: ExperimentConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The shipped family of the setting's dataset and model, weighed: whether it covers the
    setting and which of the setting's fields are grid values, its leave-one-setting-out R²,
    whether fedhq uses it (``FAMILY_MIN_R2``), and its payback: the one-off build's simulated
    seconds over what the online decision cost a fedhq run of the setting (the server's priced
    measurements, mean over seeds): the runs it takes to pay back were it to predict as well as
    deciding online; never while it does not."""
    from fedhq_core.allocation.fedhq import FAMILY_MIN_R2
    from fedhq_core.allocation.pilot import shipped_family

    fam = shipped_family(cfg.dataset, cfg.model)
    if fam is None:
        return None
    covers, why = fam.covers(cfg)
    r2, r2_level = float(fam.r2.get("cv_settings", float("nan"))), fam.setting_r2()
    predicts = fam.model_level(cfg.significance, FAMILY_MIN_R2) is not None
    online = [r["measure_sim_s"] for r in runs if r["strategy"] == METHOD and "measure_sim_s" in r]
    per_run = float(np.mean(online)) if online else None
    build = float(fam.build.get("sim_s", 0.0))
    runs_needed = build / per_run if per_run else None
    payback = ((f"after {runs_needed:.0f} runs of settings it covers" if runs_needed else "reached") if predicts else
               f"never: its leave-one-setting-out R² per client is {r2:.2f}, below {FAMILY_MIN_R2:.2f}, so it "
               f"cannot stand in for the online decision (per setting {r2_level:.2f}, read only with "
               "significance: setting)")
    return {"covers": covers, "why": why, "fields": fam.field_status(cfg), "r2_settings": r2,
            "r2_setting_level": r2_level, "used_by_fedhq": covers and predicts, "build_sim_s": build,
            "online_decision_sim_s": per_run, "payback_runs_if_predictive": runs_needed, "payback": payback}


def summarize_setting(name: str, cfg: ExperimentConfig, by_seed: dict[int, dict[str, dict[str, Any]]],
                      strategies: list[str], crit: dict[str, float]) -> dict[str, Any]:
    for runs in by_seed.values():
        attach_targets(runs)
    runs = [by_seed[s][n] for s in sorted(by_seed) for n in strategies]
    out = {"name": name, "config": cfg.public_dict(), "runs": runs, "paired": paired(by_seed, strategies),
           "criteria": criteria(runs, crit), "family": family_report(cfg, runs),
           "decisions": commit_audit(by_seed, METHOD, PURE)}
    if METHOD in strategies and set(PURE) <= set(strategies):
        out["bar"] = dominance({s: {n: {**r, "charged_total_sim_s": r["total_sim_s"],
                                        "total_sim_s": r["uncharged_total_sim_s"]} for n, r in by_seed[s].items()}
                                for s in by_seed})
        lo = (out["paired"][f"{METHOD}-vs-better-pure"]["acc_ci95"] or [None])[0]
        out["bar"]["interval_vs_better_pure_lo"] = lo
        out["bar"]["met"]["interval_lo_ge_-1.5"] = lo is not None and lo >= -0.015
        per = out["bar"]["per_seed"]
        out["bar"]["met_every_seed"] = all(v["acc_vs_best"] >= -0.01 and v["tta_vs_best"] is not None
                                           and v["tta_vs_best"] <= 1.05 and v["sim_vs_all_ptq"] <= 1.10
                                           for v in per.values())
    return out


# --- the flow -----------------------------------------------------------------------------------
class Progress:
    """Runs done and remaining, and an estimate of the time left from the wall time of the runs
    that ran (a cached run's recorded wall time stands in until one has)."""

    def __init__(self, total: int):
        self.total, self.done, self.ran, self.cached, self.t0 = total, 0, 0, 0, time.perf_counter()
        self.walls: dict[str, list[float]] = {}

    def step(self, what: str, strategy: str, wall_s: float, cached: bool) -> str:
        self.done += 1
        self.cached += cached
        self.ran += not cached
        self.walls.setdefault(strategy, []).append(wall_s)
        per = float(np.mean([w for ws in self.walls.values() for w in ws]))
        left = (self.total - self.done) * per
        return (f"fedhq study: [{self.done}/{self.total}] {what}: {'cached' if cached else f'ran in {wall_s:.0f} s'}; "
                f"{self.total - self.done} to go, about {left / 60:.0f} min left")


@flow(name="fedhq-study", persist_result=False)
def study_flow(proto_dict: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    proto = Protocol(**proto_dict)
    t0 = time.perf_counter()
    settings = proto.configs()
    base0 = settings[0][1]
    set_torch_threads(base0)
    code = code_digest()
    cache = RunCache(Path(base0.state_dir) / "study" / proto.name)
    tracker = tracker_for(base0)
    parent = tracker.start(f"study-{proto.name}", {"protocol": json.dumps(proto_dict, default=str)[:5000]},
                           tags={"kind": "study"}) if tracker else None
    bar = Progress(len(settings) * len(proto.strategies) * len(proto.seeds))
    out_settings, device = [], "cpu"
    loaded: dict[Any, Any] = {}
    for name, cfg in settings:
        key = data_key(cfg)
        ds = loaded.get(key) or key.load()
        loaded = {key: ds}               # one setting's images in memory at a time
        speed = None
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for seed in proto.seeds:
            by_seed[seed] = {}
            for strategy in run_order(proto.strategies):
                rcfg = with_shares(cfg.replace(strategy=strategy, seed=seed), by_seed[seed])
                digest = run_digest(rcfg, code)
                what = f"{name} {strategy} seed {seed}"
                run = cache.get(name, strategy, seed, digest)
                cached = run is not None
                if run is None:
                    print(f"fedhq study: {what}: running", file=sys.stderr, flush=True)
                    sim = Simulation(rcfg, dataset=ds)
                    device = str(sim.device.type)
                    speed = speed or T.profile_hardware(sim, None)
                    # execute_run's set-up (loop.prepare) starts the clock and obtains SigAcc
                    res = execute_run(rcfg, speed=speed, sim=sim, parent_run_id=parent, progress=progress,
                                      register=False, run_name=f"{proto.name}-{name}-{strategy}-s{seed}")
                    run = run_record(res, strategy, seed)
                    # the CPU it ran on: float kernels differ between CPUs, so the same config and
                    # code give another realization on another CPU (within the replicate noise)
                    run.update(digest=digest, cpu=host_info(device)["cpu"])
                    cache.put(name, strategy, seed, digest, run)
                by_seed[seed][strategy] = run
                print(bar.step(what, strategy, run["wall_s"], cached), file=sys.stderr, flush=True)
        entry = summarize_setting(name, cfg, by_seed, proto.strategies, proto.criteria)
        if proto.central:
            from fedhq_core.central import train_central

            entry["central"] = central_reference(cache, name, cfg.replace(strategy=REFERENCE, seed=proto.seeds[0]), ds,
                                                 code, train_central)
        out_settings.append(entry)
    n_val = int(round(base0.val_fraction * len(loaded[next(iter(loaded))].train))) if loaded else 0
    out = {"study": proto.name, "protocol": proto_dict, "code_digest": code,
           "validation": {"split": "val_fraction of the training images, held out from the clients and the server's "
                                   "proxy, drawn per seed; selections (TTA targets) read it, the test split is only "
                                   "reported", "fraction": base0.val_fraction, "size": n_val},
           "statistics": {"tail": f"mean of the last {TAIL} evaluations",
                          "tta": f"first simulated time (fit charged) at which the running mean of {RUNNING} "
                                 f"evaluations of validation accuracy reaches {TARGET_SHARE:.0%} of the better pure "
                                 "strategy's validation tail (per seed)",
                          "paired": "fedhq minus baseline per seed; mean and 95% Student-t interval over seeds; "
                                    "better / worse when the interval excludes 0, else equal",
                          "equal_time": f"running mean of {RUNNING} evaluations of test accuracy at the pure "
                                        "strategy's total simulated time"},
           "settings": out_settings, "strategies": proto.strategies, "seeds": proto.seeds,
           "runs_ran": bar.ran, "runs_cached": bar.cached, "wall_s": time.perf_counter() - t0,
           "run_cpus": sorted({str(r.get("cpu", "not recorded")) for s in out_settings for r in s["runs"]}),
           "runs_wall_s": float(sum(r["wall_s"] for s in out_settings for r in s["runs"])),
           "host": host_info(device)}
    out["plots"] = study_plots(out, Path(base0.state_dir) / "plots" / f"study-{proto.name}")
    if tracker and parent:
        tracker.run_id = parent
        for p in out["plots"].values():
            tracker.log_artifact(p, "plots")
        tracker.log_dict(out, "study.json")
        tracker.end()
    return out


def central_reference(cache: RunCache, setting: str, cfg: ExperimentConfig, ds: Any, code: str,
                      train_central: Any) -> dict[str, Any]:
    """The network trained centrally on the pooled client images for the fp32 run's sample-steps
    (cached like a run)."""
    digest = run_digest(cfg, code + "central")
    hit = cache.get(setting, "central", cfg.seed, digest)
    if hit is None:
        print(f"fedhq study: {setting} central reference: training", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        hit = train_central(cfg, ds)
        hit["wall_s"] = time.perf_counter() - t0
        hit.update(digest=digest, seed=cfg.seed)     # so that --restore-from can put it back
        cache.put(setting, "central", cfg.seed, digest, hit)
    return hit


def study_plots(out: dict[str, Any], folder: Path) -> dict[str, str]:
    from tasks.plots import paired_differences, accuracy_bands

    plots = {}
    for s in out["settings"]:
        curves: dict[str, list[list[list[float]]]] = {}
        for r in s["runs"]:
            curves.setdefault(r["strategy"], []).append(r["curve"])
        plots[f"{s['name']}/accuracy_vs_time"] = accuracy_bands(curves, str(folder / s["name"] / "accuracy_vs_time.png"),
                                                                f"{s['name']}: mean and range over seeds")
        if s["paired"]:
            plots[f"{s['name']}/paired"] = paired_differences(s["paired"], str(folder / s["name"] / "paired.png"),
                                                              f"{s['name']}: fedhq minus baseline, per seed")
    return plots


def run_study(proto: Protocol, progress: bool = False) -> dict[str, Any]:
    base0 = proto.configs()[0][1]
    set_torch_threads(base0)
    f = study_flow.with_options(task_runner=task_runner_for(base0))
    return f(proto.__dict__, progress)


def study_table(out: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per setting and strategy: means over seeds with the spread (min..max) where it matters."""
    headers = ["setting", "strategy", "tail_acc_q", "range", "tail_val", "tta_sim_s", "total_sim_s", "qat_share",
               "stab_pts", "wall_s"]
    rows = []
    for s in out["settings"]:
        stab = s["criteria"]["stability_points"]
        for name in out["strategies"]:
            runs = [r for r in s["runs"] if r["strategy"] == name]
            tail = [r["tail_acc_q"] for r in runs]
            tta = [r["tta_sim_s"] for r in runs]
            rows.append([s["name"], name, round(float(np.mean(tail)), 4), f"{min(tail):.3f}..{max(tail):.3f}",
                         round(float(np.mean([r["tail_acc_q_val"] for r in runs])), 4),
                         "-" if None in tta else round(float(np.mean(tta)), 2),
                         round(float(np.mean([r["total_sim_s"] for r in runs])), 2),
                         round(float(np.mean([r["qat_share"] for r in runs])), 2),
                         round(max(stab[f"{name}/seed{r['seed']}"] for r in runs), 2),
                         round(float(np.mean([r["wall_s"] for r in runs])), 1)])
    return headers, rows


def paired_table(out: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["setting", "comparison", "acc_pts_mean", "acc_ci95", "verdict", "tta_ratio", "tta_ci95", "tta_verdict"]
    rows = []
    pts = lambda v: "-" if v is None else round(100 * v, 2)   # noqa: E731
    ci = lambda c, k=100: "-" if c is None else f"[{k * c[0]:+.2f}, {k * c[1]:+.2f}]"   # noqa: E731
    for s in out["settings"]:
        for comp, e in s["paired"].items():
            rows.append([s["name"], comp, pts(e["acc_mean"]), ci(e["acc_ci95"]), e["verdict"],
                         "-" if e.get("tta_ratio_mean") is None else round(e["tta_ratio_mean"], 3),
                         ci(e.get("tta_ratio_ci95"), 1), e.get("tta_verdict", "-")])
    return headers, rows
