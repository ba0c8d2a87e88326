"""Device catalog, host profiling, the roofline speed model and the simulated clock."""
from .catalog import DEVICES, DeviceClass
from .clock import ClientTime, Fleet, SimulatedClock, predict_compute
from .profile import Measurement, StepCounts, count_step, measure_host_peaks, measure_step_times
from .speed_model import RooflineModel

__all__ = ["DEVICES", "DeviceClass", "ClientTime", "Fleet", "SimulatedClock", "predict_compute", "Measurement",
           "StepCounts", "count_step", "measure_host_peaks", "measure_step_times", "RooflineModel"]
