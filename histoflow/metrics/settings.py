"""The metrics stage's settings (config section ``metrics``; defaults in the schema)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import defaults_from_schema


@dataclass(frozen=True)
@defaults_from_schema("metrics")
class MetricsSettings:
    n_bootstrap: int
    ci: float
    threshold_method: str  # youden | f1 | fixed
    fixed_threshold: float
    ece_bins: int
    min_val_per_class: int  # a fold's own threshold needs this many val slides per class
    seed: int = 1337

    @classmethod
    def from_config(cls, metrics: dict | None, seed: int = 1337) -> "MetricsSettings":
        metrics = dict(metrics or {})
        known = {k: metrics[k] for k in ("n_bootstrap", "ci", "threshold_method", "fixed_threshold", "ece_bins",
                                         "min_val_per_class") if k in metrics}
        return cls(seed=seed, **known)

    @property
    def ci_method(self) -> str:
        return f"patient bootstrap (percentile), n_bootstrap={self.n_bootstrap}, ci={self.ci}, seed={self.seed}"
