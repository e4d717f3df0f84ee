"""TransMIL (Shao et al., NeurIPS 2021): a Transformer over the tiles of a slide.

TPT module: class token + two Transformer layers (Nystrom self-attention by default, so the
cost is linear in the number of tiles; plain multi-head self-attention is quadratic and only
fits bags of a few thousand tiles) with a PPEG between them. PPEG folds the tile sequence onto
a square grid and adds depth-wise convolutions (7, 5, 3) as a conditional position encoding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MILModel, TileScores, projector


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by Newton-Schulz iterations (Nystromformer, Xiong et al. 2021)."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transmil: hidden_dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.dim_head = dim // heads
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        q, k, v = self.to_qkv(x).view(n, 3, self.heads, self.dim_head).permute(1, 2, 0, 3)
        return q * self.scale, k, v  # each [heads, n, dim_head]

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.to_out(out.permute(1, 0, 2).reshape(out.shape[1], -1))

    def query_attention(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Exact attention of token ``index`` over all tokens, averaged over heads: [n]."""
        q, k, _ = self.qkv(x)
        return torch.softmax(q[:, index:index + 1] @ k.transpose(-1, -2), dim=-1)[:, 0].mean(0)


class FullAttention(_Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class NystromAttention(_Attention):
    """Nystrom-approximated softmax attention with segment-mean landmarks and a residual depth-wise conv on V."""

    def __init__(self, dim: int, heads: int, dropout: float, landmarks: int, pinv_iterations: int = 6, conv_kernel: int = 33):
        super().__init__(dim, heads, dropout)
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.res_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        m = self.landmarks
        pad = (m - n % m) % m
        if pad:  # front padding so the sequence splits into m equal segments
            x = torch.cat([x.new_zeros(pad, x.shape[1]), x])
        q, k, v = self.qkv(x)
        seg = x.shape[0] // m
        q_land = q.reshape(self.heads, m, seg, self.dim_head).mean(2)
        k_land = k.reshape(self.heads, m, seg, self.dim_head).mean(2)
        attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
        attn2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)
        out = (attn1 @ iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        return self.merge(out)[pad:]


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, attention: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if attention == "nystrom":
            self.attn: _Attention = NystromAttention(dim, heads, dropout, landmarks=max(dim // 2, 1))
        elif attention == "full":
            self.attn = FullAttention(dim, heads, dropout)
        else:
            raise ValueError(f"transmil attention must be nystrom or full, not {attention!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.query_attention(self.norm(x), 0)


class PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feats = x[:1], x[1:]
        grid = feats.transpose(0, 1).reshape(1, -1, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2)[0].transpose(0, 1)])


class TransMIL(MILModel):
    name = "transmil"

    def __init__(self, in_dim: int, hidden_dim: int = 128, dropout: float = 0.25, heads: int = 8,
                 attention: str = "nystrom", n_out: int = 1):
        super().__init__(in_dim, hidden_dim, dropout, n_out)
        self.fc = projector(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, hidden_dim) * 0.02)
        self.layer1 = TransLayer(hidden_dim, heads, dropout, attention)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, heads, dropout, attention)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_out)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens after the TPT [1 + side^2, dim], input of layer 2), for a bag of n tiles."""
        h = self.embed_tiles(x)
        n = h.shape[0]
        side = max(math.ceil(math.sqrt(n)), 1)
        extra = side * side - n
        # square the sequence by repeating its first tiles (as in the paper's code)
        h = torch.cat([self.cls_token, h, h[:extra]])
        h = self.ppeg(self.layer1(h), side)
        return self.norm(self.layer2(h)), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self._encode(x)
        return self.head(self.classifier(tokens[0]))

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        # the slide classifier on each tile's output token (padding copies dropped)
        tokens, _ = self._encode(x)
        return self.head(self.classifier(tokens[1:x.shape[0] + 1]))

    def tile_scores(self, x: torch.Tensor) -> TileScores:
        n = x.shape[0]
        tokens, before_last = self._encode(x)
        # class-token attention of the last layer over the real tiles (padding copies dropped)
        att = self.layer2.cls_attention(before_last)[1:n + 1]
        att = att / att.sum().clamp_min(1e-12)
        # TransMIL has no instance head: the slide classifier applied to each tile's output token
        prob = self.activate(self.head(self.classifier(tokens[1:n + 1])))
        return TileScores(attention=att, instance_prob=prob)
