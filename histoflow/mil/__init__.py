"""Multiple-instance learning on tile features: one module per model, training in ``train``.

Models (config ``mil.models``): mean, max, abmil (gated attention), clam_sb, transmil, dsmil.
"""

from __future__ import annotations

from typing import Any

from .abmil import GatedAttentionMIL
from .base import MILModel, TileScores
from .clam import CLAMSB
from .dsmil import DSMIL
from .maxpool import MaxPoolMIL
from .mean import MeanPoolMIL
from .transmil import TransMIL

MODELS: dict[str, type[MILModel]] = {
    "mean": MeanPoolMIL,
    "max": MaxPoolMIL,
    "abmil": GatedAttentionMIL,
    "clam_sb": CLAMSB,
    "transmil": TransMIL,
    "dsmil": DSMIL,
}


def build_model(name: str, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25,
                options: dict[str, Any] | None = None, n_out: int = 1) -> MILModel:
    """A fresh model by config name; ``options`` are model-specific keywords (e.g. clam_sb k_sample);
    ``n_out``: outputs per slide (classes of a multi-class target, else 1)."""
    if name not in MODELS:
        from ..errors import InputError
        raise InputError(f"config key 'mil.models': unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](in_dim, hidden_dim=hidden_dim, dropout=dropout, n_out=n_out, **(options or {}))


__all__ = ["MODELS", "MILModel", "TileScores", "build_model"]
