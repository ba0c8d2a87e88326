"""The client's upload: its model *update* quantized at ``upload_bits`` with stochastic rounding,
really bit-packed into bytes, plus its activation ranges.

Floating tensors of >= 2 dims get one symmetric scale per output row; 1-D tensors one scale.
At 16/32 bits the update is sent as float16/float32 bytes. Stochastic rounding
(``floor(x/s + u)``, ``u ~ U[0,1)``) keeps ``E[dequantize(q)] = x``, so small updates do not
round away on average. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are not sent.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PackedTensor:
    data: bytes | np.ndarray  # the packed bytes (a uint8 array when decoded from an upload)
    scale: np.ndarray        # float32, one per row (or one), empty for float payloads
    shape: tuple[int, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return (self.data.nbytes if isinstance(self.data, np.ndarray) else len(self.data)) + int(self.scale.nbytes)


@dataclass
class Payload:
    """What one client uploads in one round."""

    tensors: dict[str, PackedTensor]
    act_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_samples: int = 0
    weight_steps: dict[str, np.ndarray] = field(default_factory=dict)  # QAT's learned per-channel steps

    @property
    def nbytes(self) -> int:
        # activation ranges travel as two float32 each, weight steps as float32
        return (sum(t.nbytes for t in self.tensors.values()) + 8 * len(self.act_ranges)
                + sum(int(v.nbytes) for v in self.weight_steps.values()))


def packed_layout(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """(data bytes, number of float32 scales) of a tensor of ``shape`` packed at ``bits``."""
    n = int(np.prod(shape)) if shape else 1
    if bits >= 16:
        return n * bits // 8, 0
    return math.ceil(n * bits / 8), (shape[0] if len(shape) >= 2 else 1)


# A decoded upload's bytes are a read-only numpy view; torch reads it without writing (one warning
# per process otherwise).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(values: torch.Tensor, bits: int) -> bytes:
    """Pack unsigned integers < 2**bits (a uint8 tensor) into ``ceil(n*bits/8)`` bytes, MSB
    first (``np.packbits`` layout). Written in torch ops so the device's packing is traced and
    priced like every other step (``hardware.trace``)."""
    v = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return v.numpy().tobytes()
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    planes = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)            # (n * bits,), MSB first
    pad = (-planes.numel()) % 8
    if pad:
        planes = torch.cat([planes, planes.new_zeros(pad)])
    return (planes.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8).numpy().tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:n].copy()
    planes = np.unpackbits(raw)[: n * bits].reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - bits:] = planes
    return np.packbits(full, axis=1).reshape(-1)


def _rounding_noise(n: int, offset: float, gen: torch.Generator | None) -> torch.Tensor:
    """``offset`` plus ``n`` uniform draws on the 16-bit grid ``(k + 0.5) / 65536`` in ``(0, 1)``:
    four draws per 64-bit random word (a quarter of the generator calls of ``torch.rand``;
    stochastic rounding stays unbiased to within 2**-17 of a step)."""
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), generator=gen, dtype=torch.int64)  # every bit drawn
    return torch.add(words.view(torch.int16)[:n], 32768.5 + 65536 * offset).mul_(1.0 / 65536)


def quantize_tensors(xs: dict[str, torch.Tensor], bits: int, gen: torch.Generator | None) -> dict[str, PackedTensor]:
    """Quantize every tensor of ``xs`` at ``bits`` in one vectorised pass (one noise draw for all
    of them, one fused scale-and-round per tensor, one clamp and cast for all), then pack each
    tensor into its own bytes."""
    xs = {k: v.detach().float().cpu() for k, v in xs.items()}
    if bits >= 16:
        dtype = torch.float16 if bits == 16 else torch.float32
        return {k: PackedTensor(x.to(dtype).numpy().tobytes(), np.zeros(0, np.float32), tuple(x.shape), bits)
                for k, x in xs.items()}
    qmax = 2 ** (bits - 1) - 1
    rows = {k: x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1) for k, x in xs.items()}
    scales = {k: (r.abs().amax(dim=1) / qmax).clamp_min(1e-12) for k, r in rows.items()}
    sizes = [r.numel() for r in rows.values()]
    # q = floor(x / s + u) + qmax + 1, in 1 .. 2 qmax + 1: |x| / s <= qmax and u in (0, 1), so the
    # value is positive and the cast's truncation is the floor
    y = _rounding_noise(sum(sizes), qmax + 1, gen)
    for (k, r), part in zip(rows.items(), y.split(sizes)):
        torch.addcmul(part.view(r.shape), r, (1.0 / scales[k]).unsqueeze(1), out=part.view(r.shape))
    q = y.clamp_(1, 2 * qmax + 1).to(torch.int32).to(torch.uint8)  # (float -> uint8 directly is slower)
    return {k: PackedTensor(pack_bits(part, bits), scales[k].numpy().copy(), tuple(x.shape), bits)
            for (k, x), part in zip(xs.items(), q.split(sizes))}


def finite_payload(p: PackedTensor) -> bool:
    """True when every dequantized value of ``p`` is finite, without dequantizing: an integer
    code times a finite scale is finite unless the scale times the largest code overflows."""
    if p.bits >= 16:
        return bool(np.isfinite(np.frombuffer(p.data, dtype=np.float16 if p.bits == 16 else np.float32)).all())
    with np.errstate(over="ignore"):
        return bool(np.isfinite(p.scale * np.float32(2 ** (p.bits - 1))).all())


def _raw_bytes(p: PackedTensor) -> torch.Tensor:
    """The packed bytes as a uint8 tensor, without a copy (never written to)."""
    arr = p.data if isinstance(p.data, np.ndarray) else np.frombuffer(p.data, dtype=np.uint8)
    return torch.from_numpy(arr)


def dequantize_tensor(p: PackedTensor) -> torch.Tensor:
    """The update tensor of ``p``. Written in torch ops (as :func:`pack_bits` is), so the
    server's decoding is traced and priced like the clients' work (``hardware.server_work``)."""
    raw = _raw_bytes(p)
    if p.bits >= 16:
        return raw.view(torch.float16 if p.bits == 16 else torch.float32).to(torch.float32, copy=True).reshape(p.shape)
    n = int(np.prod(p.shape)) if p.shape else 1
    qmax = 2 ** (p.bits - 1) - 1
    if p.bits == 8:
        codes = raw[:n].to(torch.float32)
    else:   # MSB-first bit planes (np.packbits layout), ``bits`` planes per value
        planes = ((raw.unsqueeze(1) >> _SHIFTS8) & 1).reshape(-1)[: n * p.bits].reshape(n, p.bits)
        codes = (planes.to(torch.float32) * _PLANE_WEIGHTS[8 - p.bits:]).sum(dim=1)
    rows = (codes - (qmax + 1)).reshape(len(p.scale), -1) * torch.from_numpy(p.scale)[:, None]
    return rows.reshape(p.shape)


_SHIFTS8 = torch.arange(7, -1, -1, dtype=torch.uint8)
_PLANE_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.float32)


FULL_PRECISION = ("running_mean", "running_var")   # BatchNorm statistics: a few floats a channel


def tensor_bits(name: str, bits: int) -> int:
    """The bits a state tensor travels at: ``bits``, but BatchNorm statistics at 32. A variance
    sent as a stochastically rounded 8-bit delta can average below zero (seen on ResNet-18), and a
    clamp to 0 then scales that channel by 1/sqrt(eps); at full precision an average of
    variances stays one. They are two values a channel, next to the channel's weights."""
    return 32 if name.endswith(FULL_PRECISION) else bits


def pack_update(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor], bits: int | dict[str, int],
                gen: torch.Generator | None = None, act_ranges: dict[str, tuple[float, float]] | None = None,
                n_samples: int = 0, weight_steps: dict[str, torch.Tensor] | None = None) -> Payload:
    """Quantize ``local - global`` for every floating tensor (at :func:`tensor_bits`). ``bits`` may
    be per tensor (fedfq)."""
    deltas: dict[int, dict[str, torch.Tensor]] = {}   # by upload bits (per tensor under fedfq)
    for k, v in local.items():
        if v.is_floating_point():
            b = tensor_bits(k, bits[k] if isinstance(bits, dict) else bits)
            deltas.setdefault(b, {})[k] = v.detach().cpu() - global_[k].detach().cpu()
    packed = {k: p for b, group in deltas.items() for k, p in quantize_tensors(group, b, gen).items()}
    tensors = {k: packed[k] for k in local if k in packed}
    steps = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in (weight_steps or {}).items()}
    return Payload(tensors, dict(act_ranges or {}), n_samples, steps)


def unpack_update(payload: Payload) -> dict[str, torch.Tensor]:
    return {k: dequantize_tensor(p) for k, p in payload.tensors.items()}
