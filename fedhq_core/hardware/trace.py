"""Op-level trace of what a client really runs.

Every step kind a client runs (FP32 train step, QAT train step, forward-only evaluation, PTQ
calibration forward, PTQ weight-scale search, upload packing) is run once under a
``TorchDispatchMode`` that sees each aten op *below* autograd, whatever the model's module
structure: nothing a step does on tensors escapes it. For each op that does work it records

* FLOPs: torch's ``flop_counter`` formulas for conv/matmul; ``n log2 n`` comparisons for sorts
  (``torch.quantile`` sorts); output elements for pointwise ops and reductions;
* bytes read + written: the sizes of its tensor inputs and outputs (an in-place op reads and
  writes its target, so it counts twice);
* one launch, tagged by where it was issued from: ``py`` (forward code, custom autograd
  Functions' backward, the optimizer) or ``engine`` (backward ops the autograd engine issues),
  and by phase (forward, backward, optimizer);
* whether it is a device sync (``_local_scalar_dense``: ``float(t)``, ``bool(t)``, ``.item()``).

Views and metadata ops do no work and are left out; allocations (``empty*``) too. In-place
writes are kept (the schema's ``alias_info.is_write``), or momentum and EMA updates would vanish.
Counts are linear in batch size for the train and forward steps; :meth:`LinearTrace.fit` takes
traces at two batch sizes, checks that the op sequence is the same, and extrapolates. Kinds that are not
linear (the activation-quantile subsample of PTQ calibration) are traced at the batch sizes
actually used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# Ops that allocate or inspect but launch no kernel.
_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
            "size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "is_contiguous",
            "sym_is_contiguous", "storage_offset", "sym_storage_offset", "is_same_size", "is_nonzero_meta",
            "_has_compatible_shallow_copy_type", "lift_fresh", "record_stream"}
SYNC_OPS = {"_local_scalar_dense"}
# Comparison sorts do n*log2(n) work, not n: ``torch.quantile`` (PTQ calibration) sorts.
SORT_OPS = {"sort", "topk", "kthvalue", "median", "nanmedian", "msort", "argsort"}


def _is_view_or_meta(func: Any) -> bool:
    """True for ops that do no work: views (outputs alias an input, read-only), in-place view
    ops (``squeeze_``: metadata only), and allocations/inspections."""
    name = func._overloadpacket.__name__
    if name in SYNC_OPS:
        return False
    if name in _NO_WORK or torch.Tag.inplace_view in func.tags:
        return True
    rets = func._schema.returns
    if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
        return True
    return False


def _tensor_bytes(obj: Any) -> tuple[int, int]:
    """(bytes, elements) of every tensor in a nested structure."""
    leaves, _ = tree_flatten(obj)
    b = e = 0
    for t in leaves:
        if isinstance(t, torch.Tensor):
            b += t.numel() * t.element_size()
            e += t.numel()
    return b, e


@dataclass
class StepTrace:
    """One traced step: parallel arrays, one entry per op that does work."""

    kind: str
    batch: int
    names: list[str]
    flops: np.ndarray
    bytes: np.ndarray
    mm: np.ndarray          # bool: conv/matmul class (flop formula) vs pointwise/reduction
    engine: np.ndarray      # bool: issued by the autograd engine (else from Python)
    sync: np.ndarray        # bool: a device sync
    phase: list[str]

    @property
    def n_ops(self) -> int:
        return len(self.names)

    def totals(self) -> dict[str, float]:
        return {"ops": float(self.n_ops), "ops_engine": float(self.engine.sum()), "syncs": float(self.sync.sum()),
                "flops": float(self.flops.sum()), "bytes": float(self.bytes.sum())}


class OpTracer(TorchDispatchMode):
    """Record every aten op that does work (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.flops: list[float] = []
        self.bytes: list[float] = []
        self.mm: list[bool] = []
        self.engine: list[bool] = []
        self.sync: list[bool] = []
        self.phase: list[str] = []
        self._in_optimizer = False
        self._hooks: list[Any] = []

    def __enter__(self):
        # The optimizer's ops are tagged by torch's global optimizer step hooks: no client code
        # needs to know it is being traced.
        def pre(*_a, **_k):
            self._in_optimizer = True

        def post(*_a, **_k):
            self._in_optimizer = False

        self._hooks = [register_optimizer_step_pre_hook(pre),
                       register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        node = torch._C._current_autograd_node()
        out = func(*args, **kwargs)
        if _is_view_or_meta(func):
            return out
        packet = func._overloadpacket
        name = packet.__name__
        b_in, _ = _tensor_bytes((args, kwargs))
        b_out, e_out = _tensor_bytes(out)
        if packet in flop_registry:
            flops, is_mm = float(flop_registry[packet](*args, **kwargs, out_val=out)), True
        elif name in SORT_OPS and isinstance(args[0], torch.Tensor):
            n = max(2, args[0].numel())
            flops, is_mm = float(n * np.log2(n)), False
        else:
            flops, is_mm = float(e_out), False
        in_backward = node is not None
        py_backward = in_backward and isinstance(node, torch.autograd.function.BackwardCFunction)
        self.names.append(name)
        self.flops.append(flops)
        self.bytes.append(float(b_in + b_out))
        self.mm.append(is_mm)
        self.engine.append(in_backward and not py_backward)
        self.sync.append(name in SYNC_OPS)
        self.phase.append("optimizer" if self._in_optimizer else "backward" if in_backward else "forward")
        return out

    def result(self, kind: str, batch: int) -> StepTrace:
        return StepTrace(kind, batch, list(self.names), np.asarray(self.flops, float), np.asarray(self.bytes, float),
                         np.asarray(self.mm, bool), np.asarray(self.engine, bool), np.asarray(self.sync, bool),
                         list(self.phase))


def trace(kind: str, batch: int, fn: Callable[[], Any]) -> StepTrace:
    """Run ``fn`` once under the tracer."""
    with OpTracer() as t:
        fn()
    return t.result(kind, batch)


@dataclass
class LinearTrace:
    """Per-op counts linear in batch size: ``flops = f0 + f1 * b`` (same for bytes)."""

    base: StepTrace
    f0: np.ndarray
    f1: np.ndarray
    b0: np.ndarray
    b1: np.ndarray

    @classmethod
    def fit(cls, lo: StepTrace, hi: StepTrace) -> "LinearTrace":
        if lo.names != hi.names:
            raise ValueError(f"{lo.kind}: op sequence depends on batch size; trace it at the sizes used")
        db = hi.batch - lo.batch
        f1 = (hi.flops - lo.flops) / db
        b1 = (hi.bytes - lo.bytes) / db
        return cls(lo, lo.flops - f1 * lo.batch, f1, lo.bytes - b1 * lo.batch, b1)

    def at(self, batch: int) -> StepTrace:
        t = self.base
        return StepTrace(t.kind, batch, t.names, self.f0 + self.f1 * batch, self.b0 + self.b1 * batch, t.mm,
                         t.engine, t.sync, t.phase)
