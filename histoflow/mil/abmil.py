"""Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018).

a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ); slide embedding z = sum_i a_i h_i.
The sigmoid gate lets the model switch off tanh's near-linear regime for uninformative tiles.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, TileScores, masked_softmax_scores, projector


class GatedAttention(nn.Module):
    def __init__(self, dim: int, attn_dim: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw (pre-softmax) attention scores, shape [n]."""
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


class GatedAttentionMIL(MILModel):
    name = "abmil"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, max(hidden_dim // 2, 8), dropout)
        self.classifier = nn.Linear(hidden_dim, n_out)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.standardise(x))
        return h, masked_softmax_scores(self.attention(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, a = self.embed(x)
        return self.head(self.classifier(a @ h))

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        h, a = self.embed(x)
        return TileScores(attention=a, instance_prob=self.activate(self.head(self.classifier(h))))
