"""Instance-level max pooling (mi-Net style): the slide is as positive as its most positive tile."""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, TileScores, masked_softmax_scores, projector


class MaxPoolMIL(MILModel):
    name = "max"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_out)

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.instance_classifier(self.embed_tiles(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.instance_logits(x).max(dim=0).values

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        logits = self.instance_logits(x)
        # softmax of the instance logits: a smooth stand-in for the one-hot argmax, so the
        # heatmap shows the runner-up tiles too
        return TileScores(attention=masked_softmax_scores(logits if self.n_out == 1 else logits.max(-1).values),
                          instance_prob=self.activate(logits))
