"""The command line's shared parts: one-line usage errors, the config flags every command
takes (each also a config key), and the table format of the console output."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from fedhq_core.config import DATASETS, MODELS, PARTITIONS, STRATEGIES, ExperimentConfig, load_config
from fedhq_core.errors import ConfigError

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
    ("--strategy", "strategy", str, f"strategy: {', '.join(STRATEGIES)} (default fedhq)"),
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


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command line sets (flags and ``--set``), unvalidated."""
    import yaml

    overrides: dict[str, Any] = {key: getattr(args, key) for _, key, _, _ in CONFIG_FLAGS}
    overrides["download"] = args.download
    overrides["tracking"] = args.tracking
    for item in args.set_:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    return overrides


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config, flag_values(args))
    export_credentials(cfg.tracking_uri)
    return cfg


def export_credentials(uri: str | None) -> None:
    """A tracking URI with credentials goes into this process's ``MLFLOW_TRACKING_URI``: what FedHQ
    writes anywhere (Prefect parameters, checkpoints, summaries) holds it redacted, and a redacted
    URI takes its credentials back from there (``tasks.tracking.with_credentials``)."""
    import os

    from fedhq_core.config import redact_uri

    if uri and redact_uri(uri) != uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
