"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021).

Stream 1 classifies every tile and max-pools (finds the critical instance). Stream 2 attends
to every tile by its similarity to that critical instance in a learned query space, and
classifies the attention-pooled embedding. Training sums both streams' losses; the slide
logit is their average.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import MILModel, TileScores, projector


class DSMIL(MILModel):
    name = "dsmil"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, query_dim: int = 128, n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_out)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Linear(hidden_dim, n_out)
        self.query_dim = query_dim

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instance logits [n], attention [n], bag-stream logit)."""
        h = self.embed_tiles(x)
        inst = self.head(self.instance_classifier(h))
        q = self.query(h)
        if self.n_out > 1:
            # one critical instance per class (as in the paper): attention [n, C], bag logit of
            # class c from the class-c embedding (the diagonal of the per-class logits)
            critical = q[torch.argmax(inst, dim=0)]
            attn = torch.softmax(q @ critical.T / math.sqrt(self.query_dim), dim=0)
            bag = torch.diagonal(self.bag_classifier(attn.T @ self.value(h)))
            return inst, attn, bag
        critical = q[torch.argmax(inst)]
        # distance-based attention: similarity to the critical instance, scaled like dot-product attention
        attn = torch.softmax(q @ critical / math.sqrt(self.query_dim), dim=0)
        bag = self.bag_classifier(attn @ self.value(h)).squeeze(-1)
        return inst, attn, bag

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.instance_classifier(self.embed_tiles(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inst, _, bag = self.streams(x)
        return 0.5 * (inst.max(dim=0).values + bag)

    def training_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        inst, _, bag = self.streams(x)
        return [inst.max(dim=0).values, bag]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inst, _, bag = self.streams(x)
        top = inst.max(dim=0).values
        loss = 0.5 * self.task_loss(top, y) + 0.5 * self.task_loss(bag, y)
        return weight * loss, 0.5 * (top + bag)

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        inst, attn, _ = self.streams(x)
        if attn.dim() == 2:  # multi-class: the mean of the classes' attention (still sums to 1)
            attn = attn.mean(1)
        return TileScores(attention=attn, instance_prob=self.activate(inst))
