"""What every MIL model offers the trainer and the heatmap stage.

A bag is the float tensor of one slide's tile features, shape [n_tiles, dim]. Every model maps
it to ONE slide logit (binary task: positive_label vs the rest; survival: a risk; regression:
a value) or, with ``n_out`` > 1 (multi-class), to one logit per class, and can explain it per
tile: an attention weight (sums to 1 over the slide) and an instance probability in [0, 1]
(multi-class: [n, classes], the softmax of the tile's class logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TileScores:
    attention: torch.Tensor       # [n], >= 0, sums to 1
    instance_prob: torch.Tensor   # [n] (multi-class: [n, classes]), in [0, 1]


def projector(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The shared first layer: encoder features -> a small embedding (most MIL papers do this)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


class MILModel(nn.Module):
    """Base class: subclasses implement ``forward`` and ``tile_scores``.

    ``training_loss`` is the bag BCE; models with an auxiliary objective (CLAM's instance
    clustering, DSMIL's max-instance stream) override it.
    """

    name = "base"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, n_out: int = 1):
        super().__init__()
        self.in_dim = in_dim
        self.n_out = int(n_out)
        # the task's loss of one bag's output (histoflow.targets.Target.bag_loss); BCE = binary
        self.task_loss = F.binary_cross_entropy_with_logits
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        # per-dimension statistics of the training tiles (saved in the checkpoint): encoders
        # differ in feature scale by orders of magnitude, standardising makes lr defaults portable
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        # 1: subtract each bag's own mean feature first (config mil.bag_center): a slide-wide
        # shift (stain, scanner) moves every tile alike, a lesion moves only its tiles
        self.register_buffer("bag_center", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints and bundles written before mil.bag_center existed: not centred
        state_dict.setdefault(prefix + "bag_center", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.bag_center) and x.shape[0]:
            x = x - x.mean(0) + self.feature_mean  # the bag's mean moved onto the training tiles' mean
        return (x - self.feature_mean) / self.feature_std

    def embed_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Tile embeddings [n, hidden_dim]: standardised features through the model's projector ``fc``."""
        return self.fc(self.standardise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def tile_scores(self, x: torch.Tensor) -> TileScores:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., n_out] -> the output shape: a scalar per bag/tile when n_out is 1."""
        return logits.squeeze(-1) if self.n_out == 1 else logits

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Tile logits -> [0, 1]: sigmoid (one output), softmax over classes (multi-class)."""
        return torch.sigmoid(logits) if self.n_out == 1 else torch.softmax(logits, dim=-1)

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-tile logits on the slide logit's scale, [n] (multi-class: [n, classes]): what the
        top-k instance loss (config ``mil.topk_weight``) trains; each model's own tile head."""
        raise NotImplementedError

    def training_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The slide outputs the task loss is applied to (averaged); DSMIL has two streams."""
        return [self(x)]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, slide logit) for one bag; ``y`` is 0./1. (binary), the class index,
        or the value; ``weight`` the class weight."""
        logit = self(x)
        return weight * self.task_loss(logit, y), logit


def masked_softmax_scores(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the tiles of one bag (an empty bag gives an empty vector)."""
    return torch.softmax(scores, dim=0) if scores.numel() else scores


# ---------------------------------------------------------------------------------------------
# Shared blocks. A new model composes them (a model file plus its line in ``MODELS``); the
# attribute names (fc, attention, classifier) are the checkpoints' state-dict keys.


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018): w^T (tanh(V h) * sigmoid(U h)), as torchmil's
    ``AttentionPool(gated=True)`` and CLAM's ``Attn_Net_Gated``."""

    def __init__(self, dim: int, attn_dim: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw (pre-softmax) attention scores, shape [n]."""
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


class AttentionPoolMIL(MILModel):
    """Embedding -> gated attention pooling -> linear slide head (ABMIL; CLAM adds its
    instance objective on top). Attention weights sum to 1 over the bag."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, max(hidden_dim // 2, 8), dropout)
        self.classifier = nn.Linear(hidden_dim, n_out)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile embeddings [n, hidden_dim], attention [n])."""
        h = self.embed_tiles(x)
        return h, masked_softmax_scores(self.attention(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, a = self.embed(x)
        return self.head(self.classifier(a @ h))

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        # the slide head is linear, so the slide logit is the attention-weighted mean of these
        return self.head(self.classifier(self.embed_tiles(x)))

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        h, a = self.embed(x)
        return TileScores(attention=a, instance_prob=self.activate(self.head(self.classifier(h))))
