"""MLflow models-from-code entry point of the registered global model (no pickled objects)."""
import mlflow.models

from tasks.pyfunc_model import GlobalModel

mlflow.models.set_model(GlobalModel())
