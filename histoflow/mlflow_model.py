"""A trained MIL model as an MLflow ``pyfunc`` (models-from-code: this file is the model's code).

MLflow logs this file as text and runs it at load time (``mlflow.pyfunc.log_model(python_model=
<this file>)``), so loading needs no cloudpickle of a Python object; the weights are the fold
checkpoints as artifacts (``fold0``, ``fold1``, ... : plain state dicts, read with
``torch.load(weights_only=True)``) and ``meta`` (a JSON file: threshold, class names). A model
bundle (one checkpoint per fold, same format) is logged the same way.

Input: one slide's feature table (or several, told apart by ``slide_id``): one row per tile,
columns ``feature_0`` .. ``feature_{d-1}``. Output: one row per slide: ``prob`` (the mean of the
fold models' probabilities), ``prediction`` (1 at ``prob >= threshold``) and ``label`` (its
class name); the threshold is the one metrics.json reports for the model (its source is in
``meta``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

FEATURE_PREFIX = "feature_"


def feature_frame(features: np.ndarray, slide_id: str | None = None) -> pd.DataFrame:
    """A slide's tiles as the model's input table (``feature_0`` ..)."""
    features = np.asarray(features, dtype=np.float32)
    frame = pd.DataFrame(features, columns=[f"{FEATURE_PREFIX}{i}" for i in range(features.shape[1])])
    if slide_id is not None:
        frame.insert(0, "slide_id", str(slide_id))
    return frame


def feature_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if re.fullmatch(rf"{FEATURE_PREFIX}\d+", str(c))]
    return sorted(cols, key=lambda c: int(c[len(FEATURE_PREFIX):]))


class MILSlideModel(PythonModel):
    def load_context(self, context) -> None:
        from histoflow.mil.train import load_checkpoint

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        keys = sorted((k for k in context.artifacts if re.fullmatch(r"fold\d+", k)), key=lambda k: int(k[4:]))
        self.models = [load_checkpoint(context.artifacts[k])[0] for k in keys]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from histoflow.mil.train import predict_proba

        frame = pd.DataFrame(model_input)
        cols = feature_columns(frame)
        groups = frame.groupby("slide_id", sort=False) if "slide_id" in frame else [(None, frame)]
        slides, bags = [], []
        for slide_id, part in groups:
            slides.append(slide_id)
            bags.append(part[cols].to_numpy(dtype=np.float32))
        prob = np.mean([predict_proba(m, bags) for m in self.models], axis=0)
        threshold = float(self.meta["threshold"])
        prediction = (prob >= threshold).astype(np.int64)
        classes = self.meta.get("classes") or ["0", "1"]
        out = pd.DataFrame({"prob": prob.astype(np.float64), "prediction": prediction,
                            "label": [str(classes[p]) for p in prediction]})
        if "slide_id" in frame:
            out.insert(0, "slide_id", [str(s) for s in slides])
        return out


mlflow.models.set_model(MILSlideModel())
