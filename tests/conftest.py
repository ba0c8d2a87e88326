"""Shared fixtures: small, seeded, CPU-only. Prefect and MLflow state go to temp folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

# Keep test runs off the user's state: Prefect's home and analytics are set before any import.
_STATE = Path(os.environ.setdefault("FEDHQ_STATE_DIR", str(ROOT / ".fedhq" / "test-state")))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    from fedhq_core.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture
def tiny_cfg(tmp_path):
    from fedhq_core.config import ExperimentConfig

    # val_fraction 0: the unit tests' accuracy bounds were measured with every training image in
    # the client pool; the validation split has tests of its own (test_data, test_study, test_mlops)
    return ExperimentConfig(strategy="all-qat", clients=6, rounds=2, fraction=0.5, local_epochs=1, batch_size=32,
                            profile_batch_sizes=[8, 16, 32], profile_reps=1, tracking=False,
                            state_dir=str(tmp_path / "state"), max_concurrency=2, val_fraction=0.0)
