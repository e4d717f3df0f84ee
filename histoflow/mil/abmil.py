"""Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018).

a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ); slide embedding z = sum_i a_i h_i.
The sigmoid gate lets the model switch off tanh's near-linear regime for uninformative tiles.
The blocks (projector, GatedAttention, AttentionPoolMIL) live in :mod:`histoflow.mil.base`.
"""

from __future__ import annotations

from .base import AttentionPoolMIL, GatedAttention

__all__ = ["GatedAttention", "GatedAttentionMIL"]


class GatedAttentionMIL(AttentionPoolMIL):
    name = "abmil"
