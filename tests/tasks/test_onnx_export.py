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
    codes = {k: v for k, v in graph.initializers.items() if k.endswith(".w_int")}
    assert len(codes) == graph.n_quantized == 4
    assert all(v.dtype == np.int8 and v.min() >= -4 and v.max() <= 3 for v in codes.values())
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in graph.initializers.values())
    ops = [n.op for n in graph.nodes]
    biases = [v for k, v in graph.initializers.items() if k.endswith(".b_int")]   # int32 at the accumulator's scale
    assert biases and all(v.dtype == np.int32 for v in biases)
    assert ops.count("DequantizeLinear") == 8 + len(biases) and ops.count("QuantizeLinear") == 4
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
    rep = export_bundle(sim.deployed_bundle(), tmp_path / "run.onnx", "run-123", measure_latency=False)
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


def _cnn(shape: tuple[int, int, int], a_bits: int, seed: int = 0):
    from fedhq_core.models import SmallCNN

    torch.manual_seed(seed)
    x = torch.randn(256, *shape)
    return _deployed(SmallCNN(shape[0], 10, shape[1]), x, 4, a_bits, edge=8), x


@pytest.mark.parametrize("a_bits", [8, 3])
def test_every_quantized_layer_runs_on_an_integer_kernel_and_as_in_torch(tmp_path, a_bits):
    import onnx

    from tasks.onnx_export import kernel_counts, onnx_logits, optimized_ops, to_onnx

    model, x = _cnn((1, 8, 8), a_bits)
    graph = deploy_graph(model, (1, 8, 8), int4=True)
    path = tmp_path / "m.onnx"
    onnx.save_model(to_onnx(graph, {}), str(path))
    ops = optimized_ops(path)
    # conv1, conv2, fc1 fused with their output quantization, fc2 with a float output: 4 of 4
    assert kernel_counts(ops) == (4, 0), ops
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2
    assert graph.n_moved == 3                        # through ReLU, MaxPool and Flatten
    with torch.no_grad():
        ref = model(x).numpy()
    out = onnx_logits(path, x.numpy())
    # the 8-bit edge layers are uint8 codes + 128: the u8s8 AVX2 kernels' int16 pair sums saturate
    # on int8 codes near +-127 (agreement 0.88, error 0.19 of the logits' scale on this case
    # before); the deploy forward adds the bias on the accumulator's grid, as the kernels do (a
    # float bias gave 0.077 at 3 bits). What is left: float order flipping a code at a fine step.
    assert np.mean(out.argmax(1) == ref.argmax(1)) == 1.0
    assert np.abs(out - ref).max() < (1e-4 if a_bits == 3 else 0.01) * np.abs(ref).max()


def test_int4_weights_round_trip_and_halve_the_file(tmp_path):
    import onnx
    from onnx import numpy_helper

    from tasks.onnx_export import to_onnx

    model, _ = _cnn((3, 32, 32), 8)
    g4, g8 = deploy_graph(model, (3, 32, 32), int4=True), deploy_graph(model, (3, 32, 32))
    assert g4.opset == 21 and g8.opset == 17 and len(g4.int4) == 2      # conv2 and fc1 at 4 bits
    p4, p8 = tmp_path / "w4.onnx", tmp_path / "w8.onnx"
    onnx.save_model(to_onnx(g4, {}), str(p4))
    onnx.save_model(to_onnx(g8, {}), str(p8))
    back = {i.name: i for i in onnx.load(str(p4)).graph.initializer}
    for name in g4.int4:
        assert back[name].data_type == onnx.TensorProto.INT4
        np.testing.assert_array_equal(numpy_helper.to_array(back[name]).astype(np.int8), g4.initializers[name])
    assert back[name].dims == list(g4.initializers[name].shape)
    edge = [i for i in back.values() if i.name.endswith(".w_u8")]
    assert len(edge) == 2 and {i.data_type for i in edge} == {onnx.TensorProto.UINT8}
    assert p4.stat().st_size < 0.6 * p8.stat().st_size


def test_batchnorm_folds_into_its_convolution_with_the_same_codes(tmp_path):
    import onnx

    from examples.tiny_resnet import build
    from tasks.onnx_export import onnx_logits, to_onnx

    torch.manual_seed(0)
    model = build((1, 8, 8), 10)
    for m in model.modules():        # BatchNorm statistics far from identity, some gains negative
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
    x = torch.randn(256, 1, 8, 8)
    model = _deployed(model, x, 4, 8)
    graph = deploy_graph(model, (1, 8, 8))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert graph.n_bn_folded == len(bns) == 2
    assert "BatchNormalization" not in [n.op for n in graph.nodes]
    path = tmp_path / "m.onnx"
    onnx.save_model(to_onnx(graph, {}), str(path))
    with torch.no_grad():
        ref = model(x).numpy()
    out = onnx_logits(path, x.numpy())
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.995
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    fp32 = deploy_graph(model, (1, 8, 8), quantized=False)     # the FP32 reference folds the same way
    assert fp32.n_bn_folded == 2 and "BatchNormalization" not in [n.op for n in fp32.nodes]


def test_accuracy_tolerance_scales_with_the_split(tmp_path):
    from tasks.onnx_export import acc_tolerance, verify

    assert acc_tolerance(2000) == (0.001, "0.1 point")
    tol, rule = acc_tolerance(360)
    assert tol == pytest.approx(2 / 360) and rule.startswith("two images of 360")
    # a file one image off on 360 images passes; two images off on 2,000 does not
    import onnx

    from tasks.onnx_export import onnx_logits, to_onnx

    model, x = _cnn((1, 8, 8), 8)
    path = tmp_path / "m.onnx"
    onnx.save_model(to_onnx(deploy_graph(model, (1, 8, 8)), {}), str(path))
    pred = onnx_logits(path, x.numpy()).argmax(1)
    y = pred.copy()
    acc = float(np.mean(pred == y))
    small = verify(path, x.numpy(), y, acc - 1 / 256, pred)
    assert small["acc_ok"] and small["acc_rule"].startswith("two images")
    xs = np.concatenate([x.numpy()] * 8)
    ys = np.concatenate([y] * 8)
    big = verify(path, xs, ys, acc - 3 / 2048, None)               # 0.15 points, three images
    assert not big["acc_ok"] and big["acc_rule"] == "0.1 point" and not big["ok"]


def test_the_file_converts_to_onnxruntime_mobile_format(tmp_path):
    """onnxruntime's mobile tooling (ORT format, with saved runtime optimizations) takes the file
    as it is, and the .ort file computes what the .onnx file does (the bias DequantizeLinear keeps
    its zero point for this: without it the runtime-optimization pass refuses the node)."""
    import subprocess
    import sys

    import onnx

    from tasks.onnx_export import onnx_logits, to_onnx

    model, x = _cnn((1, 8, 8), 4)
    path = tmp_path / "m.onnx"
    onnx.save_model(to_onnx(deploy_graph(model, (1, 8, 8), int4=True), {}), str(path))
    p = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Error" not in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    ort_file = tmp_path / "m.ort"
    assert ort_file.is_file() and (tmp_path / "m.with_runtime_opt.ort").is_file()
    np.testing.assert_array_equal(onnx_logits(ort_file, x.numpy()), onnx_logits(path, x.numpy()))
