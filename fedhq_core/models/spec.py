"""What builds a run's model: :class:`ModelSpec` (the network, its input and classes, its bits and
observers) and :func:`deployed_model`, the deployed quantized model rebuilt from a run's bundle.
Models sit above ``quant`` (a spec prepares its network for quantization)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..quant import configure_observers, load_model_state, prepare_deploy, prepare_model
from . import build_model


@dataclass(frozen=True)
class ModelSpec:
    model: str
    in_shape: tuple[int, ...]
    num_classes: int
    w_bits: int
    a_bits: int
    first_last_bits: int
    ema_momentum: float
    act_percentile: float

    def build(self, device: torch.device) -> nn.Module:
        m = build_model(self.model, self.in_shape, self.num_classes)
        prepare_model(m, self.w_bits, self.a_bits, self.first_last_bits)
        configure_observers(m, self.ema_momentum, self.act_percentile)
        return m.to(device)


def deployed_model(bundle: dict[str, Any]) -> nn.Module:
    """The deployed model of a :meth:`Simulation.deployed_bundle` (``meta``, ``state``, ``steps``,
    ``ranges``), rebuilt in deploy mode on the CPU."""
    m = bundle["meta"]
    # the observers' settings do not matter in deploy mode (the ranges are loaded)
    model = ModelSpec(m["model"], tuple(m["in_shape"]), m["num_classes"], m["w_bits"], m["a_bits"],
                      m["first_last_bits"], 0.9, 99.99).build(torch.device("cpu"))
    load_model_state(model, {k: v.detach().cpu() for k, v in bundle["state"].items()})
    prepare_deploy(model, bundle.get("ranges") or None,
                   {k: v.detach().cpu() for k, v in bundle["steps"].items()} if bundle.get("steps") else None)
    return model.eval()
