"""Quantizable Conv2d/Linear layers and the per-layer quantizers.

A model is prepared once (:func:`prepare_model`): every ``nn.Conv2d``/``nn.Linear`` becomes a
:class:`QConv2d`/:class:`QLinear` with the *same* parameter names, plus a weight quantizer
``wq`` (per-channel LSQ step) and an input-activation quantizer ``aq`` (per-tensor range). The
layer's behaviour is switched by :func:`set_mode`:

``fp``      plain FP32 forward (FP32 training, the PTQ client's training phase)
``observe`` FP32 forward while recording percentile activation ranges (PTQ calibration)
``qat``     LSQ weights + EMA-observed fake-quant activations (QAT training)
``deploy``  weights and activations quantized with fixed scales/ranges (the deployed model)

Because names are unchanged, FedAvg works on :func:`model_state` (quantizer state excluded) and
any strategy's update applies to one shared model object.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fake_quant import (LSQWeight, STEActivation, act_qrange, act_scale_zp, dequantize, lsq_grad_scale,
                         mse_weight_scale, quantize, weight_qrange)

MODES = ("fp", "observe", "qat", "deploy")


class WeightQuantizer(nn.Module):
    def __init__(self, out_channels: int, bits: int):
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.ones(out_channels))

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Warm start: MSE-optimal per-channel scale of the current weights."""
        self.step.copy_(mse_weight_scale(weight, self.bits))

    def forward(self, w: torch.Tensor, mode: str) -> torch.Tensor:
        if mode not in ("qat", "deploy"):
            return w
        qmin, qmax = weight_qrange(self.bits)
        step = self.step.abs().clamp_min(1e-8).view(-1, *([1] * (w.dim() - 1)))
        if mode == "deploy":
            return dequantize(quantize(w, step.detach(), 0.0, qmin, qmax), step.detach(), 0.0)
        return LSQWeight.apply(w, step, qmin, qmax, lsq_grad_scale(w[0].numel(), self.bits))


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with an EMA (QAT) or percentile (PTQ) observer."""

    def __init__(self, bits: int, momentum: float = 0.9, percentile: float = 99.99):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.percentile = percentile
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Host-side mirror of ``initialized``: control flow never reads a device tensor, so a
        # training step has no device sync (``bool(t)`` on a GPU stalls the stream).
        self.ready = False
        self._calib_n = 0

    def _mark(self, ready: bool) -> None:
        self.ready = ready
        self.initialized.fill_(ready)

    def set_range(self, lo: float, hi: float) -> None:
        self.lo.fill_(lo)
        self.hi.fill_(hi)
        self._mark(True)

    def reset(self) -> None:
        self._mark(False)
        self._calib_n = 0

    @torch.no_grad()
    def _observe_percentile(self, x: torch.Tensor) -> None:
        """The ``percentile`` clipping range as order statistics: the k-th largest and k-th
        smallest value, k = ceil((1 - p) n) (two ``topk`` calls; ``torch.quantile`` sorts the
        whole tensor and runs ~20 ops, which made calibration a PTQ client's largest cost)."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() > 262144:  # deterministic stride subsample keeps the order statistics cheap
            flat = flat[:: flat.numel() // 262144 + 1]
        k = max(1, min(flat.numel(), math.ceil((1 - self.percentile / 100) * flat.numel() - 1e-9)))
        hi = torch.topk(flat, k, sorted=False).values.min()
        lo = torch.topk(flat, k, largest=False, sorted=False).values.max()
        n = self._calib_n
        if n == 0:
            self.lo.copy_(lo); self.hi.copy_(hi)
        else:  # running mean of per-batch percentiles
            self.lo.mul_(n / (n + 1)).add_(lo / (n + 1)); self.hi.mul_(n / (n + 1)).add_(hi / (n + 1))
        self._calib_n = n + 1
        if not self.ready:
            self._mark(True)

    @torch.no_grad()
    def _observe_ema(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if not self.ready:
            self.lo.copy_(lo); self.hi.copy_(hi); self._mark(True)
        else:
            m = self.momentum
            self.lo.mul_(m).add_((1 - m) * lo); self.hi.mul_(m).add_((1 - m) * hi)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = act_qrange(self.bits)
        scale, zp = act_scale_zp(self.lo, self.hi, self.bits)
        return STEActivation.apply(x, scale, zp, qmin, qmax)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "observe":
            self._observe_percentile(x)
            return x
        if mode == "qat":
            if self.training:
                self._observe_ema(x)
            return self.fake_quant(x) if self.ready else x
        if mode == "deploy" and self.ready:
            return self.fake_quant(x)
        return x


class _QuantMixin:
    qmode: str
    wq: WeightQuantizer
    aq: ActQuantizer

    def _init_quant(self, w_bits: int, a_bits: int) -> None:
        self.qmode = "fp"
        self.wq = WeightQuantizer(self.weight.shape[0], w_bits)  # type: ignore[attr-defined]
        self.aq = ActQuantizer(a_bits)

    def _bias(self) -> torch.Tensor | None:
        """The bias the forward adds: in deploy mode with a deployed input range, on the integer
        accumulator's grid (:func:`bias_codes`), as an integer kernel adds it."""
        if self.bias is None or self.qmode != "deploy" or not self.aq.ready:  # type: ignore[attr-defined]
            return self.bias  # type: ignore[attr-defined]
        codes, scale = bias_codes(self)
        return codes.float() * scale


class QConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._conv_forward(self.aq(x, self.qmode), self.wq(self.weight, self.qmode), self._bias())


class QLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(self.aq(x, self.qmode), self.wq(self.weight, self.qmode), self._bias())


QUANT_LAYERS = (QConv2d, QLinear)


def prepare_model(model: nn.Module, w_bits: int = 8, a_bits: int = 8, first_last_bits: int = 0) -> nn.Module:
    """Turn every Conv2d/Linear of ``model`` into its quantizable twin, in place."""
    for module in list(model.modules()):
        if type(module) is nn.Conv2d:
            module.__class__ = QConv2d
        elif type(module) is nn.Linear:
            module.__class__ = QLinear
        else:
            continue
        module._init_quant(w_bits, a_bits)  # type: ignore[union-attr]
    model.__dict__["_fedhq_qlayers"] = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    set_bits(model, w_bits, a_bits, first_last_bits)
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, _QuantMixin]]:
    """The model's quantizable layers by name; a prepared model keeps the list (clients call this
    several times each, and walking the module tree was a visible share of a small client's cost)."""
    cached = model.__dict__.get("_fedhq_qlayers")
    if cached is not None:
        return cached
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def set_bits(model: nn.Module, w_bits: int, a_bits: int, first_last_bits: int = 0) -> None:
    """Set bit-widths; with ``first_last_bits`` > 0 the first and last layers keep that width."""
    layers = quant_layers(model)
    for i, (_, m) in enumerate(layers):
        edge = first_last_bits > 0 and i in (0, len(layers) - 1)
        m.wq.bits = first_last_bits if edge else w_bits
        m.aq.bits = first_last_bits if edge else a_bits


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for _, m in quant_layers(model):
        m.qmode = mode


def configure_observers(model: nn.Module, momentum: float, percentile: float) -> None:
    for _, m in quant_layers(model):
        m.aq.momentum = momentum
        m.aq.percentile = percentile


def init_weight_steps(model: nn.Module) -> None:
    for _, m in quant_layers(model):
        m.wq.init_from(m.weight)


def reset_act_ranges(model: nn.Module) -> None:
    for _, m in quant_layers(model):
        m.aq.reset()


def get_act_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(m.aq.lo), float(m.aq.hi)) for n, m in quant_layers(model) if m.aq.ready}


def set_act_ranges(model: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    for n, m in quant_layers(model):
        if n in ranges:
            m.aq.set_range(*ranges[n])
        else:
            m.aq.reset()


def get_weight_steps(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.wq.step.detach().abs().clone() for n, m in quant_layers(model)}


def set_weight_steps(model: nn.Module, steps: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in quant_layers(model):
            if n in steps:
                m.wq.step.copy_(steps[n].to(m.wq.step.device))
            else:
                m.wq.init_from(m.weight)


def is_quant_state_key(key: str) -> bool:
    return ".wq." in key or ".aq." in key or key.startswith(("wq.", "aq."))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights and buffers (what FedAvg averages), quantizer state excluded."""
    return {k: v for k, v in model.state_dict().items() if not is_quant_state_key(k)}


def _state_refs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters and buffers by state key (quantizer state excluded), kept on
    the model: loading the global state into a pooled model is then one copy per tensor."""
    refs = model.__dict__.get("_fedhq_state_refs")
    if refs is None:
        refs = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_quant_state_key(k)}
        model.__dict__["_fedhq_state_refs"] = refs
    return refs


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    refs = _state_refs(model)
    if refs.keys() == state.keys() and all(r.shape == state[k].shape for k, r in refs.items()):
        with torch.no_grad():
            for k, r in refs.items():
                r.copy_(state[k])
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_quant_state_key(k)]
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")


def prepare_deploy(model: nn.Module, ranges: dict[str, tuple[float, float]] | None,
                   steps: dict[str, torch.Tensor] | None = None) -> None:
    """Quantize the model for deployment: the given weight steps (else MSE-optimal scales of the
    current weights) and the given activation ranges."""
    if steps:
        set_weight_steps(model, steps)
    else:
        init_weight_steps(model)
    if ranges is not None:
        set_act_ranges(model, ranges)
    set_mode(model, "deploy")


def weight_codes(m: _QuantMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantizable layer's weights as int8 codes and their per-output-channel steps: the integers
    its deploy forward rounds to (the int form and the ONNX export both store these)."""
    qmin, qmax = weight_qrange(m.wq.bits)
    step = m.wq.step.detach().abs().clamp_min(1e-8)
    w = m.weight.detach()  # type: ignore[attr-defined]
    return quantize(w, step.view(-1, *([1] * (w.dim() - 1))), 0.0, qmin, qmax).to(torch.int8), step


def bias_codes(m: _QuantMixin, bias: torch.Tensor | None = None,
               w_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A deployed layer's bias as int32 codes at the accumulator's per-channel scale
    ``s_x * s_w``, the form an integer kernel (onnxruntime's QLinearConv/QGemm) adds: ``bias``
    (default: the layer's own) rounded half to even, in float32. ``w_scale`` replaces the
    layer's step (a BatchNorm folded into it scales the step)."""
    s_x, _ = act_scale_zp(m.aq.lo, m.aq.hi, m.aq.bits)
    step = m.wq.step.detach().abs().clamp_min(1e-8) if w_scale is None else w_scale
    scale = s_x.float() * step.float()
    b = (m.bias if bias is None else bias).detach().float()  # type: ignore[attr-defined]
    return torch.round(b / scale).clamp(-2 ** 31, 2 ** 31 - 256).to(torch.int32), scale


def integer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deployable int form of a deploy-prepared model: int8 weight tensors, scales and act ranges."""
    out: dict[str, torch.Tensor] = {}
    for n, m in quant_layers(model):
        codes, step = weight_codes(m)
        out[f"{n}.weight_int"] = codes
        out[f"{n}.weight_scale"] = step.clone()
        if m.bias is not None:
            out[f"{n}.bias"] = m.bias.detach().clone()
        out[f"{n}.act_range"] = torch.stack([m.aq.lo, m.aq.hi]).detach().clone()
    return out
