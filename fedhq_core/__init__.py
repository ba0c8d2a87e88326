"""FedHQ core library: hybrid runtime quantization for federated learning.

Depends on torch, numpy and scikit-learn only (no Prefect, no MLflow), so it runs from a
notebook::

    from fedhq_core import ExperimentConfig, run
    sim = run(ExperimentConfig(rounds=5, tracking=False))
    print(sim.summary()["final_acc_q"])
"""
from .config import ExperimentConfig, load_config
from .errors import ConfigError, DataError


def __getattr__(name: str):  # torch is imported only when the simulation is used
    if name == "Simulation":
        from .simulation import Simulation

        return Simulation
    if name == "run":
        from .loop import run

        return run
    raise AttributeError(name)


__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ExperimentConfig", "load_config", "Simulation", "run", "__version__"]
