"""The registered global model as an MLflow pyfunc: the deployed (quantized) FedHQ model.

Artifacts: ``weights.safetensors`` (FP32 master, learned weight steps, activation ranges),
``meta.json`` (architecture and bit-widths) and ``int_weights.safetensors`` (the deployable int
form: int8-stored weight integers, per-channel scales, activation ranges). Everything loads with
safetensors, never pickle.
"""
from __future__ import annotations

import json
import os
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_bundle(bundle: dict[str, Any], directory: str) -> dict[str, str]:
    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in bundle["state"].items()}
    tensors.update({f"steps.{k}": v.detach().cpu().contiguous() for k, v in (bundle.get("steps") or {}).items()})
    tensors.update({f"ranges.{k}": torch.tensor(v, dtype=torch.float32) for k, v in (bundle.get("ranges") or {}).items()})
    files = {"weights": os.path.join(directory, "weights.safetensors"), "meta": os.path.join(directory, "meta.json"),
             "int_weights": os.path.join(directory, "int_weights.safetensors")}
    save_file(tensors, files["weights"])
    save_file({k: v.contiguous() for k, v in bundle["int_weights"].items()}, files["int_weights"])
    with open(files["meta"], "w") as f:
        json.dump(bundle["meta"], f)
    return files


def read_bundle(weights: str, meta: str) -> dict[str, Any]:
    """The saved artifacts back as a bundle (``meta``, ``state``, ``steps``, ``ranges``)."""
    with open(meta) as f:
        m = json.load(f)
    t = load_file(weights)
    return {"meta": m, "state": {k[6:]: v for k, v in t.items() if k.startswith("state.")},
            "steps": {k[6:]: v for k, v in t.items() if k.startswith("steps.")},
            "ranges": {k[7:]: (float(v[0]), float(v[1])) for k, v in t.items() if k.startswith("ranges.")}}


def load_bundle(weights: str, meta: str) -> torch.nn.Module:
    """Rebuild the deployed model (deploy mode) from saved artifacts."""
    from fedhq_core.models.spec import deployed_model

    return deployed_model(read_bundle(weights, meta))


class GlobalModel(mlflow.pyfunc.PythonModel):
    """``predict`` takes images (N, C, H, W) or flattened rows (N, C*H*W), normalized like the
    training data, and returns the predicted class per row."""

    def load_context(self, context) -> None:
        self.model = load_bundle(context.artifacts["weights"], context.artifacts["meta"])
        with open(context.artifacts["meta"]) as f:
            self.in_shape = tuple(json.load(f)["in_shape"])

    def predict(self, context, model_input, params=None):  # noqa: D401 (untyped: any array-like)
        x = np.asarray(model_input, dtype=np.float32).reshape(-1, *self.in_shape)
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).argmax(1).numpy()
