"""Performance metrics (checklist item 11): slide-level metrics at a threshold chosen on
validation data, calibration, patient-level bootstrap confidence intervals, fold summaries and
DeLong's test for paired ROC curves. Pure functions on arrays; plots and files at the edges.

Each slide counts once: with ``kfold`` every slide is a test slide of exactly one fold (its
out-of-fold prediction); with ``holdout`` the same test slides are scored by each of the k fold
models and a slide's test prediction is the mean of the k probabilities (an ensemble), so
``n_slides``, the bootstrap and DeLong see unique slides and patients.

Thresholds come from validation predictions only, never from training or test ones: per fold
where that fold's validation holds at least ``min_val_per_class`` slides of each class
(``fold_validation``), else from the validation predictions of all folds pooled
(``pooled_validation``), else (no two-class validation at all, or ``threshold_method: fixed``)
``fixed_threshold`` (``fixed``).

Modules, by concern: ``settings`` (the config section), ``scores`` (binary scores of arrays,
bootstrap CIs, DeLong), ``binary`` (a binary model's evaluation, thresholds, comparison,
external cohorts), ``tasks`` (multi-class, survival, regression), ``plots`` and ``write`` (the
rule: tables in, metrics.json, TSV and plots out). Everything is importable from here."""

from .binary import (THRESHOLD_SOURCES, THRESHOLD_WORDS, choose_thresholds, compare_models, evaluate_external,
                     evaluate_model)
from .plots import plot_curves, plot_target
from .scores import (METRIC_NAMES, binary_metrics, bootstrap_ci, choose_threshold, delong_test,
                     expected_calibration_error, roc_auc)
from .settings import MetricsSettings
from .tasks import (compare_target_models, evaluate_target_external, evaluate_target_model, primary_score,
                    target_of_predictions)
from .tasks import _metrics_of, _risk_cutoffs, _train_horizons  # noqa: F401 - the bundle's and tests' helpers
from .write import load_external_predictions, load_predictions, write_metrics, write_target_metrics

__all__ = ["MetricsSettings", "METRIC_NAMES", "THRESHOLD_SOURCES", "THRESHOLD_WORDS", "roc_auc",
           "expected_calibration_error", "binary_metrics", "choose_threshold", "bootstrap_ci", "delong_test",
           "choose_thresholds", "evaluate_model", "compare_models", "evaluate_external", "target_of_predictions",
           "primary_score", "evaluate_target_model", "compare_target_models", "evaluate_target_external",
           "plot_curves", "plot_target", "load_predictions", "load_external_predictions", "write_metrics",
           "write_target_metrics"]
