"""What the server runs, traced and priced like the clients' work, on a server device class.

The server's share of a round is never this host's time: it is the price, on
``cfg.server_device`` (a catalog entry), of the very functions the server runs, traced op by op
by :class:`~fedhq_core.hardware.profile.TraceBook` like every client step kind:

* ``s_agg1``, ``s_agg2``, ``s_aggq``: :func:`fedhq_core.server.aggregate` (decode and dequantize
  each upload, FedAvg, ranges, QAT steps) over one PTQ upload, two PTQ uploads, and one PTQ plus
  one QAT upload, at the upload bits. The op count is linear in the uploads, so a round of
  ``p`` step-less and ``q`` QAT uploads costs ``base + p * d_ptq + q * d_qat`` with
  ``d_ptq = s_agg2 - s_agg1``, ``d_qat = s_aggq - s_agg1``, ``base = s_agg1 - d_ptq``.
* ``s_median2``, ``s_median3``, ``s_tmean2``, ``s_tmean3``: the robust aggregations
  (``aggregation: median | trimmed-mean``) over two and three uploads (priced linearly in the
  uploads from the two); ``s_norm``: one upload's update norm (the norm bound).
* ``s_gap``: :func:`fedhq_core.server.proxy_gap`, the master's quantization gap on the proxy split
  (FedHQ's fine stage reads it).
* ``s_calib``: :func:`fedhq_core.server.calibrate_on_server` on the proxy split (the deployment
  of the fp32 and fedfq baselines, whose clients send no ranges).
* ``s_proxy``: :func:`fedhq_core.server.evaluate_global` of a deployed master on the proxy split
  with MSE weight scales (the SigAcc pilot scores each branch's master every round).
* ``s_sens``: :func:`fedhq_core.server.upload_quant_loss`, one PTQ upload's quantization
  sensitivity measured on the proxy split (what FedHQ's fine stage reads; a baseline never pays).
* ``s_mom``: :func:`fedhq_core.server.server_momentum_step`, FedAvgM's momentum on the master
  (``server_momentum``), once a round.
* ``s_avg``: :func:`fedhq_core.server.running_average`, the deployed running average of the
  masters (``server_average``), once a round while it runs.
* ``s_mse``: :func:`fedhq_core.server.master_mse_steps`, the master's MSE weight scales (a
  hybrid round's deployed steps blend them in: ``server.blend_steps``).

Work in Python, numpy and scikit-learn (the decoding and checks of each upload, the FedHQ
allocator, its cost-model refits, SigAcc fits and predictions) has no torch op to trace: it runs
inside :class:`~fedhq_core.hardware.host_work.HostWork` operations, counted by kind and priced
from constants a micro-benchmark measured on a reference core (:mod:`.host_work`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .catalog import DeviceClass

ROBUST_KINDS = ("s_median2", "s_median3", "s_tmean2", "s_tmean3")
AGG_KINDS = ("s_agg1", "s_agg2", "s_aggq", *ROBUST_KINDS, "s_norm")   # traced at the upload bits (like ``pack``)
SERVER_KINDS = (*AGG_KINDS, "s_gap", "s_calib", "s_proxy", "s_sens", "s_mse", "s_mom", "s_avg")

def gbr_fit_elements(n_rows: int, n_features: int, n_estimators: int = 80, depth: int = 2, fits: int = 1) -> float:
    """A gradient-boosting fit's counted elements (kind ``gbr_fit``, one call a fit): per tree,
    split search over every feature of the rows at each level (a sort per feature: n log2 n)."""
    import math

    return fits * n_estimators * depth * n_features * n_rows * max(1.0, math.log2(max(n_rows, 2)))


def gbr_predict_elements(n_rows: int, n_estimators: int = 80) -> float:
    """A gradient-boosting prediction's counted elements (kind ``gbr_predict``): a tree walk a row."""
    return float(n_rows * n_estimators)


def synthetic_upload(state: dict[str, torch.Tensor], ranges: dict[str, tuple[float, float]], bits: int,
                     g: torch.Generator, cid: int = 0, steps: dict[str, torch.Tensor] | None = None) -> object:
    """A client's upload of a small random update of ``state`` at ``bits`` (a QAT one with
    ``steps``): what the server's traced kinds and the host-work benchmark decode and aggregate."""
    from ..client import ClientResult
    from ..quant import pack_update

    local = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    payload = pack_update(local, state, bits, g, ranges, n_samples=10, weight_steps=steps)
    return ClientResult(cid, "qat" if steps else "ptq", payload, 10, {}, 0.0)


def server_runner(model: nn.Module, kind: str, n: int, in_shape: tuple[int, ...], num_classes: int,
                  bits: int = 8, seed: int = 0) -> Callable[[], object]:
    """The server's own function for ``kind`` on synthetic inputs of the run's shapes (see the
    module docstring): ``n`` proxy samples, or ``bits`` for the aggregation kinds."""
    from ..quant import get_weight_steps, init_weight_steps, model_state, quant_layers
    from ..server import (aggregate, calibrate_on_server, evaluate_global, master_mse_steps, proxy_gap,
                          running_average, server_momentum_step, update_norm, upload_quant_loss)

    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model_state(model).items()}
    if kind in AGG_KINDS or kind == "s_sens":
        ranges = {name: (0.0, 1.0) for name, _ in quant_layers(model)}
        init_weight_steps(model)
        steps = get_weight_steps(model)

        def upload(cid: int, qat: bool) -> object:
            return synthetic_upload(state, ranges, bits, g, cid, steps if qat else None)

        results = [upload(0, False)] + ([upload(1, False)] if kind == "s_agg2" else
                                        [upload(1, True)] if kind == "s_aggq" else [])
        # with the default bound (the median checks run under three uploads too, only excluding nothing)
        fn: Callable[[], object] = lambda: aggregate(state, None, results, bound=3.0)  # noqa: E731
        if kind in ROBUST_KINDS:
            method = "median" if "median" in kind else "trimmed-mean"
            results = [upload(i, False) for i in range(int(kind[-1]))]
            fn = lambda: aggregate(state, None, results, method, bound=3.0)  # noqa: E731
        elif kind == "s_norm":
            fn = lambda: update_norm(results[0])  # noqa: E731
        if kind == "s_sens":
            x = torch.randn(max(1, n), *in_shape, generator=g)
            y = torch.randint(0, num_classes, (max(1, n),), generator=g)
            fn = lambda: upload_quant_loss(model, state, results[0], x, y)  # noqa: E731
    else:
        x = torch.randn(max(1, n), *in_shape, generator=g)
        y = torch.randint(0, num_classes, (max(1, n),), generator=g)
        if kind == "s_gap":
            fn = lambda: proxy_gap(model, state, x, y)  # noqa: E731
        elif kind == "s_mse":
            fn = lambda: master_mse_steps(model, state)  # noqa: E731
        elif kind == "s_mom":
            new = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
            _, vel = server_momentum_step(state, new, None, 0.9, 0.1)
            fn = lambda: server_momentum_step(state, new, vel, 0.9, 0.1)  # noqa: E731 (vel is read, not changed)
        elif kind == "s_avg":
            fn = lambda: running_average(state, state, 2)  # noqa: E731
        elif kind == "s_calib":
            fn = lambda: calibrate_on_server(model, state, x)  # noqa: E731
        elif kind == "s_proxy":
            ranges = calibrate_on_server(model, state, x)
            fn = lambda: evaluate_global(model, state, ranges, x, y)  # noqa: E731
        else:
            raise ValueError(f"kind: unknown server kind {kind!r}")
    fn()
    return fn


@dataclass
class ServerPricing:
    """Simulated seconds of the server's work on its device class (deterministic)."""

    speed: object              # RooflineModel
    device: DeviceClass
    n_proxy: int               # size of the server's proxy split

    def _t(self, kind: str, batch: int) -> float:
        return self.speed.step_time(kind, batch, self.device)   # type: ignore[attr-defined]

    def aggregate_s(self, n_plain: int, n_qat: int, bits: int, method: str = "fedavg",
                    norm_checks: int = 0) -> float:
        """Aggregating ``n_plain`` decoded uploads without weight steps and ``n_qat`` with (FedAvg,
        or a robust ``method``), after ``norm_checks`` update norms (the norm bound). Decoding and
        checking the uploads is host work, priced where it runs (``Dispatch.accept``)."""
        n = n_plain + n_qat
        if n == 0:
            return 0.0
        a1, a2, aq = (self._t(k, bits) for k in AGG_KINDS[:3])
        d_plain, d_qat = a2 - a1, aq - a1
        traced = (a1 - d_plain) + n_plain * d_plain + n_qat * d_qat
        if method != "fedavg":   # the robust master instead of FedAvg's (QAT steps still averaged: d_qat)
            tag = "median" if method == "median" else "tmean"
            r2, r3 = self._t(f"s_{tag}2", bits), self._t(f"s_{tag}3", bits)
            traced = r2 + (n - 2) * (r3 - r2) + n_qat * d_qat
        return traced + norm_checks * self._t("s_norm", bits)

    def gap_s(self) -> float:
        return self._t("s_gap", self.n_proxy)

    def calib_s(self) -> float:
        return self._t("s_calib", self.n_proxy)

    def proxy_s(self) -> float:
        return self._t("s_proxy", self.n_proxy)

    def mse_s(self) -> float:
        return self._t("s_mse", 1)

    def momentum_s(self) -> float:
        return self._t("s_mom", 1)

    def average_s(self) -> float:
        return self._t("s_avg", 1)

    def sens_s(self) -> float:
        """One PTQ upload's sensitivity measurement (at the run's upload bits: traced at 8)."""
        return self._t("s_sens", self.n_proxy)

    def partial_s(self, n_ptq: int, n_qat: int, bits: int) -> float:
        """The round's QAT and PTQ partial aggregates of already decoded uploads, each deployed
        and scored on the proxy split (``server.partial_gain``)."""
        return self.aggregate_s(n_ptq, 0, bits) + self.aggregate_s(0, n_qat, bits) + 2 * self.proxy_s()
