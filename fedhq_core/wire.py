"""A client's upload on the wire, and the server's checks before it may touch the global model.

A :class:`~fedhq_core.client.ClientResult` travels as ``bytes``: a magic line, a JSON header
(the result's metadata, and each tensor's dtype, shape and place) and the tensors' raw bytes
(:func:`save_wire`). Decoding reads numbers only, with numpy, from a whitelist of dtypes: no
pickle is involved, so a hostile client (or a compromised worker) can send garbage but not a
pickle gadget. It is about ten times faster than ``torch.save``/``torch.load`` on an upload.
:func:`decode_upload` then rejects, with a one-word reason:

* ``worker-lost`` - the worker process training it died, and Dask gave up on the task,
* ``size``      - more bytes than ``max_bytes`` (checked before decoding),
* ``decode``    - not a FedHQ upload at all,
* ``keys``      - missing or unexpected tensors,
* ``dtype``     - packed data that is not ``uint8``/float, scales that are not float32,
* ``shape``     - a tensor whose shape differs from the global model's, or data of the wrong length,
* ``nonfinite`` - NaN/Inf in the update, its scales, ranges or QAT steps,
* ``n_samples`` - a sample count outside ``1..max_samples`` (it weights FedAvg).

* ``norm``      - an update whose L2 norm is over ``norm_bound`` x the round's median update norm
                  (``dispatch.Dispatch.accept``, once every upload of the round is decoded).

These checks bound what one update can do, but a well-formed update can still pull the model
the wrong way: a finite update scaled by 100 passes every check above but ``norm``, and a
moderately scaled or sign-flipped one may pass that too. ``aggregation: trimmed-mean | median``
(``server.aggregate``) limits what the updates that pass can do (docs/operations.md).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from .client import STEP_KINDS, ClientResult
from .config import UPLOAD_BITS
from .quant.payload import PackedTensor, Payload, finite_payload, packed_layout

REJECT_REASONS = ("raised", "timeout", "worker-lost", "size", "decode", "keys", "dtype", "shape", "nonfinite", "n_samples",
                  "norm")


class RejectedUpdate(ValueError):
    """An upload the server refuses; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_wire(r: ClientResult) -> dict[str, Any]:
    """The plain-tensor form of a result; :func:`save_wire` turns it into the upload's bytes."""
    p = r.payload
    meta = {"cid": r.cid, "strategy": r.strategy, "n_samples": r.n_samples, "work": r.work, "train_loss": r.train_loss, "quant_loss": r.quant_loss,
            "wall_s": r.wall_s, "act_ranges": {k: list(v) for k, v in p.act_ranges.items()},
            "tensors": {k: {"shape": list(t.shape), "bits": t.bits} for k, t in p.tensors.items()}}
    return {"meta": json.dumps(meta),
            "data": {k: torch.frombuffer(bytearray(t.data), dtype=torch.uint8) for k, t in p.tensors.items()},
            "scale": {k: torch.from_numpy(np.array(t.scale, dtype=np.float32)) for k, t in p.tensors.items()},
            "steps": {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in p.weight_steps.items()}}


WIRE_MAGIC = b"FEDHQ-UPLOAD-1\n"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                                      torch.float16, torch.float32, torch.float64, torch.bool)}


def save_wire(obj: dict[str, Any]) -> bytes:
    """``{"meta": str, group: {name: tensor}}`` as magic + header length + JSON header + raw bytes.
    The header keeps whole values that are not groups (``values``) apart from the groups' entries
    (``groups``); an entry that is not a tensor goes into the header as it is (the decoder rejects it)."""
    values: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for group, items in obj.items():
        if not isinstance(items, dict):
            values[group] = items
            continue
        groups[group] = {}
        for name, t in items.items():
            if not isinstance(t, torch.Tensor):
                groups[group][name] = {"value": t}
                continue
            raw = t.detach().cpu().contiguous().numpy().tobytes()
            groups[group][name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                   "offset": offset, "nbytes": len(raw)}
            chunks.append(raw)
            offset += len(raw)
    head = json.dumps({"values": values, "groups": groups}).encode()
    return b"".join([WIRE_MAGIC, len(head).to_bytes(8, "little"), head, *chunks])


def load_wire(blob: bytes | bytearray) -> dict[str, Any]:
    """Inverse of :func:`save_wire`; raises ValueError on anything that is not such an upload."""
    if not blob.startswith(WIRE_MAGIC):
        raise ValueError("not a FedHQ upload (bad magic)")
    start = len(WIRE_MAGIC) + 8
    n = int.from_bytes(blob[len(WIRE_MAGIC):start], "little")
    if n > len(blob) - start:
        raise ValueError("header longer than the upload")
    header = json.loads(blob[start:start + n])
    body = bytearray(blob[start + n:])  # writable, so the tensors own their memory
    out: dict[str, Any] = dict(header["values"])
    for group, items in header["groups"].items():
        out[group] = {}
        for name, spec in items.items():
            if "value" in spec:
                out[group][name] = spec["value"]
                continue
            dtype = _DTYPES[spec["dtype"]]
            shape, off, nbytes = [int(d) for d in spec["shape"]], int(spec["offset"]), int(spec["nbytes"])
            count = math.prod(shape)
            if off < 0 or off + nbytes > len(body) or count * dtype.itemsize != nbytes:
                raise ValueError(f"{group}.{name}: {nbytes} bytes at {off} do not fit")
            out[group][name] = torch.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape) \
                if count else torch.empty(shape, dtype=dtype)
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def decode_upload(blob: bytes, expected: dict[str, tuple[int, ...]], *, max_bytes: int,
                  max_samples: int) -> ClientResult:
    """Safely decode and validate one upload against the global model's float tensor shapes.
    Anything malformed that the named checks do not catch is rejected as ``decode``."""
    try:
        return _decode(blob, expected, max_bytes, max_samples)
    except RejectedUpdate:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. a header of the wrong types
        raise RejectedUpdate("decode", f"malformed upload ({type(err).__name__}: {str(err)[:120]})") from None


def _decode(blob: bytes, expected: dict[str, tuple[int, ...]], max_bytes: int, max_samples: int) -> ClientResult:
    if not isinstance(blob, (bytes, bytearray)):
        raise RejectedUpdate("decode", f"expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise RejectedUpdate("size", f"{len(blob)} bytes > limit {max_bytes}")
    try:
        obj = load_wire(blob)
        meta = json.loads(obj["meta"])
        data, scale, steps = obj["data"], obj["scale"], obj.get("steps", {})
        specs = meta["tensors"]
    except Exception as err:  # noqa: BLE001 - any failure to parse is the client's fault
        raise RejectedUpdate("decode", f"{type(err).__name__}: {str(err)[:120]}") from None
    if set(specs) != set(expected) or set(data) != set(expected) or set(scale) != set(expected):
        missing = sorted(set(expected) - set(specs))
        extra = sorted((set(specs) | set(data) | set(scale)) - set(expected))
        raise RejectedUpdate("keys", f"missing {missing[:3]}, unexpected {extra[:3]}")
    tensors: dict[str, PackedTensor] = {}
    for k, shape in expected.items():
        spec, d, s = specs[k], data[k], scale[k]
        bits = spec.get("bits")
        if d.dtype != torch.uint8 or s.dtype != torch.float32 or bits not in UPLOAD_BITS:
            raise RejectedUpdate("dtype", f"{k}: data {d.dtype}, scale {s.dtype}, bits {bits!r}")
        if tuple(spec["shape"]) != tuple(shape):
            raise RejectedUpdate("shape", f"{k}: {tuple(spec['shape'])} != global {tuple(shape)}")
        want_bytes, want_scales = packed_layout(tuple(shape), bits)
        if d.numel() != want_bytes or s.numel() != want_scales:
            raise RejectedUpdate("shape", f"{k}: {d.numel()} bytes / {s.numel()} scales for {bits}-bit {tuple(shape)}")
        tensors[k] = PackedTensor(d.numpy(), s.numpy(), tuple(shape), int(bits))  # a view, no copy
        if not finite_payload(tensors[k]):
            raise RejectedUpdate("nonfinite", f"{k}: NaN or Inf in the update")
    ranges = {k: tuple(v) for k, v in meta.get("act_ranges", {}).items()}
    if not all(len(v) == 2 and _finite(v[0]) and _finite(v[1]) for v in ranges.values()):
        raise RejectedUpdate("nonfinite", "activation ranges")
    weight_steps = {}
    for k, v in steps.items():  # per-channel LSQ steps, keyed by layer name
        weight = expected.get(f"{k}.weight")
        if weight is None or v.dtype != torch.float32 or v.numel() not in (1, weight[0]):
            raise RejectedUpdate("keys" if weight is None else "dtype" if v.dtype != torch.float32 else "shape",
                                 f"QAT step {k}")
        if not bool(torch.isfinite(v).all()):
            raise RejectedUpdate("nonfinite", f"QAT step {k}")
        weight_steps[k] = v.numpy()
    n_samples = meta.get("n_samples")
    if not isinstance(n_samples, int) or not 1 <= n_samples <= max_samples:
        raise RejectedUpdate("n_samples", f"{n_samples!r} not in 1..{max_samples}")
    work = meta.get("work")
    if not isinstance(work, dict) or not set(work) <= set(STEP_KINDS) or not all(
            isinstance(v, list) and all(isinstance(b, int) and b >= 0 for b in v) for v in work.values()):
        raise TypeError("work: expected {step kind: [batch sizes]}")   # -> decode: malformed upload
    payload = Payload(tensors, ranges, n_samples, weight_steps)
    return ClientResult(int(meta["cid"]), str(meta["strategy"]), payload, n_samples,
                        {k: list(v) for k, v in work.items()},
                        float(meta["train_loss"]), meta["quant_loss"], float(meta["wall_s"]))
