"""The deployed model as a graph of ONNX-standard nodes, built with torch and numpy only.

:func:`deploy_graph` traces a deploy-prepared model with ``torch.fx`` (every :class:`QConv2d` /
:class:`QLinear` a leaf) and writes, per node, the ONNX operator that computes the same thing, in
the QDQ layout onnxruntime fuses into integer kernels (``QLinearConv``, ``QGemm``):

* a quantizable layer becomes ``DequantizeLinear`` of its **integer weight codes** (per-channel
  scale = the deployed step, ``axis=0``) feeding ``Conv`` or ``Gemm``/``MatMul``, with its bias as
  ``DequantizeLinear`` of int32 codes at scale ``s_x * s_w`` (the integer kernels' accumulator
  scale, a ``Mul`` of the two scales); codes are int8 with zero point 0, stored as **int4** at
  ``w_bits <= 4`` and cast to int8 in the graph (a cast of a constant, folded when a runtime
  loads the file), and uint8 with zero point 128 at 8 bits (x86 uint8 x int8 kernels without
  VNNI sum pairs of products in int16, which saturates for 8-bit codes; uint8 x uint8 widens
  first);
* a layer's input activation, where a range is deployed, is ``QuantizeLinear`` (uint8, the range's
  scale and zero point), ``Clip`` to ``[0, 2^a_bits - 1]`` in the integer domain when
  ``a_bits < 8`` (sub-8-bit codes carried exactly in the 8-bit container), then ``DequantizeLinear``;
* **the quantization moves up to the layer that produced the activation**: quantizing commutes
  exactly with max pooling, flatten and reshape (rounding and clamping are monotone), and with ReLU
  when the zero point is 0 (a ReLU output's range starts at 0), so ``Conv -> ReLU -> MaxPool ->
  Q`` is written ``Conv -> Q -> [Clip] -> MaxPool (uint8)`` with the ReLU absorbed by the
  saturation. Every ``Conv``/``Gemm`` whose output feeds such a chain then sits between
  ``DequantizeLinear`` inputs and a ``QuantizeLinear`` output: the pattern onnxruntime rewrites
  into one integer kernel;
* a BatchNorm that follows a convolution is **folded** into it (its gain multiplies the
  per-channel weight scale, so the integer codes are unchanged; its shift goes into the bias);
* BatchNorm elsewhere, ReLU, pooling, flatten, reshape, add, concat and the like map one to one.

The result (:class:`Graph`) is plain data: nodes, numpy initializers, input and output shapes.
Serializing it to an ``.onnx`` file and running it in onnxruntime live outside the library
(``tasks.onnx_export``), so ``fedhq_core`` keeps to torch, numpy and scikit-learn.
``quantized=False`` writes the same network in FP32 (float weights, BatchNorm folded, no Q/DQ):
the size and speed reference.

Weight codes are :func:`~fedhq_core.quant.modules.weight_codes`, the integers the deployed
fake-quant forward rounds to (the registered int form stores the same); activations quantize
with ONNX's round-half-to-even, as ``torch.round`` does; biases are
:func:`~fedhq_core.quant.modules.bias_codes`, which the deploy forward adds too. What is left to
float rounding: an integer kernel requantizes its accumulator in its own order, so an output
within an ulp of a code boundary may take the neighbouring code.
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
from .modules import QUANT_LAYERS, bias_codes, quant_layers, weight_codes


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: bool = False                   # a Conv/Gemm/MatMul with integer weights and bias


@dataclass
class _ActQuant:
    """One activation quantization (Q -> [Clip] -> DQ) written at a layer's input."""

    source: str                           # the float tensor it quantizes
    nodes: list[Node]                     # Q, the optional Clip, DQ
    zero_point: int


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
    opset: int = 17                       # 21 where int4 initializers are written
    n_quantized: int = 0                  # layers whose weights are stored as integers
    n_act_quantized: int = 0              # inputs with a deployed activation range
    int4: tuple[str, ...] = ()            # initializers to store as ONNX int4 (held here as int8)
    n_bn_folded: int = 0                  # BatchNorms folded into their convolution
    n_moved: int = 0                      # activation quantizations moved up to their producing layer


class _Tracer(fx.Tracer):
    """Quantizable layers and torch.nn's own modules are leaves; user modules are traced through."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        if isinstance(m, QUANT_LAYERS):
            return True
        return super().is_leaf_module(m, name)


class _Builder:
    def __init__(self, quantized: bool, int4: bool = False):
        self.quantized = quantized
        self.int4 = int4
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.int4_names: list[str] = []
        self.acts: list[_ActQuant] = []
        self.n_w = self.n_a = self.n_bn = 0
        self._uid = 0
        self._taken: set[str] = {"input", "logits"}

    def name(self, hint: str) -> str:
        """``hint`` itself (``conv1.w_scale``), with a number only where it is taken already."""
        self._uid += 1
        name = hint if hint not in self._taken else f"{hint}_{self._uid}"
        self._taken.add(name)
        return name

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        n = self.name(hint)
        self.inits[n] = np.asarray(value, dtype=dtype)
        return n

    def add(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(Node(op, inputs, [out], attrs))
        return out

    # --- quantized layers ----------------------------------------------------------------------
    def act(self, x: str, m: Any, hint: str) -> tuple[str, str | None]:
        """The layer's input as Q -> [Clip] -> DQ, and the name of its scale (None: float input)."""
        if not (self.quantized and m.qmode == "deploy" and m.aq.ready):
            return x, None
        qmin, qmax = act_qrange(m.aq.bits)
        scale, zp = act_scale_zp(m.aq.lo, m.aq.hi, m.aq.bits)
        s = self.const(f"{hint}.x_scale", float(scale))
        z = self.const(f"{hint}.x_zp", int(zp), np.uint8)
        first = len(self.nodes)
        q = self.add("QuantizeLinear", [x, s, z], f"{hint}.x_q")
        if qmax < 255:   # a_bits < 8: the codes stay inside the a_bits range of the uint8 container
            q = self.add("Clip", [q, self.const(f"{hint}.x_min", qmin, np.uint8),
                                  self.const(f"{hint}.x_max", qmax, np.uint8)], f"{hint}.x_clip")
        self.n_a += 1
        out = self.add("DequantizeLinear", [q, s, z], f"{hint}.x_dq")
        self.acts.append(_ActQuant(x, self.nodes[first:], int(zp)))
        return out, s

    def weight(self, m: Any, hint: str, gain: np.ndarray | None) -> tuple[str, str | None]:
        """The layer's weight (times a folded BatchNorm's per-channel ``gain``) and, when it is
        stored as integer codes, the name of its per-channel scale."""
        w = m.weight.detach().float().cpu().numpy()
        if not (self.quantized and m.qmode == "deploy"):
            if gain is not None:
                w = w * gain.reshape(-1, *([1] * (w.ndim - 1)))
            return self.const(f"{hint}.weight", w), None
        codes_t, step_t = weight_codes(m)
        codes, step = codes_t.cpu().numpy().astype(np.int8), step_t.float().cpu().numpy().astype(np.float32)
        if gain is not None:   # (codes * step) * gain == (codes * sign) * (step * |gain|): same codes
            sign = np.where(gain < 0, -1, 1).astype(np.int8).reshape(-1, *([1] * (codes.ndim - 1)))
            codes, step = codes * sign, (step * np.abs(gain)).astype(np.float32)
        s = self.const(f"{hint}.w_scale", step)
        if m.wq.bits >= 8:     # uint8 codes + 128 (zero point 128): see the module docstring
            q = self.const(f"{hint}.w_u8", codes.astype(np.int16) + 128, np.uint8)
            zp = [self.const(f"{hint}.w_zp", np.full(step.size, 128), np.uint8)]
        else:                  # int8 codes, zero point 0 (stored: onnxruntime's Gemm fusion wants it)
            q = self.const(f"{hint}.w_int", codes, np.int8)
            zp = [self.const(f"{hint}.w_zp", np.zeros(step.size), np.int8)]
        if self.int4 and m.wq.bits <= 4 and codes.min() >= -8 and codes.max() <= 7:
            self.int4_names.append(q)   # stored as int4; the Cast of a constant is folded when the file loads
            q = self.add("Cast", [q], f"{hint}.w_i8", to=3)   # TensorProto.INT8
        self.n_w += 1
        return self.add("DequantizeLinear", [q, s] + zp, f"{hint}.w_dq", axis=0), s

    def bias(self, m: Any, hint: str, bn: nn.Module | None, gain: np.ndarray | None,
             x_scale: str | None, w_scale: str | None) -> str | None:
        """The layer's bias, with a folded BatchNorm's shift, as int32 codes at the accumulator's
        scale ``s_x * s_w`` when input and weight are both integers (what the integer kernels add;
        the deploy forward adds the same, :func:`bias_codes`), else float. The scale is a ``Mul``
        of the two scales in the file, folded to a constant when a runtime loads it."""
        b = m._bias() if m.bias is not None else None
        if bn is not None:
            mean = bn.running_mean.detach().float()
            beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(mean)
            b = ((b.detach().float() if b is not None else 0.0) - mean) * torch.from_numpy(gain) + beta
        if b is None:
            return None
        if x_scale is None or w_scale is None:
            return self.const(f"{hint}.bias", b.detach().float().cpu().numpy())
        codes, _ = bias_codes(m, b, torch.from_numpy(self.inits[w_scale]))
        scale = self.add("Mul", [x_scale, w_scale], f"{hint}.b_scale")
        return self.add("DequantizeLinear", [self.const(f"{hint}.b_int", codes.cpu().numpy(), np.int32), scale,
                                             self.const(f"{hint}.b_zp", np.zeros(codes.numel()), np.int32)],
                        f"{hint}.b_dq", axis=0)

    def conv(self, x: str, m: Any, hint: str, bn: nn.Module | None = None) -> str:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ConfigError(f"export: {hint}: only numeric zero padding is exported (got {m.padding!r}, "
                              f"{m.padding_mode})")
        gain = _bn_gain(bn) if bn is not None else None
        xq, x_scale = self.act(x, m, hint)
        w, w_scale = self.weight(m, hint, gain)
        bias = self.bias(m, hint, bn, gain, x_scale, w_scale)
        p = list(m.padding)
        out = self.add("Conv", [xq, w] + ([bias] if bias else []), hint, kernel_shape=list(m.kernel_size),
                       strides=list(m.stride), pads=p + p, dilations=list(m.dilation), group=m.groups)
        self.nodes[-1].layer = w_scale is not None and x_scale is not None
        self.n_bn += bn is not None
        return out

    def linear(self, x: str, m: Any, hint: str, rank: int) -> str:
        xq, x_scale = self.act(x, m, hint)
        w, w_scale = self.weight(m, hint, None)
        bias = self.bias(m, hint, None, None, x_scale, w_scale)
        if rank == 2:
            out = self.add("Gemm", [xq, w] + ([bias] if bias else []), hint, transB=1)
            self.nodes[-1].layer = w_scale is not None and x_scale is not None
            return out
        y = self.add("MatMul", [xq, self.add("Transpose", [w], f"{hint}.wT", perm=[1, 0])], hint)
        return self.add("Add", [y, bias], f"{hint}.bias_add") if bias else y


def _bn_gain(bn: nn.Module) -> np.ndarray:
    """A BatchNorm's per-channel gain ``gamma / sqrt(running_var + eps)`` (float32)."""
    var = bn.running_var.detach().double().cpu().numpy()
    gamma = bn.weight.detach().double().cpu().numpy() if bn.affine else np.ones_like(var)
    return (gamma / np.sqrt(np.maximum(var, 0.0) + bn.eps)).astype(np.float32)


# ops that quantization commutes with exactly (ReLU only at zero point 0; see module docstring)
_COMMUTES = ("MaxPool", "Flatten", "Reshape")


def _move_quantization_up(nodes: list[Node], acts: list[_ActQuant]) -> tuple[list[Node], int]:
    """Each activation quantization moved to the output of the Conv/Gemm layer that produced its
    input, through max pooling, flatten, reshape and (at zero point 0) ReLU, where every tensor on
    the way has one consumer: the integer ops then run on the codes. Returns the nodes and how many
    quantizations moved."""
    producer = {o: n for n in nodes for o in n.outputs}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    moved = 0
    for a in acts:
        chain, t = [], a.source
        while t in producer and uses.get(t) == 1:
            p = producer[t]
            if p.op in _COMMUTES or (p.op == "Relu" and a.zero_point == 0):
                chain.append(p)
                t = p.inputs[0]
                continue
            break
        anchor = producer.get(t)
        if not chain or anchor is None or not anchor.layer or uses.get(t) != 1:
            continue
        q, *clip, dq = a.nodes
        new: list[Node] = [Node(q.op, [t] + q.inputs[1:], q.outputs, q.attrs)]
        cur = q.outputs[0]
        # the chain's integer ops in their order, ReLU absorbed, then the sub-8-bit Clip (a clamp
        # commutes with max pooling too; after the pooling it clips fewer codes)
        for p in [p for p in reversed(chain) if p.op != "Relu"] + clip:
            new.append(Node(p.op, [cur] + p.inputs[1:], p.outputs, p.attrs))
            cur = p.outputs[0]
        new.append(Node(dq.op, [cur] + dq.inputs[1:], dq.outputs, dq.attrs))
        drop = {id(n) for n in chain + a.nodes}
        at = nodes.index(anchor) + 1
        nodes = [n for n in nodes[:at] if id(n) not in drop] + new + [n for n in nodes[at:] if id(n) not in drop]
        moved += 1
    return nodes, moved


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


def _module_node(b: _Builder, gm: fx.GraphModule, node: fx.Node, x: str, rank: int,
                 bn: nn.Module | None = None) -> str:
    m = gm.get_submodule(node.target)  # type: ignore[arg-type]
    hint = str(node.target)
    if isinstance(m, QUANT_LAYERS):
        return b.conv(x, m, hint, bn) if isinstance(m, nn.Conv2d) else b.linear(x, m, hint, rank)
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


def _folds(gm: fx.GraphModule, quantized: bool) -> dict[fx.Node, fx.Node]:
    """BatchNorm nodes to fold, mapped to the convolution whose only consumer each is. A fold is
    left out where a negative gain would turn a code of -2^(b-1) into one outside int8."""
    out: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        bn, prev = gm.get_submodule(node.target), node.args[0]
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or prev.op != "call_module" \
                or len(prev.users) != 1:
            continue
        conv = gm.get_submodule(prev.target)
        if not (isinstance(conv, QUANT_LAYERS) and isinstance(conv, nn.Conv2d)):
            continue
        if quantized and conv.qmode == "deploy":
            codes, _ = weight_codes(conv)
            negative = torch.from_numpy(_bn_gain(bn) < 0)
            if bool((codes[negative] == -128).any()):
                continue
        out[node] = prev
    return out


def deploy_graph(model: nn.Module, input_shape: tuple[int, ...], quantized: bool = True,
                 int4: bool = False) -> Graph:
    """The ONNX graph of ``model`` (deploy-prepared; see module docstring) for inputs
    ``(N, *input_shape)``; ``int4`` stores the codes of layers at ``w_bits <= 4`` as int4
    (opset 21). Raises :class:`ConfigError` naming a layer or operation that has no mapping."""
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
    folds = _folds(gm, quantized)
    bn_of = {conv: gm.get_submodule(bn.target) for bn, conv in folds.items()}
    b = _Builder(quantized, int4)
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
        if node in folds:                   # folded into its convolution
            names[node] = names[folds[node]]
            continue
        first = node.args[0] if node.args else None
        rank = len(_shape(first)) if isinstance(first, fx.Node) and "tensor_meta" in first.meta \
            and hasattr(first.meta["tensor_meta"], "shape") else 0
        if node.op == "call_module":
            names[node] = _module_node(b, gm, node, names[first], rank, bn_of.get(node))
        else:
            res = _call_node(b, node, names, rank)
            if res is not None:
                names[node] = res
    b.nodes.append(Node("Identity", [out_name], ["logits"]))
    nodes, moved = _move_quantization_up(b.nodes, b.acts)
    return Graph(nodes, b.inits, in_name, tuple(input_shape), "logits", tuple(out_shape),
                 opset=21 if b.int4_names else 17, n_quantized=b.n_w, n_act_quantized=b.n_a,
                 int4=tuple(b.int4_names), n_bn_folded=b.n_bn, n_moved=moved)
