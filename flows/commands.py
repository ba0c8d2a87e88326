"""The ``fedhq`` subcommands, one function each (``flows.cli`` wires them to the parser)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedhq_core.config import DATASETS, STRATEGIES, load_config, redact_uri
from fedhq_core.errors import CheckpointError, ConfigError
from fedhq_core.records import _json_default, write_json
from flows import api_settings, start_api_server
from flows.cli_options import CONFIG_FLAGS, config_from_args, export_credentials, format_table


def resume_run(args: argparse.Namespace) -> dict:
    """``fedhq run --resume``: continue a run from its checkpoint; returns its summary."""
    # a resumed run keeps the config it was started with: every other flag is refused, none ignored
    # (where it continues to reach outside the run is confirmed: --tracking-uri, --dask-address)
    given = [flag for flag, key, _, _ in CONFIG_FLAGS
             if key not in ("state_dir", "tracking_uri", "dask_address") and getattr(args, key) is not None]
    given += ["--config"] * bool(args.config) + ["--set"] * bool(args.set_)
    given += ["--no-tracking"] * (args.tracking is not None) + ["--download"] * (args.download is not None)
    if given:
        raise ConfigError(f"resume: a resumed run keeps its saved config; drop {given[0]}")
    from fedhq_core.checkpoint import find_run

    state_dir = args.state_dir or os.environ.get("FEDHQ_STATE_DIR", ".fedhq")
    find_run(state_dir, args.resume)  # a bad run id fails here, before Prefect and MLflow load
    start_api_server()
    from flows.train import resume_training

    export_credentials(args.tracking_uri)   # as config_from_args does
    return resume_training(state_dir, args.resume, progress=not args.no_progress, tracking_uri=args.tracking_uri,
                           dask_address=args.dask_address)


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        summary = resume_run(args)
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
    from fedhq_core.strategies import REGISTRY

    if REGISTRY[cfg.strategy].uses_significance:
        print(f"SigAcc: {summary['fit_source']} ({summary['fit_detail']}); charged {summary['fit_sim_s'] * 1e3:.2f} "
              f"simulated ms")
        print("PTQ/QAT clients per round: " + " ".join(f"{r['n_ptq']}/{r['n_qat']}" for r in summary["rounds"]))
    rej = summary["rejected"]
    if rej["total"] or rej["retried_rounds"]:
        from fedhq_core.records import format_reasons

        print(f"rejected client updates: {rej['total']} ({format_reasons(rej['by_reason'])}); "
              f"rounds retried: {rej['retried_rounds']}")
    if summary.get("mlflow_run_url"):
        local = str(summary["tracking_uri"]).startswith("sqlite:")
        print(f"MLflow run: {summary['mlflow_run_url']}"
              + (f"  (serve the UI with: mlflow ui --backend-store-uri {summary['tracking_uri']})" if local else ""))
    if summary.get("model_version"):
        print(f"registered model: {summary['registered_model']} version {summary['model_version']} "
              f"(mlflow.pyfunc.load_model(\"models:/{summary['registered_model']}/{summary['model_version']}\")); "
              f"as ONNX: fedhq export {summary['model_version']} --out model.onnx")
    if summary.get("tracking_pending"):
        print(f"MLflow: unsent calls wait in {summary['tracking_pending']}; send them with: fedhq upload "
              f"{Path(summary['tracking_pending']).parent}")
    if summary.get("run_dir"):
        state = summary["config"]["state_dir"]
        print(f"checkpoints: {summary['run_dir']}  (continue an interrupted run with: fedhq run --resume "
              f"{summary['run_id'] or Path(summary['run_dir']).name}"
              + (f" --state-dir {state}" if os.path.normpath(state) != ".fedhq" else "") + ")")
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_fit_significance(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from fedhq_core.allocation.pilot import parse_grid

    parse_grid(args.grid)                      # a bad grid fails here, in one line, before anything runs
    if args.settings < 1:
        raise ConfigError("settings: must be >= 1")
    start_api_server()
    from flows.significance import fit_significance_flow

    with api_settings():
        res = fit_significance_flow(cfg.public_dict(), args.grid, args.settings, args.out)
    from flows.significance import SIG_FIGURES

    print(format_table(["key", "value"], [[k, res[k]] for k in SIG_FIGURES if k in res and k != "grid"]))
    print(f"grid ranges (a run inside them reuses this family): {res['grid']}")
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
        print("SigAcc R2 per seed (in-sample / CV by client / by pilot round / leave-one-setting-out): " + ", ".join(
            f"{s}: {v['train_r2']:.2f} / {v['cv_r2']:.2f} / {v['cv_r2_rounds']:.2f} / {v['cv_r2_settings']:.2f}"
            for s, v in out["significance"].items()))
    dom = out.get("dominance")
    if dom:
        tta = "not reached" if dom["tta_vs_best"] is None else f"{dom['tta_vs_best']:.2f}x"
        unc = dom["uncharged"]
        unc_tta = "not reached" if unc["tta_vs_best"] is None else f"{unc['tta_vs_best']:.2f}x"
        print("TTA_sim_s and total_sim_s above are charged: what obtaining SigAcc cost a run (a family refit) is on its clock "
              f"(uncharged: TTA vs faster pure {unc_tta}, sim time vs all-ptq {unc['sim_vs_all_ptq']:.2f}x)")
        print(f"dominance, charged (means over seeds): tail acc vs better pure {100 * dom['acc_vs_best']:+.1f} points "
              f"(bar >= -1), TTA vs faster pure {tta} (bar <= 1.05x), sim time vs all-ptq "
              f"{dom['sim_vs_all_ptq']:.2f}x (bar <= 1.10x): "
              + ("met" if all(dom["met"].values()) else "MISSED " + ", ".join(k for k, v in dom["met"].items() if not v)))
    if args.json:
        write_json(args.json, out)
    return 0


def setting_config(args: argparse.Namespace) -> tuple[str, Any]:
    """``--protocol P --setting S`` (the protocol's first setting without ``--setting``), else the
    config flags: the name and config of the one setting a measuring command runs."""
    if args.protocol:
        return protocol_from_args(args, None, None, [args.setting] if args.setting else None).configs()[0]
    if args.setting:
        raise ConfigError("setting: --setting names a setting of --protocol; give the protocol too")
    return "config", config_from_args(args)


def cmd_norm_probe(args: argparse.Namespace) -> int:
    from flows.norm_probe import probe, report

    lrs = args.lrs or [0.05, 0.001]
    if min(lrs) <= 0 or args.probe_clients < 3:
        raise ConfigError("--lrs: learning rates must be > 0" if min(lrs) <= 0 else "--probe-clients: at least 3")
    _, cfg = setting_config(args)
    out = probe(cfg, lrs, args.probe_clients)
    print(report(out))
    if args.json:
        write_json(args.json, {"config": cfg.public_dict(), **out})
    return 0


def cmd_mixing(args: argparse.Namespace) -> int:
    from flows.mixing import DIFFERENCES, run_mixing

    name, cfg = setting_config(args)
    seeds = args.seeds or [cfg.seed]

    def show(row: dict) -> None:
        print(f"round {row['round']}: val acc ptq {100 * row['ptq']:.1f}, qat {100 * row['qat']:.1f}, mixed "
              f"{100 * row['mixed']:.1f} (mse steps {100 * row['mixed_mse_steps']:.1f}, learned steps "
              f"{100 * row['mixed_learned_steps']:.1f})", flush=True)

    out = run_mixing(cfg, seeds, args.warmup, args.measure, on_round=show)
    out["setting"] = name
    rows = [[k, ", ".join(f"{100 * v:+.2f}" for v in e["per_seed"]), f"{100 * e['mean']:+.2f}",
             "-" if e["ci95"] is None else f"[{100 * e['ci95'][0]:+.2f}, {100 * e['ci95'][1]:+.2f}]", e["verdict"],
             f"{100 * e['rounds_pooled_mean']:+.2f} +- {100 * (e['rounds_pooled_se'] or 0):.2f}", e["rounds_below_zero"]]
            for k, e in out["summary"].items() if k in DIFFERENCES]
    print(format_table(["difference (points, validation)", "per seed", "mean", "95% CI over seeds", "verdict",
                        "rounds pooled (mean +- SE)", "rounds < 0"], rows))
    p = out["priced_s"]
    print(f"priced server seconds per round: aggregate all-ptq {p['aggregate_pure_ptq']:.4f}, all-qat "
          f"{p['aggregate_pure_qat']:.4f}, mixed {p['aggregate_mixed']:.4f}; the blend's MSE search "
          f"{p['blend_mse_search']:.4f}")
    if args.json:
        write_json(args.json, out)
    return 0


def protocol_from_args(args: argparse.Namespace, strategies, seeds, only, name=None):
    """``--protocol`` with the command line's config flags (and ``--config``) over its base."""
    from fedhq_core.config import read_yaml
    from flows.cli_options import flag_values
    from flows.study import load_protocol

    flags = {k: v for k, v in flag_values(args).items() if v is not None}
    if args.config:
        flags = {**read_yaml(args.config), **flags}
    proto = load_protocol(args.protocol, flags, strategies, seeds, only, name)
    if getattr(args, "no_central", False):
        proto.central = False
    return proto


def replicated_settings(path: str, proto: Any) -> dict[str, Any]:
    """``--replicate-of``: the settings of the study a replicate study replicates, checked before a run starts."""
    if not all(c.replicate for _, c in proto.configs()):
        raise ConfigError("--replicate-of: run the replicate with --set replicate=N (N > 0)")
    try:
        main = {s["name"]: s for s in json.loads(Path(path).read_text())["settings"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--replicate-of: cannot read a study JSON from {path} ({type(err).__name__})") from None
    missing = [name for name, _ in proto.configs() if name not in main]
    if missing:
        raise ConfigError(f"--replicate-of: {path} has no setting {missing[0]!r}")
    return main


def cmd_study(args: argparse.Namespace) -> int:
    from fedhq_core.metrics import commit_line
    from flows.study import paired_table, replicate_noise, restore_runs, run_study, study_table

    proto = protocol_from_args(args, args.strategies, args.seeds, args.only, args.name)
    main_study = replicated_settings(args.replicate_of, proto) if args.replicate_of else None
    if args.restore_from:
        print(f"fedhq study: {restore_runs(args.restore_from, proto)} runs restored into the cache from "
              f"{', '.join(args.restore_from)}", file=sys.stderr)
    export_credentials(proto.configs()[0][1].tracking_uri)
    start_api_server()
    with api_settings():
        out = run_study(proto, progress=not args.no_progress)
    for s in out["settings"] if main_study else []:
        s["replicate_noise"] = rn = replicate_noise(main_study[s["name"]], s)
        print(f"{s['name']}: replicate of {args.replicate_of}: {rn['n']} runs, tails moved by up to "
              f"{100 * (rn['max_abs_diff'] or 0):.1f} points; run sd {100 * (rn['run_sd'] or 0):.1f}, paired sd "
              f"{100 * (rn['paired_sd'] or 0):.1f} points; seeds for a 95% half-width of 1 / 2.5 points from this "
              f"noise alone: {', '.join(str(v) for v in rn.get('seeds_for_halfwidth', {}).values()) or 'n/a'}")
    print(f"study {out['study']!r}: {out['runs_ran']} runs ran, {out['runs_cached']} reused from the cache; "
          f"wall {out['wall_s']:.0f} s; validation split {out['validation']['size']} images")
    print(format_table(*study_table(out)))
    print("\npaired differences (fedhq minus baseline, per seed; mean and 95% t-interval over seeds):")
    print(format_table(*paired_table(out)))
    for s in out["settings"]:
        crit = s["criteria"]
        print(f"{s['name']}: criteria " + ("met" if crit["met"] else "MISSED: " + "; ".join(crit["misses"])))
        line = commit_line(s["name"], s.get("decisions"))
        if line:
            print(line)
        if s.get("bar"):
            per = s["bar"]["per_seed"]
            print(f"{s['name']}: bar per seed (acc vs better pure, TTA vs faster pure, sim vs all-ptq): " + ", ".join(
                f"seed {k}: {100 * v['acc_vs_best']:+.1f} pts, "
                + ("not reached" if v["tta_vs_best"] is None else f"{v['tta_vs_best']:.2f}x")
                + f", {v['sim_vs_all_ptq']:.2f}x" for k, v in per.items())
                + ("; met in every seed" if s["bar"]["met_every_seed"] else "; MISSED"))
    print("plots: " + ", ".join(out["plots"].values()))
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
    from tasks.outbox import check_outbox
    from tasks.tracking import Tracker, TrackingSettings

    check_outbox(box)   # a hostile ops.jsonl is refused in one line before anything is sent
    try:
        target = json.loads((box / TARGET_FILE).read_text())
    except (OSError, ValueError):
        target = {}
    # the configured tracking server (--tracking-uri, MLFLOW_TRACKING_URI, mlflow.yaml), never the
    # one the folder names: a folder cannot choose where its files go
    tracker = Tracker(TrackingSettings.load(tracking_uri=args.tracking_uri))
    try:
        upload(box, tracker.client, tracker.register, lambda m: print(f"fedhq: {m} to {redact_uri(tracker.settings.tracking_uri)} "
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

    names = [args.name] if args.name else [settings.registered_model, f"{settings.registered_model}-onnx",
                                           settings.cost_model, settings.significance_model]
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
    keys = ["trial", "xi", "w_bits", "a_bits"] + (["local_epochs"] if args.tune_epochs else []) + ["val_acc_q", "sim_s", "test_acc_q"]
    print(f"Pareto front of study {out['study']!r} ({out['n_trials']} trials):")
    print(format_table(keys, [[round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys]
                              for r in out["pareto_front"]]))
    c = out["chosen"]
    print(f"chosen: trial {c['trial']} (xi={c['xi']:.3f}, w{c['w_bits']}a{c['a_bits']}), "
          f"validation acc_q {c['val_acc_q']:.4f}, sim {c['sim_s']:.2f} s (test acc_q, reported only: "
          f"{c['test_acc_q'] if c['test_acc_q'] is None else round(c['test_acc_q'], 4)})" +
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

    serve(cfg.public_dict(), nightly_cron=args.nightly_cron, tune_cron=args.tune_cron, refit_cron=args.refit_cron)
    return 0
