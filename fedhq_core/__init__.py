"""FedHQ core library: hybrid runtime quantization for federated learning.

Depends on torch, numpy and scikit-learn only (no Prefect, no MLflow), so it runs from a
notebook::

    from fedhq_core import ExperimentConfig, run
    sim = run(ExperimentConfig(rounds=5))
    print(sim.summary()["final_acc_q"])
"""
from .config import ConfigError, ExperimentConfig, load_config
from .simulation import Simulation, run

__version__ = "0.1.0"
__all__ = ["ConfigError", "ExperimentConfig", "load_config", "Simulation", "run", "__version__"]
