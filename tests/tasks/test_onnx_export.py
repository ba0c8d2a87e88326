"""The ONNX export of a deployed model: integer weight codes, sub-8-bit ranges carried exactly,
metadata, and onnxruntime computing what the torch deploy forward computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedhq_core.errors import ConfigError
from fedhq_core.quant import configure_observers, init_weight_steps, prepare_model, set_mode
from fedhq_core.quant.export import deploy_graph


def _deployed(model: nn.Module, x: torch.Tensor, w_bits: int, a_bits: int, edge: int = 0) -> nn.Module:
    prepare_model(model, w_bits, a_bits, edge)
    configure_observers(model, 0.9, 99.99)
    model.eval()
    set_mode(model, "observe")
    with torch.no_grad():
        model(x)
    init_weight_steps(model)
    set_mode(model, "deploy")
    return model


def test_tiny_resnet_at_3_bits_runs_in_onnxruntime_as_in_torch(tmp_path):
    import onnx

    from examples.tiny_resnet import build
    from tasks.onnx_export import onnx_logits, to_onnx

    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    model = _deployed(build((1, 8, 8), 10), x, 3, 3)
    graph = deploy_graph(model, (1, 8, 8))
    # every quantizable layer's weights are int8-stored codes in the 3-bit range, per-channel scales
    codes = {k: v for k, v in graph.initializers.items() if "weight_int" in k}
    assert len(codes) == graph.n_quantized == 4
    assert all(v.dtype == np.int8 and v.min() >= -4 and v.max() <= 3 for v in codes.values())
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in graph.initializers.values())
    ops = [n.op for n in graph.nodes]
    assert ops.count("DequantizeLinear") == 8 and ops.count("QuantizeLinear") == 4
    assert ops.count("Clip") == 4                      # activation codes clipped to 0..7 in uint8
    path = tmp_path / "m.onnx"
    onnx.save_model(to_onnx(graph, {"w_bits": 3}), str(path))
    with torch.no_grad():
        ref = model(x).numpy()
    out = onnx_logits(path, x.numpy())
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.995
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_a_run_exports_with_metadata_and_its_accuracy(tiny_cfg, tmp_path):
    import onnx

    from fedhq_core import run
    from tasks.onnx_export import export_bundle, verify

    sim = run(tiny_cfg.replace(w_bits=4, a_bits=6))
    summary = sim.summary()
    rep = export_bundle(sim.deployed_bundle(), tmp_path / "run.onnx", "run-123")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "run.onnx")).metadata_props}
    assert {"mean", "std", "input_shape", "classes", "w_bits", "a_bits", "mlflow_run_id"} <= set(props)
    assert props["mlflow_run_id"] == "run-123" and props["w_bits"] == "4" and props["input_shape"] == "[1, 8, 8]"
    assert len(json.loads(props["mean"])) == 1 and len(json.loads(props["classes"])) == 10
    assert rep.size_ratio < 0.4                        # int8 containers against float32 weights
    check = verify(rep.path, sim.server.test.x.numpy(), sim.server.test.y.numpy(), summary["final_acc_q"], None)
    assert check["acc_ok"], check


class _Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sort(self.fc(x), dim=1).values


def test_unmapped_operations_and_empty_models_are_one_line_errors():
    m = prepare_model(_Sorts(), 8, 8)
    set_mode(m, "deploy")
    with pytest.raises(ConfigError, match="sort") as err:
        deploy_graph(m, (4,))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no quantizable"):
        deploy_graph(prepare_model(nn.Sequential(nn.ReLU()), 8, 8), (4,))
