"""The deployed model as a graph of ONNX-standard nodes, built with torch and numpy only.

:func:`deploy_graph` traces a deploy-prepared model with ``torch.fx`` (every :class:`QConv2d` /
:class:`QLinear` a leaf) and writes, per node, the ONNX operator that computes the same thing:

* a quantizable layer becomes ``DequantizeLinear`` of its **integer weight codes** (int8
  initializer, per-channel scale = the deployed step, zero point 0, ``axis=0``) feeding ``Conv`` or
  ``Gemm``/``MatMul``; its input activation, where a range is deployed, is
  ``QuantizeLinear`` (uint8, the range's scale and zero point) → ``Clip`` to ``[0, 2^a_bits - 1]``
  (sub-8-bit codes carried exactly in the 8-bit container) → ``DequantizeLinear``;
* BatchNorm, ReLU, pooling, flatten, reshape, add, concat and the like map one to one.

The result (:class:`Graph`) is plain data: nodes, numpy initializers, input and output shapes.
Serializing it to an ``.onnx`` file and running it in onnxruntime live outside the library
(``tasks.onnx_export``), so ``fedhq_core`` keeps to torch, numpy and scikit-learn.
``quantized=False`` writes the same network in FP32 (float weights, no Q/DQ): the size reference.

Weight codes are :func:`~fedhq_core.quant.modules.weight_codes`, the integers the deployed
fake-quant forward rounds to (the registered int form stores the same); activations quantize
with ONNX's round-half-to-even, as ``torch.round`` does.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError
from .fake_quant import act_qrange, act_scale_zp
from .modules import QUANT_LAYERS, quant_layers, weight_codes


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """ONNX-standard nodes over named tensors; ``initializers`` are numpy arrays (int8 weight
    codes, float32 scales, biases, BatchNorm statistics)."""

    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    input_name: str
    input_shape: tuple[int, ...]          # without the batch dimension
    output_name: str
    output_shape: tuple[int, ...]
    opset: int = 17
    n_quantized: int = 0                  # layers whose weights are stored as integers
    n_act_quantized: int = 0              # inputs with a deployed activation range


class _Tracer(fx.Tracer):
    """Quantizable layers and torch.nn's own modules are leaves; user modules are traced through."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        if isinstance(m, QUANT_LAYERS):
            return True
        return super().is_leaf_module(m, name)


class _Builder:
    def __init__(self, quantized: bool):
        self.quantized = quantized
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.n_w = self.n_a = 0
        self._uid = 0

    def name(self, hint: str) -> str:
        self._uid += 1
        return f"{hint.replace('.', '_')}_{self._uid}"

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        n = self.name(hint)
        self.inits[n] = np.asarray(value, dtype=dtype)
        return n

    def add(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(Node(op, inputs, [out], attrs))
        return out

    # --- quantized layers ----------------------------------------------------------------------
    def act(self, x: str, m: Any, hint: str) -> str:
        if not (self.quantized and m.qmode == "deploy" and m.aq.ready):
            return x
        qmin, qmax = act_qrange(m.aq.bits)
        scale, zp = act_scale_zp(m.aq.lo, m.aq.hi, m.aq.bits)
        s = self.const(f"{hint}.act_scale", float(scale))
        z = self.const(f"{hint}.act_zero_point", int(zp), np.uint8)
        q = self.add("QuantizeLinear", [x, s, z], f"{hint}.act_q")
        if qmax < 255:   # a_bits < 8: the codes stay inside the a_bits range of the uint8 container
            q = self.add("Clip", [q, self.const(f"{hint}.act_qmin", qmin, np.uint8),
                                  self.const(f"{hint}.act_qmax", qmax, np.uint8)], f"{hint}.act_clip")
        self.n_a += 1
        return self.add("DequantizeLinear", [q, s, z], f"{hint}.act_dq")

    def weight(self, m: Any, hint: str) -> str:
        w = m.weight.detach().float()
        if not (self.quantized and m.qmode == "deploy"):
            return self.const(f"{hint}.weight", w.cpu().numpy())
        codes, step = weight_codes(m)
        q = self.const(f"{hint}.weight_int", codes.cpu().numpy(), np.int8)
        s = self.const(f"{hint}.weight_scale", step.float().cpu().numpy())
        z = self.const(f"{hint}.weight_zero_point", np.zeros(step.numel()), np.int8)
        self.n_w += 1
        return self.add("DequantizeLinear", [q, s, z], f"{hint}.weight_dq", axis=0)

    def conv(self, x: str, m: Any, hint: str) -> str:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ConfigError(f"export: {hint}: only numeric zero padding is exported (got {m.padding!r}, "
                              f"{m.padding_mode})")
        ins = [self.act(x, m, hint), self.weight(m, hint)]
        if m.bias is not None:
            ins.append(self.const(f"{hint}.bias", m.bias.detach().float().cpu().numpy()))
        p = list(m.padding)
        return self.add("Conv", ins, hint, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                        pads=p + p, dilations=list(m.dilation), group=m.groups)

    def linear(self, x: str, m: Any, hint: str, rank: int) -> str:
        xq, w = self.act(x, m, hint), self.weight(m, hint)
        bias = self.const(f"{hint}.bias", m.bias.detach().float().cpu().numpy()) if m.bias is not None else None
        if rank == 2:
            return self.add("Gemm", [xq, w] + ([bias] if bias else []), hint, transB=1)
        y = self.add("MatMul", [xq, self.add("Transpose", [w], f"{hint}.wT", perm=[1, 0])], hint)
        return self.add("Add", [y, bias], f"{hint}.bias_add") if bias else y


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _pool(b: _Builder, op: str, x: str, hint: str, k: Any, s: Any, p: Any, ceil: bool, **extra: Any) -> str:
    pads = _pair(p)
    return b.add(op, [x], hint, kernel_shape=_pair(k), strides=_pair(s if s not in (None, []) else k),
                 pads=pads + pads, ceil_mode=int(bool(ceil)), **extra)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ConfigError(f"export: {node.name}: its output is not one tensor")
    return tuple(meta.shape)


def _reshape(b: _Builder, x: str, node: fx.Node, hint: str) -> str:
    shape = list(_shape(node))
    return b.add("Reshape", [x, b.const(f"{hint}.shape", [-1] + shape[1:], np.int64)], hint)


def _flatten(b: _Builder, x: str, node: fx.Node, hint: str, start: int, end: int, rank: int) -> str:
    start, end = start % rank, end % rank
    if start == 1 and end == rank - 1:
        return b.add("Flatten", [x], hint, axis=1)
    if start == 0:
        raise ConfigError(f"export: {hint}: flattening the batch dimension is not exported")
    return _reshape(b, x, node, hint)


_ACT_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict[str, Any]]]] = {
    nn.ReLU: lambda m: ("Relu", {}),
    nn.Sigmoid: lambda m: ("Sigmoid", {}),
    nn.Tanh: lambda m: ("Tanh", {}),
    nn.LeakyReLU: lambda m: ("LeakyRelu", {"alpha": float(m.negative_slope)}),
    nn.ELU: lambda m: ("Elu", {"alpha": float(m.alpha)}),
    nn.Softmax: lambda m: ("Softmax", {"axis": int(m.dim if m.dim is not None else -1)}),
}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_ACT_FUNCS = {torch.relu: "Relu", torch.nn.functional.relu: "Relu", torch.sigmoid: "Sigmoid",
              torch.tanh: "Tanh", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
_BINARY = {operator.add: "Add", torch.add: "Add", "add": "Add", operator.iadd: "Add",
           operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul", operator.sub: "Sub", torch.sub: "Sub"}

SUPPORTED = ("Conv2d and Linear (quantized), BatchNorm1d/2d, ReLU, ReLU6, LeakyReLU, ELU, Sigmoid, Tanh, "
             "Softmax, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, Dropout, "
             "add/sub/mul, cat, flatten/view/reshape, mean over H and W")


def _module_node(b: _Builder, gm: fx.GraphModule, node: fx.Node, x: str, rank: int) -> str:
    m = gm.get_submodule(node.target)  # type: ignore[arg-type]
    hint = str(node.target)
    if isinstance(m, QUANT_LAYERS):
        return b.conv(x, m, hint) if isinstance(m, nn.Conv2d) else b.linear(x, m, hint, rank)
    if isinstance(m, _PASS_MODULES):
        return x
    for cls, make in _ACT_MODULES.items():
        if type(m) is cls:
            op, attrs = make(m)
            return b.add(op, [x], hint, **attrs)
    if type(m) is nn.ReLU6:
        return b.add("Clip", [x, b.const(f"{hint}.lo", 0.0), b.const(f"{hint}.hi", 6.0)], hint)
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) and m.track_running_stats:
        c = m.num_features
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        w = m.weight.detach().cpu().numpy() if m.affine else ones
        bias = m.bias.detach().cpu().numpy() if m.affine else zeros
        return b.add("BatchNormalization", [x, b.const(f"{hint}.scale", w), b.const(f"{hint}.bias", bias),
                                            b.const(f"{hint}.mean", m.running_mean.detach().cpu().numpy()),
                                            b.const(f"{hint}.var", m.running_var.detach().cpu().numpy())],
                     hint, epsilon=float(m.eps))
    if type(m) is nn.MaxPool2d and not m.return_indices:
        return _pool(b, "MaxPool", x, hint, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     dilations=_pair(m.dilation))
    if type(m) is nn.AvgPool2d and m.divisor_override is None:
        return _pool(b, "AveragePool", x, hint, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     count_include_pad=int(m.count_include_pad))
    if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == [1, 1]:
        return b.add("GlobalAveragePool", [x], hint)
    if type(m) is nn.Flatten:
        return _flatten(b, x, node, hint, m.start_dim, m.end_dim, rank)
    raise ConfigError(f"export: layer {hint} ({type(m).__name__}) has no ONNX mapping (exported: {SUPPORTED})")


def _call_node(b: _Builder, node: fx.Node, names: dict[fx.Node, str], rank: int) -> str | None:
    """call_function / call_method nodes; None for shape queries only a reshape reads."""
    t = node.target
    hint = node.name
    args = list(node.args)
    tensor_args = [a for a in args if isinstance(a, fx.Node)]

    def arg(i: int) -> str:
        a = args[i]
        if isinstance(a, fx.Node):
            return names[a]
        return b.const(f"{hint}.c{i}", float(a))

    if t in ("size", getattr, "dim") or (t is operator.getitem and args and args[0] not in names):
        return None   # shape queries: a reshape reads its output shape from the trace instead
    if t in _ACT_FUNCS:
        return b.add(_ACT_FUNCS[t], [names[args[0]]], hint)
    if t in _BINARY and len(args) == 2 and tensor_args:
        return b.add(_BINARY[t], [arg(0), arg(1)], hint)
    if t in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(b, names[args[0]], node, hint, int(start), int(end), rank)
    if t in ("view", "reshape", torch.reshape):
        return _reshape(b, names[args[0]], node, hint)
    if t in (torch.cat, torch.concat):
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        return b.add("Concat", [names[a] for a in args[0]], hint, axis=int(dim))
    if t in (torch.mean, "mean"):
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        keep = bool(args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if sorted(d % rank for d in dims) == [2, 3] and rank == 4:
            y = b.add("GlobalAveragePool", [names[args[0]]], hint)
            return y if keep else b.add("Flatten", [y], f"{hint}.squeeze", axis=1)
    raise ConfigError(f"export: operation {node.name} ({getattr(t, '__name__', t)}) has no ONNX mapping "
                      f"(exported: {SUPPORTED})")


class _Names(dict):
    def __missing__(self, node: Any) -> str:
        raise ConfigError(f"export: {getattr(node, 'name', node)} is a shape or constant used as a tensor; "
                          f"only reshapes may read shapes")


def deployed_model(bundle: dict[str, Any]) -> nn.Module:
    """The deployed model of a :meth:`Simulation.deployed_bundle` (``meta``, ``state``, ``steps``,
    ``ranges``), rebuilt in deploy mode on the CPU."""
    from ..worker import ModelSpec
    from .modules import load_model_state, prepare_deploy

    m = bundle["meta"]
    # the observers' settings do not matter in deploy mode (the ranges are loaded)
    model = ModelSpec(m["model"], tuple(m["in_shape"]), m["num_classes"], m["w_bits"], m["a_bits"],
                      m["first_last_bits"], 0.9, 99.99).build(torch.device("cpu"))
    load_model_state(model, {k: v.detach().cpu() for k, v in bundle["state"].items()})
    prepare_deploy(model, bundle.get("ranges") or None,
                   {k: v.detach().cpu() for k, v in bundle["steps"].items()} if bundle.get("steps") else None)
    return model.eval()


def deploy_graph(model: nn.Module, input_shape: tuple[int, ...], quantized: bool = True) -> Graph:
    """The ONNX graph of ``model`` (deploy-prepared; see module docstring) for inputs
    ``(N, *input_shape)``. Raises :class:`ConfigError` naming a layer or operation that has no
    mapping."""
    if not quant_layers(model):
        raise ConfigError("export: the model has no quantizable (Conv2d or Linear) layer")
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds on dynamic control flow
        raise ConfigError(f"export: the model cannot be traced by torch.fx ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]})") from None
    gm = fx.GraphModule(model, graph)
    param = next(model.parameters())
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape, device=param.device))
    b = _Builder(quantized)
    names: dict[fx.Node, str] = _Names()
    in_name = out_name = ""
    out_shape: tuple[int, ...] = ()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if in_name:
                raise ConfigError("export: the model takes more than one input")
            in_name = names[node] = "input"
            continue
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise ConfigError("export: the model must return one tensor")
            out_name, out_shape = names[res], _shape(res)[1:]
            continue
        if node.op == "get_attr":
            raise ConfigError(f"export: {node.target} is used as a tensor outside a Conv2d/Linear layer")
        first = node.args[0] if node.args else None
        rank = len(_shape(first)) if isinstance(first, fx.Node) and "tensor_meta" in first.meta \
            and hasattr(first.meta["tensor_meta"], "shape") else 0
        if node.op == "call_module":
            names[node] = _module_node(b, gm, node, names[first], rank)
        else:
            res = _call_node(b, node, names, rank)
            if res is not None:
                names[node] = res
    b.nodes.append(Node("Identity", [out_name], ["logits"]))
    return Graph(b.nodes, b.inits, in_name, tuple(input_shape), "logits", tuple(out_shape),
                 n_quantized=b.n_w, n_act_quantized=b.n_a)
