"""Classic slide classifiers (checklist item 9, beside MIL) on slide-level features: random
forest, gradient boosting and logistic regression, trained per fold on exactly the folds MIL
uses, so the two paths are compared on identical splits.

They train on honest features: a train-role slide's features come from tile probabilities of a
model that did not see that slide (cross-fitted over inner folds, :mod:`histoflow.crossfit`),
as a test slide's do; training on in-sample features is refused (:func:`check_honest_training`).

Targets (:mod:`histoflow.targets`): binary and multi-class use the classifiers (multi-class
predictions ``prob_<class>`` + ``pred``), regression their regressor twins (random forest,
gradient boosting, ridge for ``logreg``; predictions ``value``), survival their scikit-survival
twins (random survival forest, gradient-boosted Cox model, ridge-penalised Cox proportional hazards
for ``logreg``; predictions ``risk``, higher = earlier event, trained on the slides' time/event)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .config import defaults_from_schema, section_defaults

META_COLUMNS = ("slide_id", "patient_id", "y", "fold", "role", "tile_probs_model", "time", "event")
CLASSIFIERS = ("rf", "gb", "logreg")


@dataclass(frozen=True)
@defaults_from_schema("slide_classifier")
class SlideClassifierSettings:
    models: tuple[str, ...]
    n_estimators: int
    max_depth: int | None
    C: float

    @classmethod
    def from_config(cls, section: dict | None) -> "SlideClassifierSettings":
        section = {**section_defaults("slide_classifier"), **dict(section or {})}
        return cls(models=tuple(section["models"]), n_estimators=int(section["n_estimators"]),
                   max_depth=section["max_depth"], C=float(section["C"]))


def make_survival_model(name: str, settings: SlideClassifierSettings, seed: int):
    """The survival twin of each classifier (scikit-survival): rf -> random survival forest, gb ->
    gradient boosting on the Cox partial likelihood, logreg -> Cox proportional hazards with a
    ridge penalty alpha = 1 / C (a few slides per feature: the unpenalised fit diverges)."""
    from sksurv.ensemble import GradientBoostingSurvivalAnalysis, RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    if name == "rf":
        return make_pipeline(SimpleImputer(strategy="median"),
                             RandomSurvivalForest(n_estimators=settings.n_estimators, max_depth=settings.max_depth,
                                                  min_samples_leaf=3, random_state=seed, n_jobs=1))
    if name == "gb":
        return make_pipeline(SimpleImputer(strategy="median"),
                             GradientBoostingSurvivalAnalysis(loss="coxph", n_estimators=min(settings.n_estimators, 200),
                                                              max_depth=3, random_state=seed))
    if name == "logreg":
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                             CoxPHSurvivalAnalysis(alpha=1.0 / settings.C, ties="breslow"))
    raise ValueError(f"unknown slide classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def _importances(final) -> np.ndarray | None:
    """Feature importances where the estimator has them (|coef| for linear models); the random
    survival forest has none (scikit-survival raises NotImplementedError)."""
    try:
        weights = getattr(final, "feature_importances_", None)
    except NotImplementedError:
        weights = None
    if weights is None and hasattr(final, "coef_"):
        weights = np.abs(np.atleast_2d(final.coef_)).mean(0)
    return weights


def make_regressor(name: str, settings: SlideClassifierSettings, seed: int):
    """The regression twin of each classifier (logreg -> ridge, its L2-penalised linear cousin)."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge

    if name == "rf":
        return make_pipeline(SimpleImputer(strategy="median"),
                             RandomForestRegressor(n_estimators=settings.n_estimators, max_depth=settings.max_depth,
                                                   random_state=seed, n_jobs=1))
    if name == "gb":
        return make_pipeline(SimpleImputer(strategy="median"),
                             GradientBoostingRegressor(n_estimators=min(settings.n_estimators, 200), max_depth=3, random_state=seed))
    if name == "logreg":
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), Ridge(alpha=1.0 / settings.C))
    raise ValueError(f"unknown slide classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def make_classifier(name: str, settings: SlideClassifierSettings, seed: int):
    """A scikit-learn pipeline; class weights balanced because cohorts rarely are."""
    if name == "rf":
        model = RandomForestClassifier(n_estimators=settings.n_estimators, max_depth=settings.max_depth,
                                       class_weight="balanced", random_state=seed, n_jobs=1)
        return make_pipeline(SimpleImputer(strategy="median"), model)
    if name == "gb":
        model = GradientBoostingClassifier(n_estimators=min(settings.n_estimators, 200), max_depth=3, random_state=seed)
        return make_pipeline(SimpleImputer(strategy="median"), model)
    if name == "logreg":
        model = LogisticRegression(C=settings.C, class_weight="balanced", max_iter=5000, random_state=seed)
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), model)
    raise ValueError(f"unknown slide classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def feature_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in META_COLUMNS]


def check_honest_training(table: pd.DataFrame) -> None:
    """Raise unless every train-role row's features come from a cross-fitted (inner-fold) tile
    model: ``tile_probs_model`` ``fold{k}.inner{j}``, not the fold's own model ``fold{k}``."""
    from .errors import InputError

    train = table[table["role"] == "train"]
    if "tile_probs_model" not in table.columns:
        raise InputError("slide features lack `tile_probs_model`: their training rows may be in-sample; "
                         "rebuild them (snakemake slide_features) so train slides use cross-fitted tile probabilities")
    expected = "fold" + train["fold"].astype(int).astype(str) + r".inner"
    model = train["tile_probs_model"].astype(str)
    ok = [m.startswith(e) and m[len(e):].isdigit() for m, e in zip(model, expected)]
    bad = train[~np.asarray(ok, dtype=bool)] if len(train) else train
    if len(bad):
        rec = bad.iloc[0]
        raise InputError(f"slide {rec['slide_id']!r} trains the fold-{rec['fold']} slide classifier on tile "
                         f"probabilities of {rec['tile_probs_model']!r}, a model fitted on it (in-sample); "
                         "slide features of train slides must be cross-fitted (tile_probs/<source>/fold<k>.crossfit.parquet)")


def train_and_predict(table: pd.DataFrame, name: str, settings: SlideClassifierSettings, seed: int,
                      target=None, fitted: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per fold: fit on train-role slides (cross-fitted features, checked), score every slide of
    that fold.

    Returns (predictions: slide_id, patient_id, y, prob, fold, role; importances: fold, feature,
    importance). ``fitted``: filled with fold -> the fitted pipeline (for the model bundle)."""
    from .errors import InputError

    check_honest_training(table)
    kind = "binary" if target is None else target.kind
    if kind == "survival" and not {"time", "event"} <= set(table.columns):
        raise InputError("slide features lack the time/event columns a survival slide model needs; rebuild them "
                         "(snakemake slide_features) from a splits.tsv of the survival target")
    cols = feature_columns(table)
    preds, importances = [], []
    for fold, part in table.groupby("fold", sort=True):
        train = part[part["role"] == "train"]
        if kind == "regression":
            model = make_regressor(name, settings, seed + int(fold))
            model.fit(train[cols].to_numpy(dtype=float), train["y"].to_numpy(dtype=float))
            value = model.predict(part[cols].to_numpy(dtype=float))
            preds.append(part[["slide_id", "patient_id", "y", "fold", "role"]].assign(value=value))
        elif kind == "survival":
            from sksurv.util import Surv

            if train["event"].sum() == 0:
                raise InputError(f"fold {fold}: the training slides hold no event; use fewer folds (split.k)")
            model = make_survival_model(name, settings, seed + int(fold))
            model.fit(train[cols].to_numpy(dtype=float),
                      Surv.from_arrays(event=train["event"].astype(bool).to_numpy(), time=train["time"].to_numpy(float)))
            risk = model.predict(part[cols].to_numpy(dtype=float))
            preds.append(part[["slide_id", "patient_id", "y", "time", "event", "fold", "role"]].assign(risk=risk))
        elif kind == "multiclass":
            model = make_classifier(name, settings, seed + int(fold))
            model.fit(train[cols].to_numpy(dtype=float), train["y"].to_numpy(dtype=int))
            # a class absent from this fold's training slides gets probability 0
            prob = np.zeros((len(part), target.n_out))
            prob[:, model[-1].classes_.astype(int)] = model.predict_proba(part[cols].to_numpy(dtype=float))
            frame = part[["slide_id", "patient_id", "y", "fold", "role"]].assign(pred=prob.argmax(1))
            for k, c in enumerate(target.classes):
                frame[f"prob_{c}"] = prob[:, k]
            preds.append(frame)
        if kind != "binary":
            if fitted is not None:
                fitted[int(fold)] = model
            weights = _importances(model[-1])
            if weights is not None:
                importances.append(pd.DataFrame({"fold": int(fold), "feature": cols, "importance": weights}))
            continue
        if train["y"].nunique() < 2:
            raise ValueError(f"fold {fold}: the training slides have one class only; use fewer folds")
        model = make_classifier(name, settings, seed + int(fold))
        model.fit(train[cols].to_numpy(dtype=float), train["y"].to_numpy())
        prob = model.predict_proba(part[cols].to_numpy(dtype=float))[:, 1]
        if fitted is not None:
            fitted[int(fold)] = model
        preds.append(part[["slide_id", "patient_id", "y", "fold", "role"]].assign(prob=prob))  # columns as before
        final = model[-1]
        weights = getattr(final, "feature_importances_", None)
        if weights is None and hasattr(final, "coef_"):
            weights = np.abs(final.coef_[0])
        if weights is not None:
            importances.append(pd.DataFrame({"fold": int(fold), "feature": cols, "importance": weights}))
    return pd.concat(preds, ignore_index=True), (pd.concat(importances, ignore_index=True) if importances else pd.DataFrame())


def write_slide_classifier(features_path: str, predictions_path: str, importances_path: str, name: str,
                           settings: dict | None, seed: int, target: dict | None = None,
                           model_paths: list[str] | None = None) -> None:
    """Rule `slide_classifier`: predictions (all folds, all roles), feature importances and, with
    ``model_paths`` (one per fold, in fold order), each fold's fitted pipeline as a skops file
    (data, loaded without pickle: :func:`histoflow.slide_bundle.load_estimator`)."""
    from .io import write_tsv
    from .logs import get_logger

    table = pd.read_parquet(features_path)
    task = None
    if target:  # {"target": config target, "positive_label": ..., "labels": the sheet's labels}
        from .targets import Target
        task = Target.from_config(target, labels=target.get("labels"))
        task = None if task.binary else task
    fitted: dict = {}
    preds, importances = train_and_predict(table, name, SlideClassifierSettings.from_config(settings), seed, task,
                                           fitted=fitted)
    if model_paths is not None:
        from .slide_bundle import dump_estimator

        if len(model_paths) != len(fitted):
            raise ValueError(f"{len(model_paths)} model paths for {len(fitted)} fold models")
        for path, fold in zip(model_paths, sorted(fitted)):
            dump_estimator(fitted[fold], path)
    get_logger(__name__).info("%s: %d predictions over %d folds", name, len(preds), preds["fold"].nunique())
    write_tsv(predictions_path, preds)
    write_tsv(importances_path, importances)
