"""Quantization primitives in plain torch ops.

``quantize``/``dequantize`` are the real integer round trip. The two autograd functions below
compute *exactly* ``dequantize(quantize(x))`` in their forward pass (tests check bit equality)
and differ only in their backward pass:

* :class:`LSQWeight` - learned step size quantization (Esser et al., 2020, "Learned Step Size
  Quantization"): straight-through gradient for ``x`` inside the range, and the LSQ gradient
  for the per-channel step, scaled by ``g = 1/sqrt(N * Q_p)``.
* :class:`STEActivation` - clipped straight-through estimator for activations whose range comes
  from an observer (EMA during QAT, percentiles during PTQ calibration).
"""
from __future__ import annotations

import math

import torch


def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range, e.g. 4 bits -> (-8, 7)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def act_qrange(bits: int) -> tuple[int, int]:
    """Unsigned asymmetric integer range, e.g. 8 bits -> (0, 255)."""
    return 0, 2 ** bits - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Real quantization: integers (as float tensor) ``clamp(round(x/scale) + zp, qmin, qmax)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    return (q - zero_point) * scale


def act_scale_zp(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric per-tensor range that always contains 0."""
    qmin, qmax = act_qrange(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


class LSQWeight(torch.autograd.Function):
    """Fake-quantize ``x`` with learnable ``step`` (broadcastable); zero point is 0."""

    @staticmethod
    def forward(ctx, x, step, qmin: int, qmax: int, grad_scale: float):  # type: ignore[override]
        q = quantize(x, step, 0.0, qmin, qmax)
        ctx.save_for_backward(x, step, q)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return dequantize(q, step, 0.0)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, step, q = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x / step
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad_out * inside
        # d(out)/d(step): round(v) - v inside the range, the clamp bound outside.
        dstep = torch.where(inside, q - v, q)
        grad_step = (grad_out * dstep * ctx.grad_scale).sum_to_size(step.shape)
        return grad_x, grad_step, None, None, None


class STEActivation(torch.autograd.Function):
    """Fake-quantize ``x`` with a fixed (observed) scale and zero point; clipped STE backward."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int):  # type: ignore[override]
        q = quantize(x, scale, zp, qmin, qmax)
        v = x / scale + zp
        ctx.save_for_backward((v >= qmin - 0.5) & (v <= qmax + 0.5))
        return dequantize(q, scale, zp)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None


def lsq_grad_scale(numel_per_step: int, bits: int) -> float:
    return 1.0 / math.sqrt(max(1, numel_per_step * weight_qrange(bits)[1]))


# candidates x weights evaluated per batch: 4 MiB temporaries stay in a CPU cache (16 MiB ran 4x
# slower on the development host)
_SEARCH_CHUNK_ELEMS = 1 << 20


def mse_weight_scale(w: torch.Tensor, bits: int, grid: int = 24) -> torch.Tensor:
    """Per-output-channel symmetric scale minimising ||w - Q(w)||^2 over clipping ratios.

    Returns shape (C,) for ``w`` of shape (C, ...). Candidate scales are ``a * max|w_c| / Q_p``
    for ``a`` in (0.15, 1]; at 2-4 bits the optimum clips the tails (a < 1), which is what makes
    the PTQ baseline fair against plain max-abs ranges. The candidates are evaluated in batches
    (one broadcast op per step for many candidates, not one per candidate): on a device each op
    is a launch, and a per-candidate loop was most of what PTQ's search cost. Ties go to the
    smallest ratio, as in a sequential scan.
    """
    qmin, qmax = weight_qrange(bits)
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1).clamp_min(1e-12)
    ratios = torch.linspace(0.15, 1.0, grid, dtype=flat.dtype, device=flat.device)
    per = max(1, min(grid, _SEARCH_CHUNK_ELEMS // max(1, flat.numel())))
    errs = []
    for i in range(0, grid, per):
        s = (ratios[i:i + per, None] * amax / max(qmax, 1)).unsqueeze(2)          # (G, C, 1)
        errs.append(((dequantize(quantize(flat, s, 0.0, qmin, qmax), s, 0.0) - flat) ** 2).sum(dim=2))
    best = torch.cat(errs).argmin(dim=0)                                          # first minimum
    return ratios[best] * amax / max(qmax, 1)
