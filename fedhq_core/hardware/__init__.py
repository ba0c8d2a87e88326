"""Device catalog, op traces, the per-op roofline speed model and the simulated clock."""
from .catalog import DEVICES, DeviceClass

_LAZY = {"ClientTime": "clock", "Fleet": "clock", "SimulatedClock": "clock", "predict_compute": "clock",
         "TraceBook": "profile", "measure_kinds": "profile", "measure_host_peaks": "profile",
         "step_runner": "profile", "RooflineModel": "speed_model", "price_trace": "speed_model",
         "fit_host": "speed_model", "OpTracer": "trace", "StepTrace": "trace"}


def __getattr__(name: str):  # keep `import fedhq_core.hardware.catalog` free of torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["DEVICES", "DeviceClass", *_LAZY]
