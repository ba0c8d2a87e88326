"""FedHQ as a library (``fedhq_core.run_experiment``) and the runnable examples under examples/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_experiment_from_a_dict_needs_neither_prefect_nor_mlflow(tmp_path):
    """A fresh interpreter runs one experiment from a config dict; Prefect and MLflow never load."""
    code = f"""
import json, sys
from fedhq_core import run_experiment
rounds = []
summary = run_experiment({{"strategy": "fedhq", "clients": 6, "rounds": 2, "fraction": 0.5}},
                         on_round=rounds.append, profile_reps=1, state_dir={str(tmp_path)!r})
print(json.dumps({{"acc": summary["final_acc_q"], "sim": summary["total_sim_s"], "n": len(summary["rounds"]),
                  "loss": [r["loss_fp32"] for r in summary["rounds"]],
                  "seen": len(rounds), "tracking": summary["config"]["tracking"],
                  "loaded": sorted(m for m in ("prefect", "mlflow") if m in sys.modules)}}))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["n"] == res["seen"] == 2 and res["sim"] > 0
    # it learned: the FP32 test loss falls and the deployed model is well above chance (0.72 here)
    assert res["loss"][1] < 0.8 * res["loss"][0] and res["acc"] > 0.1 + 3 * (0.09 / 360) ** 0.5
    assert res["tracking"] is False and res["loaded"] == []


def test_run_experiment_rejects_a_bad_key_naming_it():
    from fedhq_core import ConfigError, run_experiment

    with pytest.raises(ConfigError, match="roundz: unknown key in config dict"):
        run_experiment({"roundz": 3})
    with pytest.raises(ConfigError, match="w_bits"):
        run_experiment({}, w_bits=1)


def test_library_example_exports_its_own_model(tmp_path):
    from examples.library_run import main

    res = main(str(tmp_path), rounds=2)
    assert res["summary"]["config"]["model"] == "examples.tiny_resnet:build"
    assert Path(res["export"]["path"]).is_file() and res["export"]["size_ratio"] < 0.6
    assert res["check"]["acc_ok"], res["check"]      # onnxruntime equals final_acc_q within 0.1 point
