"""FedHQ core library: hybrid runtime quantization for federated learning.

Depends on torch, numpy and scikit-learn only (no Prefect, no MLflow), so it runs from a
notebook::

    from fedhq_core import run_experiment
    summary = run_experiment({"rounds": 5, "strategy": "fedhq"})
    print(summary["final_acc_q"])

(:func:`run` takes an :class:`ExperimentConfig` and returns the :class:`Simulation` itself.)
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
    if name in ("run_experiment", "experiment_config"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ExperimentConfig", "load_config", "Simulation", "run", "run_experiment",
           "experiment_config", "__version__"]
