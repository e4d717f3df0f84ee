"""Mean pooling: the slide embedding is the average tile embedding (a strong, honest baseline)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, TileScores, projector


class MeanPoolMIL(MILModel):
    name = "mean"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.embed_tiles(x).mean(0)))

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.embed_tiles(x)))

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        h = self.embed_tiles(x)
        n = h.shape[0]
        # the bag classifier applied to each tile: the tile's own vote, since the bag logit is
        # exactly the mean of these logits (the classifier is linear)
        return TileScores(attention=torch.full((n,), 1.0 / max(n, 1), device=h.device),
                          instance_prob=self.activate(self.head(self.classifier(h))))
