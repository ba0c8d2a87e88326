"""The deployed quantized model as an ONNX file, checked in onnxruntime.

:func:`export_bundle` turns a deployed-model bundle (``Simulation.deployed_bundle()``, or the
registered pyfunc's artifacts read back by ``tasks.pyfunc_model.read_bundle``) into an ``.onnx``
file with QuantizeLinear/DequantizeLinear (the graph itself is built by
``fedhq_core.quant.export.deploy_graph``), checks it with ``onnx.checker``, and reports its size
against the same network exported in FP32, which of its nodes onnxruntime runs on integer kernels
(:func:`optimized_ops`, from the graph onnxruntime writes after its optimizations) and both files'
latency and throughput (:func:`latency`). 4-bit weights are stored as int4 (opset 21) where the
installed onnxruntime loads them and still runs every layer on an integer kernel; otherwise the
export falls back to int8 containers and says why in one line. :func:`verify` runs the file in
onnxruntime on a test split against the run's own quantized accuracy and the reference model's
predictions.

Needs ``onnx`` and ``onnxruntime`` and nothing of Prefect or MLflow, so it also serves a notebook.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ACC_TOLERANCE = 0.001      # onnxruntime's top-1 accuracy equals the run's final_acc_q within 0.1 point,
ACC_TOLERANCE_IMAGES = 2   # or within two images where two images are more than that (small test splits)
MIN_AGREEMENT = 0.995      # and its predictions agree with the reference (pyfunc) model's on >= 99.5%
MIN_SPEEDUP = 1.5          # the throughput at batch 64 the integer file is expected to reach over FP32

# onnxruntime's CPU kernels that compute on integers (the fused QDQ groups and QOperator nodes)
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization"})
# and those that compute a convolution or a matrix product in float
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                           "ConvTranspose"})


def to_onnx(graph: Any, metadata: dict[str, Any]):
    """A :class:`fedhq_core.quant.export.Graph` as an ``onnx.ModelProto``; ``metadata`` goes to
    ``metadata_props`` (non-strings as JSON)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=f"n{i}", **_non_default(n.attrs))
             for i, n in enumerate(graph.nodes)]
    int4 = set(graph.int4)
    inits = [_int4_tensor(k, v) if k in int4 else numpy_helper.from_array(v, name=k)
             for k, v in graph.initializers.items()]
    x = helper.make_tensor_value_info(graph.input_name, TensorProto.FLOAT, ["batch", *graph.input_shape])
    y = helper.make_tensor_value_info(graph.output_name, TensorProto.FLOAT, ["batch", *graph.output_shape])
    g = helper.make_graph(nodes, "fedhq_deployed", [x], [y], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)],
                              producer_name="fedhq", producer_version=_version())
    # the lowest IR version the opset allows: 9 (opset 17, onnxruntime >= 1.16), 10 (opset 21, int4)
    model.ir_version = min(model.ir_version, 10 if graph.opset >= 21 else 9)
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def _non_default(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes without those at ONNX's default value (unit strides and dilations, zero pads,
    one group, floor mode): the file says only what differs."""
    def default(k: str, v: Any) -> bool:
        if k in ("strides", "dilations"):
            return all(int(x) == 1 for x in v)
        if k == "pads":
            return all(int(x) == 0 for x in v)
        return (k, v) in (("group", 1), ("ceil_mode", 0), ("count_include_pad", 0))
    return {k: v for k, v in attrs.items() if not default(k, v)}


def _int4_tensor(name: str, codes: np.ndarray):
    """int8-held codes in -8..7 as an ONNX INT4 tensor: two per byte, the first in the low nibble."""
    from onnx import TensorProto, helper

    flat = codes.astype(np.int8).reshape(-1)
    nib = (flat.astype(np.uint8) & 0x0F)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True)


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
    quantized_layers: int        # Conv/Gemm layers whose weights are stored as integers
    quantized_inputs: int
    opset: int
    metadata: dict[str, Any]
    weight_storage: str = "int8"             # "int4" (opset 21) or "int8" containers
    storage_note: str | None = None          # why int4 was not used, where it was wanted
    bn_folded: int = 0
    moved_quantizations: int = 0
    integer_ops: int = 0                     # nodes of the optimized graph that run an integer kernel
    float_compute_ops: int = 0               # ... and convolutions / matrix products left in float
    op_histogram: dict[str, int] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        lat = d.pop("latency")
        return {**d, **lat}


def optimized_ops(model: Any, threads: int = 1) -> Counter:
    """The op types of the graph onnxruntime (CPU, default optimizations) runs for ``model`` (a
    ModelProto or a path), read from the file it writes through ``optimized_model_filepath``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def kernel_counts(ops: Counter) -> tuple[int, int]:
    """(integer kernels, float convolutions and matrix products) in an op histogram."""
    return (sum(v for k, v in ops.items() if k in INTEGER_KERNELS),
            sum(v for k, v in ops.items() if k in FLOAT_KERNELS))


def latency(path: str | Path, input_shape: tuple[int, ...], threads: int, seconds: float = 1.0,
            seed: int = 0) -> dict[str, float]:
    """onnxruntime (CPU, default optimizations, ``threads`` intra-op threads) on random inputs:
    the median latency in ms at batch 1 (``b1``) and batch 64 (``b64``), each after a warm-up,
    over about ``seconds`` of calls (at least 5), and the throughput at batch 64 in images/s."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for key, batch in (("b1", 1), ("b64", 64)):
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {name: x})
        times: list[float] = []
        end = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append((time.perf_counter() - t0) * 1e3)
        out[key] = statistics.median(times)
    out["b64_images_per_s"] = 64e3 / out["b64"]
    return out


def kernel_profile(path: str | Path, input_shape: tuple[int, ...], threads: int, batch: int = 64,
                   runs: int = 20, top: int = 6) -> list[dict[str, Any]]:
    """onnxruntime's own per-node kernel times (its profiler) at ``batch``: the ``top`` nodes by
    time, each ``{op, out_shape, ms}`` (ms per run), so a report can say which layer limits it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
        name = sess.get_inputs()[0].name
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        shape = next(iter(args.get("output_type_shape") or [{}]), {})
        node = total.setdefault(e["name"], {"op": args.get("op_name", "?"),
                                            "out_shape": next(iter(shape.values()), []), "ms": 0.0})
        node["ms"] += e["dur"] / 1e3 / runs
    return sorted(total.values(), key=lambda n: -n["ms"])[:top]


def export_bundle(bundle: dict[str, Any], out: str | Path, run_id: str | None = None, weights: str = "auto",
                  measure_latency: bool = True, threads: int | None = None,
                  latency_seconds: float = 0.5) -> ExportReport:
    """Write the bundle's deployed model to ``out`` (checked with ``onnx.checker``); the FP32
    export of the same network is the size and speed reference. ``weights``: ``auto`` stores
    codes of layers at <= 4 bits as int4 where onnxruntime still runs every such layer on an
    integer kernel, ``int8`` always uses int8 containers (opset 17)."""
    import onnx
    import onnxruntime as ort

    from fedhq_core.models.spec import deployed_model
    from fedhq_core.quant.export import deploy_graph

    model = deployed_model(bundle)
    shape = tuple(bundle["meta"]["in_shape"])
    meta = metadata_of(bundle, run_id)
    # a graph without a layer at <= 4 bits is the int8 one whatever ``int4`` says
    q = deploy_graph(model, shape, quantized=True, int4=weights == "auto")
    proto = to_onnx(q, meta)
    note = None
    if not q.int4:
        ops = optimized_ops(proto)
    else:   # kept only where onnxruntime loads it and runs as many layers on integer kernels as with int8
        q8 = deploy_graph(model, shape, quantized=True)
        proto8 = to_onnx(q8, meta)
        ops8 = optimized_ops(proto8)
        try:
            ops = optimized_ops(proto)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds on load
            note = (f"int4 weights: onnxruntime {ort.__version__} does not load them "
                    f"({str(err).splitlines()[0][:200]}); stored in int8 containers")
        else:
            n4, n8 = kernel_counts(ops)[0], kernel_counts(ops8)[0]
            if n4 < n8:
                note = (f"int4 weights: onnxruntime {ort.__version__} runs {n4} layers on integer kernels with "
                        f"them against {n8} with int8 ({', '.join(sorted(set(ops) & FLOAT_KERNELS))} left in "
                        f"float); stored in int8 containers")
        if note:
            q, proto, ops = q8, proto8, ops8
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out))
    n_int, n_float = kernel_counts(ops)
    fp32 = to_onnx(deploy_graph(model, shape, quantized=False), meta)
    lat: dict[str, Any] = {}
    if measure_latency:
        threads = threads or os.cpu_count() or 1
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path = os.path.join(tmp, "fp32.onnx")
            onnx.save_model(fp32, fp32_path)
            f, i = latency(fp32_path, shape, threads, latency_seconds), latency(out, shape, threads, latency_seconds)
            profile = {"fp32": kernel_profile(fp32_path, shape, threads), "int": kernel_profile(out, shape, threads)}
        speedup = i["b64_images_per_s"] / f["b64_images_per_s"]
        lat = {"latency_ms": {"fp32": {"b1": f["b1"], "b64": f["b64"]}, "int": {"b1": i["b1"], "b64": i["b64"]}},
               "throughput_ips": {"fp32": {"b64": f["b64_images_per_s"]}, "int": {"b64": i["b64_images_per_s"]}},
               "speedup_b64": speedup, "speedup_b1": f["b1"] / i["b1"], "threads": threads,
               "onnxruntime": ort.__version__, "kernel_profile_b64": profile}
        if speedup < MIN_SPEEDUP:
            def slowest(side: str) -> str:
                return ", ".join(f"{n['op']} {'x'.join(map(str, n['out_shape']))} {n['ms']:.2f} ms"
                                 for n in profile[side][:3])
            lat["speed_note"] = (f"throughput {speedup:.2f}x FP32 at batch 64, under {MIN_SPEEDUP}x: "
                                 f"{n_int} integer kernels, {n_float} float convolutions/products; slowest kernels "
                                 f"per batch of 64: {slowest('int')} (FP32: {slowest('fp32')})")
    size, fp32_size = out.stat().st_size, len(fp32.SerializeToString())
    return ExportReport(str(out), size, fp32_size, size / fp32_size, q.n_quantized, q.n_act_quantized, q.opset,
                        meta, "int4" if q.int4 else "int8", note, q.n_bn_folded, q.n_moved, n_int, n_float,
                        dict(sorted(ops.items())), lat)


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


def acc_tolerance(n: int) -> tuple[float, str]:
    """The accuracy gap the check allows on ``n`` test images, and the rule that set it: 0.1
    point, or two images where two images are more (one digits image is 0.28 points: a 0.1-point
    gate there fails on a single near-tie that flips)."""
    if n > 0 and ACC_TOLERANCE_IMAGES / n > ACC_TOLERANCE:
        return ACC_TOLERANCE_IMAGES / n, f"two images of {n} ({ACC_TOLERANCE_IMAGES / n * 100:.2f} points)"
    return ACC_TOLERANCE, "0.1 point"


def verify(path: str | Path, x: np.ndarray, y: np.ndarray, run_acc_q: float | None,
           reference_pred: np.ndarray | None) -> dict[str, Any]:
    """onnxruntime's top-1 accuracy on ``x``, ``y`` against the run's ``final_acc_q`` (within
    :func:`acc_tolerance`) and its agreement with ``reference_pred``; ``ok`` when both meet their
    targets. Judged on the
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
    tol, rule = acc_tolerance(len(y))
    out["acc_tolerance_points"], out["acc_rule"] = tol * 100, rule
    out["acc_ok"] = run_acc_q is None or abs(acc - run_acc_q) <= tol + 1e-9
    out["agreement_ok"] = out["agreement"] is None or out["agreement"] >= MIN_AGREEMENT
    out["ok"] = bool(out["acc_ok"] and out["agreement_ok"])
    return out
