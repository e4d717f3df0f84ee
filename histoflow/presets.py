"""Presets (``presets/<name>.yaml``): a published experiment's protocol as a config layer, with
the figures it published (config ``published``) so a run says how it compares.

``compare_published`` is pure: given the ``published`` entries and this run's metrics.json (and
its lesions/<source>/metrics.json for FROC), it returns one row per entry: the published value,
this run's value and 95 % CI, and whether the published value lies inside that CI. The
checklist (item 11) and so the report show these rows; nothing here changes a metric.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
# metrics.json keys a published figure may name (models.<model>.pooled.<metric>), plus the
# lesion FROC score (lesions/<source>/metrics.json, one per tile-probability source)
LESION_METRICS = ("froc_score",)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _model_value(metrics: Mapping, model: str, metric: str) -> tuple[str | None, float | None, list | None]:
    """(model name used, value, [lo, hi]) of models.<model> in metrics.json; ``best`` = the
    run's best model (metrics.json best_model, chosen on test slides: said in the row)."""
    models = metrics.get("models") or {}
    name = metrics.get("best_model") if model == "best" else model
    res = models.get(name) if name else None
    if res is None:
        return name, None, None
    value = _number((res.get("pooled") or {}).get(metric))
    ci = (res.get("ci") or {}).get(metric)
    ci = [_number(ci[0]), _number(ci[1])] if ci and len(ci) == 2 else None
    return name, value, ci if ci and None not in ci else None


def _lesion_value(lesions: Mapping[str, Mapping], source: str, metric: str) -> tuple[str | None, float | None, list | None]:
    """A lesion metric of tile-probability source ``source`` (``best`` = the highest), read
    from lesions/<source>/metrics.json as lesion_metrics writes it (the FROC under ``froc``)."""
    lesions = {s: m.get("froc", m) for s, m in lesions.items()}
    scored = {s: _number(m.get(metric)) for s, m in lesions.items() if m.get("available", True)}
    scored = {s: v for s, v in scored.items() if v is not None}
    if source == "best":
        source = max(scored, key=scored.get) if scored else None
    ci = (lesions.get(source) or {}).get(f"{metric}_ci") if source else None
    ci = [_number(ci[0]), _number(ci[1])] if ci and len(ci) == 2 else None
    return source, scored.get(source) if source else None, ci if ci and None not in ci else None


def compare_published(published: Iterable[Mapping] | None, metrics: Mapping | None,
                      lesions: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per published figure: ``metric, model, published, source, run_model, value,
    ci_low, ci_high, inside`` and ``status``.

    ``inside`` is True/False when this run has the figure with a CI (the published value within
    [ci_low, ci_high], ends included), None otherwise, with ``status`` saying why:
    ``not in this run`` (model or metric absent) or ``no CI`` (e.g. FROC, which has none).
    """
    metrics, lesions = metrics or {}, lesions or {}
    rows = []
    for entry in published or ():
        metric, model = str(entry["metric"]), str(entry.get("model", "best"))
        target = _number(entry["value"])
        if metric in LESION_METRICS:
            run_model, value, ci = _lesion_value(lesions, model, metric)
        else:
            run_model, value, ci = _model_value(metrics, model, metric)
        if value is None:
            inside, status = None, "not in this run"
        elif ci is None:
            inside, status = None, "no CI"
        else:
            inside = bool(ci[0] <= target <= ci[1])
            status = "inside CI" if inside else ("above CI" if target > ci[1] else "below CI")
        rows.append({"metric": metric, "model": model, "published": target, "source": str(entry.get("source", "")),
                     "run_model": run_model, "value": value,
                     "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                     "inside": inside, "status": status})
    return rows


def format_row(row: Mapping, ci_label: str = "95%") -> str:
    """One line for the checklist / report: published vs this run."""
    run = "n/a" if row["value"] is None else f"{row['value']:.3f}"
    if row["ci_low"] is not None:
        run += f" ({ci_label} CI {row['ci_low']:.3f}-{row['ci_high']:.3f})"
    who = row["model"] if row["run_model"] in (None, row["model"]) else f"{row['model']} = {row['run_model']}"
    if row["model"] == "best":   # picked on the test slides it is judged on: say so
        who += " (the best of this run's models on the test slides: an optimistic figure)"
    return (f"{row['metric']} of {who}: published {row['published']:.4g} ({row['source']}); this run {run}: "
            f"{row['status']}")
