"""What the server holds and does between rounds: the FP32 master, the clients' averaged
activation ranges and QAT weight steps, the quantization gaps it measured; aggregation, the
measurements on its proxy split, deployment and evaluation.

The proxy split (``server_calib``) is the server's own small slice of the training data: it
calibrates the fp32/fedfq deployment and, for FedHQ's allocator only, measures the master's
quantization gap and each PTQ upload's sensitivity. The test split is only ever evaluated; selections read the experimenter's validation split,
which is neither the proxy nor any client's.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .client import ClientResult, Mode
from .data import Split
from .phases import span
from .pricing import FleetPricing
from .quant import integer_weights, load_model_state, model_state, prepare_deploy, set_mode
from .measurements import DURING, Measurement
from .server import (aggregate, blend_steps, calibrate_on_server, evaluate_deployed, evaluate_global, master_mse_steps,
                     momentum_on, running_average, server_momentum_step)


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Temporarily use every core for intra-op parallelism (between rounds, when nothing else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# what one lineage of the master is: its weights, the clients' averaged ranges, the deployed weight
# steps and the server momentum's buffer (a fork holds a second set: ``ServerState.start_fork``)
LINEAGE = ("global_state", "global_ranges", "global_steps", "velocity")


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return value


def _part(tensors: dict[str, torch.Tensor], name: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds under ``name/`` (:meth:`ServerState.state_tensors`), keyed
    without it; moved to ``device`` when given."""
    p = name + "/"
    return {k[len(p):]: v if device is None else v.to(device) for k, v in tensors.items() if k.startswith(p)}


class ServerState:
    """The server of one run. ``calibrates``: the deployment is calibrated on the proxy split
    (the fp32 and fedfq baselines, whose clients send no ranges); ``aggregation`` and ``trim``:
    how the master is formed (``server.aggregate``)."""

    def __init__(self, eval_model: nn.Module, proxy: Split, test: Split, pricing: FleetPricing, calibrates: bool,
                 aggregation: str = "fedavg", trim: float = 0.2, bound: float = 0.0, val: Split | None = None,
                 measurements: Iterable[Measurement] = (), server_momentum: float = 0.0, server_lr: float = 1.0):
        self.eval_model, self.proxy, self.test, self.pricing = eval_model, proxy, test, pricing
        self.val = val               # the experimenter's validation split: what selections read (not priced)
        self.calibrates, self.aggregation, self.trim, self.bound = calibrates, aggregation, trim, bound
        self.global_state = {k: v.detach().clone() for k, v in model_state(eval_model).items()}
        self.global_ranges: dict[str, tuple[float, float]] | None = None
        self.global_steps: dict[str, torch.Tensor] | None = None
        self.server_momentum, self.server_lr = server_momentum, server_lr   # FedAvgM (off: 0 and 1)
        self.velocity: dict[str, torch.Tensor] | None = None                # its momentum buffer
        self.averaged: dict[str, torch.Tensor] | None = None   # the deployed running average of the masters (SWA)
        self.n_averaged = 0                                     # how many masters it holds
        self.measurements = {m.name: m for m in measurements}   # one of each registered (measurements.build)
        self.gap_s = 0.0             # priced seconds of the server's work done while this round's clients train
        self.carried_s = 0.0         # priced server work of this round done while the next one trains
        self.host_s = 0.0            # this host's seconds for the server's work of the round (a metric only)
        self.fork: dict[str, Any] | None = None   # fedhq's ``explore: fork``: the QAT lineage's master (LINEAGE)
        self.deploy_qat_lineage = False            # during a fork: the QAT lineage leads on the proxy split, deploy it

    # --- a fork: a second master, trained by the round's QAT clients alone -----------------------
    def start_fork(self) -> None:
        """From now on the round's QAT uploads train a copy of the master (the QAT lineage) and
        its PTQ uploads the master itself (the PTQ lineage), until :meth:`end_fork`."""
        self.fork = {k: _copy(getattr(self, k)) for k in LINEAGE}
        self.deploy_qat_lineage = False

    def end_fork(self, keep: str) -> None:
        """The fork ends: the lineage of mode ``keep`` goes on as the master, the other is dropped."""
        if self.fork is not None and keep == Mode.QAT:
            for k in LINEAGE:
                setattr(self, k, self.fork[k])
        self.fork, self.deploy_qat_lineage = None, False

    @contextlib.contextmanager
    def lineage(self, qat: bool) -> Iterator[None]:
        """Inside the block the master (weights, ranges, steps, momentum) is the QAT lineage's when
        ``qat`` and a fork runs (what the block changes stays with that lineage), else the master."""
        if not (qat and self.fork is not None):
            yield
            return
        main = {k: getattr(self, k) for k in LINEAGE}
        for k in LINEAGE:
            setattr(self, k, self.fork[k])
        try:
            yield
        finally:
            self.fork = {k: getattr(self, k) for k in LINEAGE}
            for k, v in main.items():
                setattr(self, k, v)

    # --- measurements on the proxy split (``fedhq_core.measurements``) -------------------------
    def measure(self, name: str, results: list[ClientResult] | None = None) -> float:
        """Run one measurement now; its priced seconds."""
        return self.measurements[name].measure(self, results or [])

    def read(self, name: str) -> Any:
        """What allocators may read of a measurement."""
        return self.measurements[name].read()

    @property
    def gaps(self) -> list[float]:
        """The master's quantization gap on the proxy split, per round it was measured."""
        return self.measurements["gap"].history

    @property
    def partials(self) -> list[float | None]:
        """QAT minus PTQ partial aggregates on the proxy split, per round it was measured (the
        configured ``online_statistic``)."""
        return self.measurements["partials"].gains()

    def take_records(self) -> dict[str, float]:
        """Every measurement's figures of this round, for its record."""
        return {k: v for m in self.measurements.values() for k, v in m.take().items()}

    # --- aggregation --------------------------------------------------------------------------
    def aggregate(self, results: list[ClientResult], measure: Iterable[str] = (), norm_checks: int = 0,
                  average: bool = False) -> float:
        """FedAvg into the master; returns the server's priced seconds after the uploads. First the
        measurements named in ``measure``, in registry order, on the master the clients started
        from: those taken while the round's clients train go to ``gap_s`` (priced, concurrent with
        their training on the clock), those carried into the next round to ``carried_s``. This
        host's time for all of it is kept in ``host_s`` (a metric, never on the clock). ``average``:
        the new master joins the deployed running average (``server_average``)."""
        assert self.pricing.server is not None, "profile() first"
        t0 = time.perf_counter()
        self.gap_s, self.carried_s = self.carried_s, 0.0
        wanted = set(measure)
        for m in self.measurements.values():
            if m.name in wanted:
                if m.when == DURING:
                    self.gap_s += m.measure(self, results)
                else:
                    self.carried_s += m.measure(self, results)
        with span("aggregate"):
            if self.fork is None:
                searched = self.aggregate_results(results)
                priced = self.pricing.aggregation_s(results, norm_checks, searched, average)
            else:      # each lineage aggregates its own uploads (a side without any keeps its master)
                priced, checks = 0.0, norm_checks    # the round's norm checks, billed once, with the first side
                for qat in (False, True):
                    side = [r for r in results if (r.strategy == Mode.QAT) == qat]
                    if side:
                        with self.lineage(qat):
                            priced += self.pricing.aggregation_s(side, checks, self.aggregate_results(side))
                        checks = 0
                if average:
                    priced += self.pricing.aggregation_s([], 0, False, True)
            if average:
                self.averaged, self.n_averaged = running_average(self.averaged, self.global_state, self.n_averaged)
        self.host_s = time.perf_counter() - t0
        return priced

    def aggregate_results(self, results: list[ClientResult]) -> bool:
        """FedAvg of the master, the clients' averaged ranges and deployed weight steps (the QAT
        clients' learned ones, blended in a hybrid round: ``server.blend_steps``). True when the
        steps bound searched the new master's MSE steps (``FleetPricing.aggregation_s`` prices it)."""
        # QAT clients' learned weight steps (None in a round without QAT: MSE scales then)
        searched: dict[str, dict[str, torch.Tensor]] = {}

        def reference(master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """What the QAT uploads' steps are bounded against: the steps the server deployed last
            (learned ones), or else the new master's MSE-optimal steps: the search a hybrid
            round's blend needs anyway, done once for both (priced: ``FleetPricing.aggregation_s``)."""
            if self.global_steps:
                return self.global_steps
            searched["mse"] = master_mse_steps(self.eval_model, master)
            return searched["mse"]

        qat = self.bound > 0 and any(r.payload.weight_steps for r in results)
        old = self.global_state
        self.global_state, self.global_ranges, learned = aggregate(
            self.global_state, self.global_ranges, results, self.aggregation, self.trim, self.bound,
            reference if qat else None)
        if results and momentum_on(self.server_momentum, self.server_lr):
            self.global_state, self.velocity = server_momentum_step(old, self.global_state, self.velocity,
                                                                    self.server_momentum, self.server_lr)
        self.global_steps = blend_steps(self.eval_model, self.global_state, learned, results, searched.get("mse"))
        return "mse" in searched

    # --- deployment and evaluation ------------------------------------------------------------
    @property
    def deployed_state(self) -> dict[str, torch.Tensor]:
        """The master the server deploys: the running average of the masters while
        ``server_average`` runs, else the latest master (the one the clients train from)."""
        return self.averaged if self.averaged is not None else self.global_state

    def deploy_ranges(self) -> dict[str, tuple[float, float]]:
        """The clients' averaged ranges; only when no client sent any (fp32, fedfq) is the proxy
        split used to calibrate."""
        if self.calibrates or self.global_ranges is None:
            with span("calibrate (server)"):
                return calibrate_on_server(self.eval_model, self.deployed_state, self.proxy.x)
        return self.global_ranges

    def evaluate(self, test: bool = True) -> dict[str, float]:
        """The deployed model on the test split (reported; with ``test``) and, with a validation
        split, its quantized accuracy and loss there (``val_acc_q``, ``val_loss_q``: what
        selections read). The experimenter's measurement, not the system's: no clock prices it."""
        with all_cores(), self.lineage(self.deploy_qat_lineage):  # no client trains: every core; a fork's leader
            if test or self.val is None:
                return evaluate_global(self.eval_model, self.deployed_state, self.deploy_ranges(), self.test.x,
                                       self.test.y, self.global_steps, self.val)
            return evaluate_deployed(self.eval_model, self.deployed_state, self.deploy_ranges(), self.val,
                                     self.global_steps)

    def deployed_bundle(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild the deployed quantized model, plus its int form."""
        with self.lineage(self.deploy_qat_lineage):
            ranges = self.deploy_ranges()
            load_model_state(self.eval_model, self.deployed_state)
            prepare_deploy(self.eval_model, ranges, self.global_steps)
            ints = integer_weights(self.eval_model)
            set_mode(self.eval_model, "fp")
            return {"meta": meta, "state": self.deployed_state, "steps": self.global_steps, "ranges": ranges,
                    "int_weights": ints}

    # --- checkpoints --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        fork = self.fork or {}
        parts = {"global": self.global_state, "steps": self.global_steps, "velocity": self.velocity,
                 "averaged": self.averaged, "fork_global": fork.get("global_state"),
                 "fork_steps": fork.get("global_steps"), "fork_velocity": fork.get("velocity")}
        return {f"{name}/{k}": v for name, part in parts.items() for k, v in (part or {}).items()}

    def state_meta(self) -> dict[str, Any]:
        fork = None if self.fork is None else {
            "has_steps": self.fork["global_steps"] is not None, "deploy_qat": self.deploy_qat_lineage,
            "ranges": None if self.fork["global_ranges"] is None else {k: list(v) for k, v in self.fork["global_ranges"].items()}}
        return {"has_steps": self.global_steps is not None, "carried_s": self.carried_s, "n_averaged": self.n_averaged,
                "fork": fork,
                **{m.state_key: m.state() for m in self.measurements.values() if m.state_key},
                "global_ranges": None if self.global_ranges is None else {k: list(v) for k, v in self.global_ranges.items()}}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`state_tensors` and :meth:`state_meta` of a run with this model."""
        from .errors import ConfigError

        master = _part(tensors, "global")
        if set(master) != set(self.global_state) or any(master[k].shape != v.shape for k, v in self.global_state.items()):
            raise ConfigError("checkpoint: its model does not match this run's model")
        device = next(iter(self.global_state.values())).device  # checkpoints hold CPU tensors
        self.global_state = {k: master[k].to(device=v.device, dtype=v.dtype) for k, v in self.global_state.items()}
        steps = _part(tensors, "steps", device)
        self.global_steps = steps if meta["has_steps"] else None
        self.velocity = _part(tensors, "velocity", device) or None
        self.averaged, self.n_averaged = _part(tensors, "averaged", device) or None, int(meta.get("n_averaged", 0))
        ranges = meta["global_ranges"]
        self.global_ranges = None if ranges is None else {k: (v[0], v[1]) for k, v in ranges.items()}
        for m in self.measurements.values():
            if m.state_key:
                m.load(meta.get(m.state_key, []))
        self.carried_s = float(meta.get("carried_s", 0.0))
        fork = meta.get("fork")
        if fork is not None:
            self.fork = {"global_state": {k: v.to(device=self.global_state[k].device, dtype=self.global_state[k].dtype)
                                          for k, v in _part(tensors, "fork_global").items()},
                         "global_steps": _part(tensors, "fork_steps", device) if fork["has_steps"] else None,
                         "velocity": _part(tensors, "fork_velocity", device) or None,
                         "global_ranges": None if fork["ranges"] is None else {k: (v[0], v[1]) for k, v in fork["ranges"].items()}}
            self.deploy_qat_lineage = bool(fork["deploy_qat"])
