"""The deployed quantized model as an ONNX file, checked in onnxruntime.

:func:`export_bundle` turns a deployed-model bundle (``Simulation.deployed_bundle()``, or the
registered pyfunc's artifacts read back by ``tasks.pyfunc_model.read_bundle``) into an ``.onnx``
file with QuantizeLinear/DequantizeLinear (the graph itself is built by
``fedhq_core.quant.export.deploy_graph``), checks it with ``onnx.checker`` and reports its size
against the same network exported in FP32. :func:`verify` runs it in onnxruntime on a test split
against the run's own quantized accuracy and the reference model's predictions.

Needs ``onnx`` and ``onnxruntime`` and nothing of Prefect or MLflow, so it also serves a notebook.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ACC_TOLERANCE = 0.001      # onnxruntime's top-1 accuracy equals the run's final_acc_q within 0.1 point
MIN_AGREEMENT = 0.995      # and its predictions agree with the reference (pyfunc) model's on >= 99.5%


def to_onnx(graph: Any, metadata: dict[str, Any]):
    """A :class:`fedhq_core.quant.export.Graph` as an ``onnx.ModelProto``; ``metadata`` goes to
    ``metadata_props`` (non-strings as JSON)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=f"{n.op}_{i}", **n.attrs)
             for i, n in enumerate(graph.nodes)]
    inits = [numpy_helper.from_array(v, name=k) for k, v in graph.initializers.items()]
    x = helper.make_tensor_value_info(graph.input_name, TensorProto.FLOAT, ["batch", *graph.input_shape])
    y = helper.make_tensor_value_info(graph.output_name, TensorProto.FLOAT, ["batch", *graph.output_shape])
    g = helper.make_graph(nodes, "fedhq_deployed", [x], [y], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)],
                              producer_name="fedhq", producer_version=_version())
    model.ir_version = min(model.ir_version, 9)     # readable by every onnxruntime since 1.16
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def _version() -> str:
    from fedhq_core import __version__

    return __version__


def metadata_of(bundle: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    m = bundle["meta"]
    return {"mean": list(m.get("mean", [])), "std": list(m.get("std", [])), "input_shape": list(m["in_shape"]),
            "classes": list(m.get("classes", [])), "w_bits": m["w_bits"], "a_bits": m["a_bits"],
            "first_last_bits": m["first_last_bits"], "model": m["model"], "dataset": m.get("dataset", ""),
            "mlflow_run_id": run_id or "", "input": "images (N, C, H, W) float32, standardised: (x - mean) / std"}


@dataclass
class ExportReport:
    path: str
    onnx_bytes: int
    fp32_onnx_bytes: int
    size_ratio: float            # quantized file / FP32 file
    quantized_layers: int
    quantized_inputs: int
    opset: int
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_bundle(bundle: dict[str, Any], out: str | Path, run_id: str | None = None) -> ExportReport:
    """Write the bundle's deployed model to ``out`` (checked with ``onnx.checker``); the FP32
    export of the same network is built in memory for the size comparison."""
    import onnx

    from fedhq_core.quant.export import deploy_graph, deployed_model

    model = deployed_model(bundle)
    shape = tuple(bundle["meta"]["in_shape"])
    meta = metadata_of(bundle, run_id)
    q = deploy_graph(model, shape, quantized=True)
    proto = to_onnx(q, meta)
    fp32 = to_onnx(deploy_graph(model, shape, quantized=False), meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out))
    size, fp32_size = out.stat().st_size, len(fp32.SerializeToString())
    return ExportReport(str(out), size, fp32_size, size / fp32_size, q.n_quantized, q.n_act_quantized, q.opset, meta)


def onnx_logits(path: str | Path, x: np.ndarray, batch_size: int = 1024, optimize: bool = True) -> np.ndarray:
    """The file's outputs in onnxruntime (CPU) for inputs ``x`` (N, C, H, W): with its default
    graph optimizations (what a deployment runs), or with none (``optimize=False``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def verify(path: str | Path, x: np.ndarray, y: np.ndarray, run_acc_q: float | None,
           reference_pred: np.ndarray | None) -> dict[str, Any]:
    """onnxruntime's top-1 accuracy on ``x``, ``y`` against the run's ``final_acc_q`` and its
    agreement with ``reference_pred``; ``ok`` when both meet the targets above. Judged on the
    default session; the same figures with graph optimizations off are reported beside them
    (``*_unoptimized``): onnxruntime's rewrites (Q/DQ propagation, fusions) change float
    rounding, so they tell the export's own error from the runtime's."""
    y = np.asarray(y)
    ref = None if reference_pred is None else np.asarray(reference_pred).reshape(-1)
    out: dict[str, Any] = {"n": int(len(y)), "run_final_acc_q": run_acc_q}
    for suffix, optimize in (("", True), ("_unoptimized", False)):
        pred = onnx_logits(path, x, optimize=optimize).argmax(1)
        acc = float(np.mean(pred == y))
        out[f"onnxruntime_acc{suffix}"] = acc
        out[f"acc_diff_points{suffix}"] = None if run_acc_q is None else (acc - run_acc_q) * 100
        out[f"agreement{suffix}"] = None if ref is None else float(np.mean(pred == ref))
    acc = out["onnxruntime_acc"]
    out["acc_ok"] = run_acc_q is None or abs(acc - run_acc_q) <= ACC_TOLERANCE + 1e-9
    out["agreement_ok"] = out["agreement"] is None or out["agreement"] >= MIN_AGREEMENT
    out["ok"] = bool(out["acc_ok"] and out["agreement_ok"])
    return out
