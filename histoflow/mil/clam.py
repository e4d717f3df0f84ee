"""CLAM-SB: single-branch clustering-constrained attention MIL (Lu et al., Nat. Biomed. Eng. 2021).

Gated attention pooling (as in abmil) plus an instance-level clustering objective: within a
slide of class c, the k most-attended tiles are pseudo-labelled "class-c evidence" and the k
least-attended "not evidence", and a per-class instance classifier learns to separate them
(smooth top-1 SVM as in the paper, or cross-entropy). This regularises attention towards tiles
that look alike across slides, which is what makes CLAM heatmaps sharp.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import AttentionPoolMIL, TileScores


def smooth_top1_svm_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM (Berrada et al., ICLR 2018): tau * logsumexp((margin + s_j - s_y) / tau)."""
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    true_score = logits.gather(1, target[:, None])
    return (tau * torch.logsumexp((logits + margin - true_score) / tau, dim=1)).mean()


class CLAMSB(AttentionPoolMIL):
    name = "clam_sb"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, k_sample: int = 8,
                 bag_weight: float = 0.7, instance_loss: str = "svm", subtyping: bool = False, n_out: int = 1):
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"clam_sb instance_loss must be svm or ce, not {instance_loss!r}")
        super().__init__(in_dim, hidden_dim, dropout, n_out)   # embedding, gated attention, slide head
        # one 2-way instance classifier per slide class (binary: 0 = negative, 1 = positive);
        # multi-class is CLAM's subtyping setting (out-of-class top tiles are not evidence)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden_dim, 2) for _ in range(max(2, n_out))])
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.instance_loss = instance_loss
        self.subtyping = subtyping or n_out > 1

    def _instance_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.instance_loss == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits, target)

    def clustering_loss(self, h: torch.Tensor, a: torch.Tensor, label: int) -> torch.Tensor:
        """Instance loss of one bag from attention-ranked pseudo-labels."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k < 1:
            return h.new_zeros(())
        top = torch.topk(a, k).indices
        bottom = torch.topk(-a, k).indices
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == label:  # in-class: top-k are evidence of c, bottom-k are not
                feats = torch.cat([h[top], h[bottom]])
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            elif self.subtyping:  # out-of-class: the top tiles of another class are not evidence of c
                feats = h[top]
                target = torch.zeros(k, dtype=torch.long)
            else:
                continue
            losses.append(self._instance_loss(clf(feats), target.to(h.device)))
        return torch.stack(losses).mean()

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, a = self.embed(x)
        logit = self.head(self.classifier(a @ h))
        bag = self.task_loss(logit, y)
        inst = self.clustering_loss(h, a, int(y.item()))
        return weight * (self.bag_weight * bag + (1.0 - self.bag_weight) * inst), logit

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        h, a = self.embed(x)
        # the positive-class instance classifier: P(tile is evidence of the positive class)
        if self.n_out > 1:  # per class: P(tile is evidence of that class)
            prob = torch.stack([torch.softmax(clf(h), dim=-1)[:, 1] for clf in self.instance_classifiers], dim=-1)
            return TileScores(attention=a, instance_prob=prob)
        prob = torch.softmax(self.instance_classifiers[1](h), dim=-1)[:, 1]
        return TileScores(attention=a, instance_prob=prob)
