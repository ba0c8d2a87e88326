"""The ``fedhq`` command line.

Bad input (an unknown key or dataset, a value out of range, a missing file or folder, a YAML
syntax error) prints one line ``fedhq: error: <field>: <what>`` and exits 2, with no traceback.
The subcommands live in ``flows.commands``, the flags they share in ``flows.cli_options``.
"""
from __future__ import annotations

import argparse
import os
import sys

from fedhq_core.config import MODELS
from fedhq_core.errors import CheckpointError, ConfigError, DataError, TooFewClients
from flows.cli_options import EXIT_USAGE, UsageError, _Parser, add_config_flags
from flows.commands import (_csv, cmd_bench, cmd_bench_overhead, cmd_bench_scale, cmd_devices, cmd_fit_significance,
                            cmd_mixing, cmd_models, cmd_norm_probe, cmd_promote, cmd_run, cmd_serve, cmd_study, cmd_tune, cmd_upload)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedhq", description="FedHQ: hybrid PTQ/QAT federated learning, orchestrated by Prefect "
                                          "and tracked in MLflow.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)
    _add_run_commands(sub)
    _add_benchmarks(sub)
    _add_mlops_commands(sub)
    return p


def _add_run_commands(sub) -> None:
    """run, fit-significance and bench."""
    r = sub.add_parser("run", help="one training run (the embedded digits default without flags)")
    add_config_flags(r)
    r.add_argument("--json", metavar="FILE", help="write the run's result as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", metavar="RUN_ID", help="continue run RUN_ID (or 'latest') from its last completed "
                                                      "round, into the same MLflow run")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fit-significance", help="offline SigAcc fitting of a family (dataset + model) by paired "
                                                 "pilots over a grid of settings; registers fedhq-significance")
    add_config_flags(f)
    f.add_argument("--grid", default="", help="FIELD=V1,V2;... the settings' values around the config (fields: "
                                              "seed, partition, alpha, classes_per_client, clients, fraction, w_bits, "
                                              "a_bits, first_last_bits, lr, local_epochs, batch_size)")
    f.add_argument("--settings", type=int, default=12, help="settings drawn from the grid's product (seeded)")
    f.add_argument("--out", help="also write the family's fit data as JSON here (what the project ships)")
    f.set_defaults(func=cmd_fit_significance)
    b = sub.add_parser("bench", help="every strategy side by side on the same clients, shards, devices and seeds")
    add_config_flags(b)
    b.add_argument("--strategies", type=_csv(str), help="comma-separated (default: all seven)")
    b.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default: the config's seed)")
    b.add_argument("--target", type=float, help="TTA target accuracy 0..1 (default 95%% of all-qat's final)")
    b.add_argument("--json", metavar="FILE", help="write the results (schema in README)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)
    st = sub.add_parser("study", help="a protocol of settings x strategies x seeds: paired runs, cached (a rerun or a "
                                      "restart after a kill reuses every finished run), 95%% intervals, validation "
                                      "split; JSON, table and plots")
    add_config_flags(st)
    st.add_argument("--protocol", metavar="FILE.yaml", help="the study: name, base (config keys), settings (each a "
                                                            "name and the keys it changes), strategies, seeds, "
                                                            "criteria, central (see configs/study-cifar10.yaml)")
    st.add_argument("--settings", dest="only", type=_csv(str), help="run only these settings of the protocol")
    st.add_argument("--strategies", type=_csv(str), help="comma-separated (default: the protocol's, else "
                                                         "fedhq,all-ptq,all-qat)")
    st.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default: the protocol's, else the config's)")
    st.add_argument("--name", help="the study's name: its cache folder and MLflow run (default: the protocol's)")
    st.add_argument("--json", metavar="FILE", help="write the results (schema in README)")
    st.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    st.add_argument("--no-central", action="store_true", help="skip the protocol's central reference (e.g. for "
                                                              "--set replicate=1: the seeds' SGD-noise replicates)")
    st.add_argument("--replicate-of", metavar="STUDY.json", help="this study replicates that one (run it with --set "
                                                                  "replicate=1): per setting, how far each run's tail "
                                                                  "moved (replicate_noise in the JSON)")
    st.add_argument("--restore-from", metavar="STUDY.json", action="append", default=[],
                    help="put this study JSON's runs into the cache first (repeatable), so that a fresh checkout "
                         "resumes from committed results; a run of another build or config is run again")
    st.set_defaults(func=cmd_study)
    mx = _setting_parser(sub, "mixing", "what a hybrid round costs, in isolation: every client trains both ways from "
                                        "the same master; all-PTQ, all-QAT and a half-and-half mix, each deployed as a "
                                        "run deploys it (and the mix with either set of steps alone), on validation")
    mx.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (default: the config's seed)")
    mx.add_argument("--warmup", type=int, help="PTQ rounds before measuring (default: fedhq's warm-up)")
    mx.add_argument("--measure", type=int, help="rounds measured (default: fedhq's exploring rounds)")
    mx.add_argument("--json", metavar="FILE", help="write every round's figures and the summary")
    mx.set_defaults(func=cmd_mixing)
    npb = _setting_parser(sub, "norm-probe", "how an honest update's norm grows with its client's local steps, and "
                                              "what the norm bound sees: one round from the initial master, clients "
                                              "across the shard sizes, PTQ and QAT, per learning rate")
    npb.add_argument("--lrs", type=_csv(float), help="comma-separated constant learning rates (default 0.05,0.001)")
    npb.add_argument("--probe-clients", type=int, default=10, help="clients probed, spread over the shard sizes")
    npb.add_argument("--json", metavar="FILE", help="write every probe's norms and spreads")
    npb.set_defaults(func=cmd_norm_probe)


def _setting_parser(sub, name: str, help_text: str):
    """A measuring command of one setting: the config flags, or ``--protocol`` and its ``--setting``
    (read by ``commands.setting_config``)."""
    p = sub.add_parser(name, help=help_text)
    add_config_flags(p)
    p.add_argument("--protocol", metavar="FILE.yaml", help="take the config from this study protocol's --setting")
    p.add_argument("--setting", help="the protocol's setting to measure (default: its first)")
    return p


def _add_benchmarks(sub) -> None:
    """bench-overhead, upload and bench-scale."""
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


def _add_mlops_commands(sub) -> None:
    """tune, serve, devices, models and promote."""
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
    ex = sub.add_parser("export", help="a registered run's deployed quantized model as ONNX (QDQ), checked in "
                                       "onnxruntime and registered with the onnx flavour (exit 1 if the check misses)")
    ex.add_argument("source", help="run id, model version (N, models:/NAME/N, models:/NAME@ALIAS) or runs:/RUN/model")
    ex.add_argument("--format", default="onnx", help="onnx (the only format)")
    ex.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    ex.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the onnxruntime check on the run's test split")
    ex.add_argument("--no-register", dest="register", action="store_false",
                    help="write the file only; register nothing in MLflow")
    ex.add_argument("--json", metavar="FILE", help="write the export report and check as JSON")
    ex.add_argument("--weights", default="auto", help="auto: codes of layers at <= 4 bits stored as int4 (opset 21) "
                    "where onnxruntime runs them on integer kernels, else int8; int8: always int8 containers "
                    "(opset 17, for older runtimes)")
    ex.add_argument("--threads", type=int, default=None,
                    help="onnxruntime intra-op threads for the latency figures (default: every core)")
    ex.add_argument("--no-latency", dest="latency", action="store_false",
                    help="skip the latency and throughput figures (about 4 s)")
    ex.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI (default from mlflow.yaml)")
    ex.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from flows.export import cmd_export   # onnx and onnxruntime load only for this command

    return cmd_export(args)


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
        if getattr(args, "state_dir", None):   # --state-dir moves Prefect's home too (before Prefect loads)
            from flows import configure_prefect_env

            configure_prefect_env(args.state_dir)
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
