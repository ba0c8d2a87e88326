"""The ``fedhq`` command line.

Bad input (an unknown key or dataset, a value out of range, a missing file or folder, a YAML
syntax error) prints one line ``fedhq: error: <field>: <what>`` and exits 2, with no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from fedhq_core.config import DATASETS, MODELS, PARTITIONS, STRATEGIES, ExperimentConfig, load_config
from fedhq_core.errors import CheckpointError, ConfigError, DataError, TooFewClients
from flows import api_settings, start_api_server

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        raise UsageError(message)


# flag -> (config key, type, help). Every flag is also settable in --config YAML by its key.
CONFIG_FLAGS: list[tuple[str, str, Callable | None, str]] = [
    ("--dataset", "dataset", str, f"dataset: {', '.join(DATASETS)} (default digits, embedded)"),
    ("--data-dir", "data_dir", str, "local folder with the dataset (needed for all but digits)"),
    ("--model", "model", str, f"model: {', '.join(MODELS)} (default cnn)"),
    ("--clients", "clients", int, "number of clients K (default 20)"),
    ("--rounds", "rounds", int, "communication rounds R (default 15)"),
    ("--fraction", "fraction", float, "fraction C of clients sampled per round, in (0, 1] (default 0.5)"),
    ("--local-epochs", "local_epochs", int, "local epochs E (default 2)"),
    ("--batch-size", "batch_size", int, "client batch size (default 16)"),
    ("--lr", "lr", float, "client SGD learning rate (default 0.05)"),
    ("--partition", "partition", str, f"partitioner: {', '.join(PARTITIONS)} (default dirichlet)"),
    ("--alpha", "alpha", float, "Dirichlet concentration alpha (default 0.5; smaller = more non-IID)"),
    ("--w-bits", "w_bits", int, "deployed weight bits, 2..8 (default 4)"),
    ("--a-bits", "a_bits", int, "deployed activation bits, 2..8 (default 8)"),
    ("--upload-bits", "upload_bits", int, "bits of the uploaded update: 2..8, 16 or 32 (default 8)"),
    ("--strategy", "strategy", str, f"strategy: {', '.join(STRATEGIES)} (default all-qat)"),
    ("--xi", "xi", float, "FedHQ trade-off xi in [0, 1]: 0 = accuracy, 1 = speed (default 0.2)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--max-train-samples", "max_train_samples", int, "subsample the train split to N images (0 = all)"),
    ("--max-test-samples", "max_test_samples", int, "subsample the test split to N images (0 = all)"),
    ("--device", "device", str, "auto, cpu or cuda (default auto)"),
    ("--max-concurrency", "max_concurrency", int, "clients trained at once (default: CPU cores)"),
    ("--dask-address", "dask_address", str, "train clients on this Dask scheduler, e.g. tcp://host:8786"),
    ("--dask-local", "dask_local", int, "train clients on a local Dask cluster of N worker processes"),
    ("--fault-rate", "fault_rate", float, "inject faults into this share of client tasks (see fault_kinds)"),
    ("--min-clients", "min_clients", int, "fewest accepted updates a round may aggregate (default 1)"),
    ("--client-timeout", "client_timeout_s", float, "drop a client update slower than this many seconds (0 = none)"),
    ("--tracking-uri", "tracking_uri", str, "MLflow tracking URI (default from mlflow.yaml: sqlite:///mlflow.db)"),
    ("--experiment", "experiment", str, "MLflow experiment name (default from mlflow.yaml)"),
    ("--state-dir", "state_dir", str, "folder for caches and Prefect's home (default .fedhq)"),
    ("--profile", "profile_file", str, "opt-in host-calibrated clock coefficients (fedhq devices --write-profile)"),
]


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flags override it)")
    for flag, key, typ, help_ in CONFIG_FLAGS:
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_)
    p.add_argument("--download", dest="download", action="store_const", const=True, default=None,
                   help="allow torchvision to download cifar10/cifar100/svhn into --data-dir")
    p.add_argument("--no-tracking", dest="tracking", action="store_const", const=False, default=None,
                   help="do not log to MLflow")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. --set jitter_sigma=0.3 (repeatable)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides: dict[str, Any] = {key: getattr(args, key) for _, key, _, _ in CONFIG_FLAGS}
    overrides["download"] = args.download
    overrides["tracking"] = args.tracking
    for item in args.set_:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        import yaml
        overrides[k.strip()] = yaml.safe_load(v)
    return load_config(args.config, overrides)


def write_json(path: str, data: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, p)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        given = [flag for flag, key, _, _ in CONFIG_FLAGS if key != "state_dir" and getattr(args, key) is not None]
        given += ["--config"] * bool(args.config) + ["--set"] * bool(args.set_)
        if given:
            raise ConfigError(f"resume: a resumed run keeps its saved config; drop {given[0]}")
        from fedhq_core.checkpoint import find_run

        state_dir = args.state_dir or os.environ.get("FEDHQ_STATE_DIR", ".fedhq")
        find_run(state_dir, args.resume)  # a bad run id fails here, before Prefect and MLflow load
        start_api_server()
        from flows.train import resume_training

        summary = resume_training(state_dir, args.resume, progress=not args.no_progress)
        cfg = load_config(None, summary["config"])
    else:
        cfg = config_from_args(args)
        start_api_server()  # boots on another core while this process imports and loads the data
        from fedhq_core.phases import span

        with span("import torch"):
            import torch  # noqa: F401
        with span("import prefect"):
            import prefect.flows  # noqa: F401
            import prefect.task_runners  # noqa: F401
        with span("import fedhq"):
            from flows.train import run_training

        summary = run_training(cfg, progress=not args.no_progress)
    rows = [[cfg.strategy, summary["config"]["dataset"], cfg.rounds, f"w{cfg.w_bits}a{cfg.a_bits}",
             summary["final_acc_q"], summary["final_acc_fp32"], round(summary["total_sim_s"], 2),
             round(summary["wall_s"], 1), f"{summary['upload_bytes'] / 1e6:.2f}", summary["run_id"] or "-"]]
    print(format_table(["strategy", "dataset", "rounds", "bits", "acc_q", "acc_fp32", "sim_s", "wall_s",
                        "upload_MB", "mlflow_run"], rows))
    rej = summary["rejected"]
    if rej["total"] or rej["retried_rounds"]:
        from fedhq_core.simulation import format_reasons

        print(f"rejected client updates: {rej['total']} ({format_reasons(rej['by_reason'])}); "
              f"rounds retried: {rej['retried_rounds']}")
    if summary.get("mlflow_run_url"):
        local = str(summary["tracking_uri"]).startswith("sqlite:")
        print(f"MLflow run: {summary['mlflow_run_url']}"
              + (f"  (serve the UI with: mlflow ui --backend-store-uri {summary['tracking_uri']})" if local else ""))
    if summary.get("model_version"):
        print(f"registered model: {summary['registered_model']} version {summary['model_version']} "
              f"(mlflow.pyfunc.load_model(\"models:/{summary['registered_model']}/{summary['model_version']}\"))")
    if summary.get("tracking_pending"):
        print(f"MLflow: unsent calls wait in {summary['tracking_pending']}; send them with: fedhq upload "
              f"{Path(summary['tracking_pending']).parent}")
    if summary.get("run_dir"):
        print(f"checkpoints: {summary['run_dir']}  (continue an interrupted run with: fedhq run --resume "
              f"{summary['run_id'] or Path(summary['run_dir']).name})")
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_fit_significance(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    start_api_server()
    from flows.train import fit_significance_flow

    with api_settings():
        res = fit_significance_flow(cfg.to_dict())
    # the fit's figures; the setting it was fitted for is in the registry version's tags
    from flows.train import SIG_FIGURES

    print(format_table(["key", "value"], [[k, res[k]] for k in SIG_FIGURES if k in res]))
    return 0


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from flows.bench import ALL_STRATEGIES, bench_table, breakdown_table, run_bench

    strategies = args.strategies or list(ALL_STRATEGIES)
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"strategies: unknown strategy {s!r} (choose from {', '.join(STRATEGIES)})")
    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"target: must be in (0, 1], got {args.target}")
    seeds = args.seeds or [cfg.seed]
    start_api_server()
    with api_settings():
        out = run_bench(cfg, strategies, seeds, args.target, progress=not args.no_progress)
    headers, rows = bench_table(out)
    print(f"target accuracy for TTA: {out['target']:.4f}   seeds: {seeds}")
    print(format_table(headers, rows))
    print("\nsimulated time by step kind (critical client of each round):")
    print(format_table(*breakdown_table(out)))
    shares = {n: e.get("ptq_extras_share") for n, e in out["strategies"].items() if e.get("ptq_extras_share") is not None}
    if shares:
        print("PTQ's on-device extras (calibration, and the sensitivity check where the allocator reads it) as a share "
              "of a PTQ client's simulated time: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in shares.items()))
    for k in ("speedup_tta_vs", "acc_gain_vs_all_ptq", "gap_recovered_vs_all_ptq", "sim_time_vs_all_ptq"):
        if k in out:
            print(f"{k}: {json.dumps(out[k], default=_json_default)}")
    if out.get("significance"):
        print("SigAcc R2 per seed (in-sample / cross-validated by client / by pilot round): " + ", ".join(
            f"{s}: {v['train_r2']:.2f} / {v['cv_r2']:.2f} / {v['cv_r2_rounds']:.2f}" for s, v in out["significance"].items()))
    dom = out.get("dominance")
    if dom:
        tta = "not reached" if dom["tta_vs_best"] is None else f"{dom['tta_vs_best']:.2f}x"
        unc = dom["uncharged"]
        unc_tta = "not reached" if unc["tta_vs_best"] is None else f"{unc['tta_vs_best']:.2f}x"
        print("TTA_sim_s and total_sim_s above are charged: a SigAcc pilot made for a run is on its clock "
              f"(uncharged: TTA vs faster pure {unc_tta}, sim time vs all-ptq {unc['sim_vs_all_ptq']:.2f}x)")
        print(f"dominance, charged (means over seeds): tail acc vs better pure {100 * dom['acc_vs_best']:+.1f} points "
              f"(bar >= -1), TTA vs faster pure {tta} (bar <= 1.05x), sim time vs all-ptq "
              f"{dom['sim_vs_all_ptq']:.2f}x (bar <= 1.10x): "
              + ("met" if all(dom["met"].values()) else "MISSED " + ", ".join(k for k, v in dom["met"].items() if not v)))
    if args.json:
        write_json(args.json, out)
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from flows.overhead import breakdown_table, measure

    r = measure({k: v for k, v in cfg.to_dict().items() if k not in ("tracking_uri",)}, reps=args.reps,
                phases=args.breakdown)
    rows = [["whole run (process start to exit)", round(r["flow_wall_s"], 2), round(r["bare_wall_s"], 2),
             round(r["ratio_total"], 3)],
            ["steady-state round (median)", round(r["steady_round_flow_s"], 4), round(r["steady_round_bare_s"], 4),
             round(r["ratio_steady_round"], 3)],
            ["peak RSS, children included (MiB)", round(r["flow_peak_rss_mib"]), round(r["bare_peak_rss_mib"]), "-"]]
    print(f"fp32 FedAvg, {cfg.dataset}, {r['rounds']} rounds, {cfg.clients} clients, fraction {cfg.fraction}: "
          f"Prefect flow + MLflow tracking vs a bare PyTorch loop, both training {r['bare_concurrency']} clients at once")
    print(format_table(["measure", "fedhq_flow", "bare_loop", "ratio"], rows))
    if args.breakdown:
        print("\nwhere the time goes (wall seconds; round phases summed over rounds and per round):")
        print(format_table(*breakdown_table(r["phases"]["flow"], r["phases"]["bare"])))
    if args.json:
        write_json(args.json, r)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    """Send the tracking calls a run left in its folder while its MLflow server was away."""
    from fedhq_core.checkpoint import runs_root
    from tasks.outbox import TARGET_FILE, upload

    run = Path(args.run)
    if not run.is_dir():
        run = runs_root(args.state_dir or os.environ.get("FEDHQ_STATE_DIR", ".fedhq")) / args.run
    box = run / "mlflow-outbox"
    if not (box / "ops.jsonl").is_file():
        raise CheckpointError(f"{run}: no unsent tracking calls (no mlflow-outbox/ops.jsonl)")
    target = json.loads((box / TARGET_FILE).read_text())
    from tasks.tracking import Tracker, TrackingSettings

    tracker = Tracker(TrackingSettings.load(tracking_uri=args.tracking_uri or target["tracking_uri"]))
    try:
        upload(box, tracker.client, tracker.register, lambda m: print(f"fedhq: {m} to {tracker.settings.tracking_uri} "
                                                                        f"(run {target.get('run_id')})"))
    except Exception as err:  # noqa: BLE001 - one line; what was not sent stays for the next try
        print(f"fedhq: error: upload: {type(err).__name__}: {str(err)[:300]} (the unsent calls stay in {box})",
              file=sys.stderr)
        return 1
    return 0


def _points(text: str) -> list[tuple[int, float]]:
    out = []
    for item in text.split(","):
        clients, _, fraction = item.strip().partition(":")
        try:
            out.append((int(clients), float(fraction or 0.5)))
        except ValueError:
            raise ConfigError(f"points: expected CLIENTS[:FRACTION],..., got {item!r}") from None
    return out


def cmd_bench_scale(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from flows.scale import measure

    points = _points(args.points)
    runners = [r.strip() for r in args.runners.split(",")]
    bad = [r for r in runners if r != "threads" and not (r.startswith("dask-local-") and r[11:].isdigit())]
    if bad or not points or args.pairs < 1 or args.round < 1 or args.round > cfg.rounds:
        raise ConfigError(f"runners: unknown runner {bad[0]!r} (threads or dask-local-N)" if bad else
                          "pairs: must be >= 1" if args.pairs < 1 else f"round: must be in 1..rounds ({cfg.rounds})")
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("clients", "fraction", "tracking_uri")}
    r = measure(base, points, runners, args.pairs, args.round - 1, log=lambda m: print(m, file=sys.stderr))
    rows = [[s["runner"], s["clients"], s["sampled"], round(s["ms_per_sample"], 3),
             " / ".join(f"{x:.2f}" for x in s["ratio_pairs"]) + f" (median {s['ratio']:.2f})",
             round(s["peak_rss_mib"]), f"{100 * s['alloc_share']:.2f}%",
             "-" if s["bytes_to_workers"] is None else f"{s['bytes_to_workers'] / 2**20:.1f} MiB"] for s in r["summary"]]
    print(f"{cfg.strategy}, {cfg.dataset}, {cfg.partition}, round {args.round} of {cfg.rounds}, "
          f"{args.pairs} interleaved repetition(s)")
    print(format_table(["runner", "clients", "sampled", "ms/trained sample", f"vs {points[0][0]} clients",
                        "peak RSS MiB (all processes)", "allocation share", "sent to workers/round"], rows))
    if args.json:
        write_json(args.json, r)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    overrides = {"model": args.model} if args.model else {}
    cfg = load_config(None, overrides)
    if args.input not in DATASETS:
        raise ConfigError(f"input: unknown input {args.input!r} (choose from {', '.join(DATASETS)})")
    if args.batch_size < 1 or args.reps < 1:
        raise ConfigError("batch_size: must be >= 1" if args.batch_size < 1 else "reps: must be >= 1")
    if args.write_profile and not args.validate:
        raise ConfigError("write_profile: needs --validate (the profile holds this host's fitted coefficients)")
    from flows.devices import devices_report, print_report, profile_overrides, validation_passed  # imports torch

    try:
        r = devices_report(cfg, args.input, args.batch_size, args.validate, args.reps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print_report(r, format_table)
    if args.json:
        write_json(args.json, r)
    if args.write_profile:
        write_json(args.write_profile, profile_overrides(r))
        print(f"host-calibrated profile written to {args.write_profile} (use: fedhq run --profile {args.write_profile})")
    return 0 if validation_passed(r) else 1


def _registry_client(args: argparse.Namespace):
    from tasks.tracking import TrackingSettings

    settings = TrackingSettings.load(tracking_uri=args.tracking_uri)
    from mlflow import MlflowClient

    return settings, MlflowClient(tracking_uri=settings.tracking_uri)


def cmd_models(args: argparse.Namespace) -> int:
    settings, client = _registry_client(args)
    from tasks.registry import COLUMNS, list_versions

    names = [args.name] if args.name else [settings.registered_model, settings.cost_model, settings.significance_model]
    rows = list_versions(client, names)
    if not rows:
        print("no registered versions yet (run `fedhq run` first)")
        return 0
    headers = ["model", "version", "aliases", *COLUMNS, "run_id"]
    print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    settings, client = _registry_client(args)
    from tasks.registry import promote

    moved, text = promote(client, args.name or settings.registered_model, args.version)
    print(text)
    return 0 if moved else 1


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.trials < 1:
        raise ConfigError("trials: must be >= 1")
    start_api_server()
    from flows.tune import run_tune

    with api_settings():
        out = run_tune(cfg, args.study, args.trials, args.timeout, args.n_jobs, args.storage, args.tune_epochs)
    keys = ["trial", "xi", "w_bits", "a_bits"] + (["local_epochs"] if args.tune_epochs else []) + ["acc_q", "sim_s"]
    print(f"Pareto front of study {out['study']!r} ({out['n_trials']} trials):")
    print(format_table(keys, [[round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys]
                              for r in out["pareto_front"]]))
    c = out["chosen"]
    print(f"chosen: trial {c['trial']} (xi={c['xi']:.3f}, w{c['w_bits']}a{c['a_bits']}), "
          f"acc_q {c['acc_q']:.4f}, sim {c['sim_s']:.2f} s" +
          (f"; registered as version {out['model_version']}" if out.get("model_version") else ""))
    if args.json:
        write_json(args.json, out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("PREFECT_API_URL: schedules need a Prefect server (e.g. `prefect server start`, then "
                          "export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    from flows.deployments import serve

    serve(cfg.to_dict(), nightly_cron=args.nightly_cron, tune_cron=args.tune_cron, refit_cron=args.refit_cron)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedhq", description="FedHQ: hybrid PTQ/QAT federated learning, orchestrated by Prefect "
                                          "and tracked in MLflow.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)
    r = sub.add_parser("run", help="one training run (the embedded digits default without flags)")
    add_config_flags(r)
    r.add_argument("--json", metavar="FILE", help="write the run's result as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", metavar="RUN_ID", help="continue run RUN_ID (or 'latest') from its last completed "
                                                      "round, into the same MLflow run")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fit-significance", help="offline SigAcc fitting by pilot rounds; registers "
                                                 "fedhq-significance (alias current)")
    add_config_flags(f)
    f.set_defaults(func=cmd_fit_significance)
    b = sub.add_parser("bench", help="every strategy side by side on the same clients, shards, devices and seeds")
    add_config_flags(b)
    b.add_argument("--strategies", type=_csv(str), help="comma-separated (default: all seven)")
    b.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default: the config's seed)")
    b.add_argument("--target", type=float, help="TTA target accuracy 0..1 (default 95%% of all-qat's final)")
    b.add_argument("--json", metavar="FILE", help="write the results (schema in README)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)
    o = sub.add_parser("bench-overhead", help="wall time and memory of the flow + tracking vs a bare PyTorch loop")
    add_config_flags(o)
    o.add_argument("--reps", type=int, default=1, help="repeat both runs and take medians (default 1)")
    o.add_argument("--breakdown", action="store_true", help="also time each phase of both runs and print a table")
    o.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    o.set_defaults(func=cmd_bench_overhead)
    up = sub.add_parser("upload", help="send the tracking calls (metrics, summary, model) a run left in its folder "
                                       "while its MLflow server was away")
    up.add_argument("run", help="the run folder (<state_dir>/runs/<run id>) or its run id")
    up.add_argument("--state-dir", dest="state_dir", help="state folder of a run given by id (default .fedhq)")
    up.add_argument("--tracking-uri", dest="tracking_uri", help="send to this server instead of the run's own")
    up.set_defaults(func=cmd_upload)
    sc = sub.add_parser("bench-scale", help="ms per trained sample, peak RSS and allocation share as the fleet "
                                            "grows (fresh fedhq run processes, interleaved)")
    add_config_flags(sc)
    sc.add_argument("--points", default="20:0.5,1000:0.5", help="CLIENTS:FRACTION,... (default 20:0.5,1000:0.5)")
    sc.add_argument("--runners", default="threads", help="threads and/or dask-local-N, comma-separated")
    sc.add_argument("--pairs", type=int, default=2, help="interleaved repetitions of all points (default 2)")
    sc.add_argument("--round", type=int, default=2, help="the round timed, 1-based (default 2)")
    sc.add_argument("--json", metavar="FILE", help="write every run's figures as JSON")
    sc.set_defaults(func=cmd_bench_scale)
    t = sub.add_parser("tune", help="Optuna study of xi and bit-widths: max accuracy, min simulated time")
    add_config_flags(t)
    t.add_argument("--study", default="fedhq-tune", help="study name; an existing study is resumed (default fedhq-tune)")
    t.add_argument("--trials", type=int, default=8, help="trials to run now (default 8)")
    t.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    t.add_argument("--n-jobs", type=int, default=1, help="trials in parallel (threads; default 1)")
    t.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///<state_dir>/optuna.db)")
    t.add_argument("--tune-epochs", action="store_true", help="also tune local epochs (1..4)")
    t.add_argument("--json", metavar="FILE", help="write the Pareto front as JSON")
    t.set_defaults(func=cmd_tune)
    sv = sub.add_parser("serve", help="serve the nightly-train, weekly-tune and refit-models deployments")
    add_config_flags(sv)
    sv.add_argument("--nightly-cron", default="0 2 * * *", help="cron of nightly-train (default 0 2 * * *)")
    sv.add_argument("--tune-cron", default="0 3 * * 0", help="cron of weekly-tune (default 0 3 * * 0)")
    sv.add_argument("--refit-cron", default="0 4 * * 1", help="cron of refit-models (default 0 4 * * 1)")
    sv.set_defaults(func=cmd_serve)
    dv = sub.add_parser("devices", help="predicted step times of every catalog device; --validate checks the "
                                        "per-op model on this host (exit 1 if QAT/FP32 misses by > 20%%)")
    dv.add_argument("--model", choices=MODELS, help="cnn (default) or resnet18")
    dv.add_argument("--input", default="cifar10", help="input shape of this dataset: digits, cifar10, cifar100, svhn "
                                                       "(default cifar10)")
    dv.add_argument("--batch-size", type=int, default=32, help="batch size of the table; the held-out batch size "
                                                              "with --validate (default 32)")
    dv.add_argument("--validate", action="store_true", help="time every step kind on this host and compare")
    dv.add_argument("--reps", type=int, default=7, help="interleaved timing reps with --validate (default 7)")
    dv.add_argument("--json", metavar="FILE", help="write the tables as JSON")
    dv.add_argument("--write-profile", metavar="FILE", help="with --validate: write the host's fitted "
                                                            "coefficients for fedhq run --profile FILE")
    dv.set_defaults(func=cmd_devices)
    m = sub.add_parser("models", help="registered model versions with their tags and aliases")
    m.add_argument("--name", help="one registered model (default: global, cost and significance models)")
    m.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI (default from mlflow.yaml)")
    m.set_defaults(func=cmd_models)
    pr = sub.add_parser("promote", help="move alias 'champion' to a version that beats the champion's quantized "
                                        "accuracy on the same dataset and bits (exit 1 if not moved)")
    pr.add_argument("--name", help="registered model (default fedhq-global-model)")
    pr.add_argument("--version", type=int, help="candidate version (default: newest)")
    pr.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI (default from mlflow.yaml)")
    pr.set_defaults(func=cmd_promote)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``fedhq`` command. Run as a program (``argv`` None), it leaves with :func:`quick_exit`."""
    code = _main(argv)
    if argv is None:
        quick_exit(code)
    return code


def quick_exit(code: int) -> None:
    """Finish like the interpreter does (join worker threads, run every exit handler: Prefect's
    event flush, MLflow's logging queue, the API server's stop), then leave without tearing down
    every module one by one, which takes seconds with torch, Prefect and MLflow loaded and
    writes nothing."""
    import atexit
    import threading

    sys.stdout.flush()
    sys.stderr.flush()
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from fedhq_core import phases

    phases.since_launch("interpreter and CLI")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, DataError, CheckpointError) as err:
        print(f"fedhq: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TooFewClients as err:
        print(f"fedhq: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedhq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
