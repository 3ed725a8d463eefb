"""The registered MLflow model's code (MLflow's models-from-code): what `mlflow.pyfunc.load_model(
"models:/efficientnet-b0@champion")` runs.

Logged as source, not pickled: loading it imports this file and reads the version's weights (`weights`, the
registered `state_dict.pt`: tensors and plain data, `models.checkpoint`), rebuilding the model through `models`,
which travels with it (code_paths). Input: float32 NCHW images, normalised as the version's
`model/preprocessing.json` says, at its eval resolution; output: logits, one row per image.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

WEIGHTS = "weights"  # the artifact key of the state_dict file


class EfficientNetClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        from models.checkpoint import model_from_checkpoint, read_checkpoint

        path = context.artifacts[WEIGHTS]
        self.model, self.spec, self.num_classes = model_from_checkpoint(read_checkpoint(path), path)

    # No type hints: MLflow reads a predict's hints as its input schema (and warns at ones it cannot use).
    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(EfficientNetClassifier())
