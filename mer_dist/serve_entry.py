"""The pyfunc model as code (MLflow's models-from-code): the saved model carries this file, not a pickle, so
loading a received model runs no serialized object; the class lives in `mer_dist.serve`."""
import mlflow

from mer_dist.serve import EmotionModel

mlflow.models.set_model(EmotionModel())
