"""Device catalog, host profiling, the roofline speed model and the simulated clock."""
from .catalog import DEVICES, DeviceClass

_LAZY = {"ClientTime": "clock", "Fleet": "clock", "SimulatedClock": "clock", "predict_compute": "clock",
         "Measurement": "profile", "StepCounts": "profile", "count_step": "profile",
         "measure_host_peaks": "profile", "measure_step_times": "profile", "RooflineModel": "speed_model"}


def __getattr__(name: str):  # keep `import fedhq_core.hardware.catalog` free of torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["DEVICES", "DeviceClass", *_LAZY]
