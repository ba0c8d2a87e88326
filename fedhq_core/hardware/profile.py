"""Host profiling: count what a step does (FLOPs, bytes) and measure how long it takes.

* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real step.
* Bytes are counted from the tensors a step reads and writes: parameters ``P``, activations
  ``A`` (outputs of every leaf module, from forward hooks) and, for QAT, the quantized layers'
  weights ``Pq`` and inputs ``Aq`` over which fake-quant makes its extra element-wise passes.
* Host peak FLOP/s and memory bandwidth are *measured* (a matmul and a large copy), so the
  roofline fit's efficiencies are relative to what this host really does.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..quant import QConv2d, QLinear, init_weight_steps, reset_act_ranges, set_mode

MODES = ("fp32", "qat", "fwd")   # FP32 train step, QAT train step, forward-only pass (calibration)


@dataclass
class StepCounts:
    """Per-sample and fixed counts, so a step of batch ``b`` costs ``flops_per_sample * b`` FLOPs
    and ``bytes_fixed + bytes_per_sample * b`` bytes."""

    mode: str
    flops_per_sample: float
    bytes_fixed: float
    bytes_per_sample: float

    def flops(self, b: float) -> float:
        return self.flops_per_sample * b

    def bytes(self, b: float) -> float:
        return self.bytes_fixed + self.bytes_per_sample * b


@dataclass
class Measurement:
    mode: str
    batch_size: int
    seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, opt: torch.optim.Optimizer | None) -> None:
    if mode == "fwd":
        with torch.no_grad():
            model(x)
        return
    loss = F.cross_entropy(model(x), y)
    assert opt is not None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _prepare(model: nn.Module, mode: str) -> None:
    if mode == "qat":
        init_weight_steps(model)
        reset_act_ranges(model)
        set_mode(model, "qat")
        model.train()
    else:
        set_mode(model, "fp")
        model.train(mode != "fwd")


def count_step(model: nn.Module, in_shape: tuple[int, ...], num_classes: int, mode: str,
               device: torch.device) -> StepCounts:
    """Count FLOPs and bytes of one step in ``mode`` (linear in batch size: fitted from b=2, 4)."""
    counts = []
    for b in (2, 4):
        x = torch.randn(b, *in_shape, device=device)
        y = torch.randint(0, num_classes, (b,), device=device)
        _prepare(model, mode)
        act = {"A": 0, "Aq": 0}

        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                act["A"] += out.numel()
            if isinstance(mod, (QConv2d, QLinear)):
                act["Aq"] += inp[0].numel()

        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        opt = None if mode == "fwd" else torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        try:
            with FlopCounterMode(display=False) as fc:
                _step(model, x, y, mode, opt)
        finally:
            for h in handles:
                h.remove()
        p = sum(v.numel() for k, v in model.named_parameters() if ".wq." not in k)
        pq = sum(m.weight.numel() for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
        a, aq = act["A"], act["Aq"]
        if mode == "fwd":
            elems = p + a                                   # read weights, write activations
        else:
            elems = 8 * p + 3 * a                           # fwd + bwd + SGD-momentum update
            if mode == "qat":
                elems += 6 * pq + 5 * aq                    # fake-quant passes (fwd, bwd, observer)
        counts.append((b, float(fc.get_total_flops()), 4.0 * elems))
    (b1, f1, by1), (b2, f2, by2) = counts
    per_sample = (by2 - by1) / (b2 - b1)
    set_mode(model, "fp")
    return StepCounts(mode, f2 / b2, by1 - per_sample * b1, per_sample)


def measure_step_times(model: nn.Module, in_shape: tuple[int, ...], num_classes: int, batch_sizes: list[int],
                       reps: int, device: torch.device, modes: tuple[str, ...] = MODES) -> list[Measurement]:
    """Median wall time of real steps for every mode and batch size (after one warm-up step)."""
    out = []
    for mode in modes:
        for b in batch_sizes:
            x = torch.randn(b, *in_shape, device=device)
            y = torch.randint(0, num_classes, (b,), device=device)
            _prepare(model, mode)
            opt = None if mode == "fwd" else torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
            _step(model, x, y, mode, opt)
            times = []
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                _step(model, x, y, mode, opt)
                _sync(device)
                times.append(time.perf_counter() - t0)
            out.append(Measurement(mode, b, statistics.median(times)))
    set_mode(model, "fp")
    return out


def measure_host_peaks(device: torch.device, n: int = 512, copy_mb: int = 64) -> tuple[float, float]:
    """Measured peak FP32 FLOP/s (square matmul) and memory bandwidth (large copy) of this host."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best_f = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best_f = min(best_f, time.perf_counter() - t0)
    src = torch.empty(copy_mb * 2**20 // 4, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_c = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best_c = min(best_c, time.perf_counter() - t0)
    return 2 * n**3 / best_f, 2 * src.numel() * 4 / best_c
