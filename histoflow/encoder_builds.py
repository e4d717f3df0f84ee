"""Model construction shared by the loaders and the offline builds: output heads (backbone ->
N x dim), CONCH v1.5's vision tower, and `histoflow encoders --build` (every named foundation
model built with random weights, counted and run once, no download).
"""

from __future__ import annotations

from typing import Any

from .encoder_registry import (KNOWN_MODELS, OUTPUTS, EncoderError, ModelSpec, encoder_row, spec_for,
                               timm_build_kwargs)


# ---------------------------------------------------------------------------------------------
# Output heads: turn a backbone into N x dim


def _make_head(backbone, output: str):
    import torch
    from torch import nn

    if output not in OUTPUTS:
        raise EncoderError(f"encoder output {output!r} is not one of {', '.join(OUTPUTS)}")

    class TokenPooling(nn.Module):
        """Pooling of a ViT's token sequence (timm ``forward_features``: N x tokens x C)."""

        def __init__(self, net, mode: str):
            super().__init__()
            self.net = net
            self.mode = mode
            # register tokens sit between the class token and the patch tokens
            self.prefix = int(getattr(net, "num_prefix_tokens", 1))

        def forward(self, x):
            tokens = self.net.forward_features(x)
            if tokens.ndim != 3:
                raise RuntimeError(f"output {self.mode!r} needs a token sequence, got shape {tuple(tokens.shape)}")
            cls = tokens[:, 0]
            patch = tokens[:, self.prefix:].mean(dim=1)
            if self.mode == "cls":
                return cls
            if self.mode == "mean_patch":
                return patch
            return torch.cat([cls, patch], dim=-1)

    class Pooled(nn.Module):
        """The model's own pooled output, flattened (global pooling for CNNs)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            if y.ndim == 4:  # a feature map: average it
                y = y.mean(dim=(2, 3))
            return y.flatten(1)

    return Pooled(backbone) if output == "pooled" else TokenPooling(backbone, output)


# ---------------------------------------------------------------------------------------------
# Offline builds of the named foundation models (no download): `histoflow encoders [--build]`
# and tests/test_encoder_registry.py. The architecture comes from the registry alone, so a wrong
# kwarg shows up as a strict state_dict load failure against the real checkpoint's layout.

def _conch_tower(trunk):
    """CONCH v1.5's vision tower: trunk tokens -> one-query attentional pooler -> LayerNorm (768-d).

    Module and parameter names are those of ``pytorch_model_vision.bin`` (TRIDENT's
    ``CONCHVisionTower``): ``trunk.*``, ``attn_pool_contrast.{query,ln_q,ln_k,to_q,to_kv,to_out}``,
    ``ln_contrast``. Plain torch instead of einops: the same arithmetic.
    """
    import torch
    from torch import nn

    class AttentionalPooler(nn.Module):
        def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.heads = n_head
            self.scale = (d_model // n_head) ** -0.5
            self.ln_k = nn.LayerNorm(context_dim)
            self.ln_q = nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, d_model, bias=False)
            self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
            self.to_out = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x):                                  # x: B x N x context_dim
            b, n, _ = x.shape
            q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)   # B x Q x D
            k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)         # B x N x D each
            h = self.heads

            def split(t):
                return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)  # B x h x T x d

            q, k, v = split(q), split(k), split(v)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
            return self.to_out(out)                            # B x Q x D

    class ConchVisionTower(nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk
            self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=trunk.embed_dim, n_head=8)
            self.ln_contrast = nn.LayerNorm(768)

        def forward(self, x):
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    return ConchVisionTower(trunk)


def _transformers_config(spec: ModelSpec):
    """Phikon (ViT-B/16, iBOT) / Phikon-v2 (ViT-L/16, DINOv2) configs, as their model cards name them."""
    import transformers

    if spec.repo == "owkin/phikon":
        return transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      intermediate_size=3072, image_size=224, patch_size=16)
    return transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     image_size=224, patch_size=16)


def build_backbone_offline(spec: ModelSpec):
    """The named model's architecture with no weights loaded (call under ``torch.device('meta')``
    for a free shape-only build). Its state_dict keys are the real checkpoint's."""
    if spec.backend == "transformers":
        try:
            import transformers
        except ImportError:
            raise EncoderError(f"{spec.aliases[0]}: a Hugging Face transformers model and `transformers` "
                               "is not installed (pip install transformers)") from None
        return transformers.AutoModel.from_config(_transformers_config(spec))
    import timm

    trunk = timm.create_model(spec.timm_arch, pretrained=False, **timm_build_kwargs(spec))
    return _conch_tower(trunk) if spec.backend == "conch" else trunk


def encoder_module(spec: ModelSpec, backbone):
    """Backbone + the output the registry names: what features are computed with (N x dim)."""
    from torch import nn

    if spec.backend == "conch":
        return backbone
    if spec.backend == "transformers":
        return class_token(backbone)
    return _make_head(backbone, spec.output)


def _random_fill(module) -> None:
    """Cheap random weights for a module materialised from the meta device (timm's own init of a
    1.1 B-parameter ViT costs far longer on CPU and adds nothing to a shape/width check)."""
    import torch

    with torch.no_grad():
        for pname, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in module.buffers():
            b.zero_()


def build_offline(name: str, *, seed: int = 0) -> dict[str, Any]:
    """Build ``name`` with random weights on CPU, count its parameters and run one forward pass
    of one tile at its input size: the row of `histoflow encoders --build`, measured."""
    import time

    import torch

    spec = spec_for(name)
    row = encoder_row(spec)
    t0 = time.perf_counter()
    with torch.device("meta"):
        backbone = build_backbone_offline(spec)
    backbone = backbone.to_empty(device="cpu")
    torch.manual_seed(seed)
    _random_fill(backbone)
    model = encoder_module(spec, backbone).eval()
    n_params = sum(p.numel() for p in backbone.parameters())
    x = torch.randn(1, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        y = model(x)
    if y.ndim != 2 or y.shape[0] != 1 or not torch.isfinite(y).all():
        raise EncoderError(f"{name}: one tile gave output of shape {tuple(y.shape)} (finite: "
                           f"{bool(torch.isfinite(y).all())}), not 1 x dim")
    row.update(dim=int(y.shape[1]), params_m=round(n_params / 1e6, 1), checked="built",
               seconds=round(time.perf_counter() - t0, 1))
    del model, backbone
    return row


def encoder_rows(*, build: bool = False, only: list[str] | None = None, progress=None) -> list[dict[str, Any]]:
    """Rows of `histoflow encoders`: published values, or (``build``) measured ones. A model whose
    builder is missing (transformers) keeps its published row, marked ``skipped: <why>``."""
    specs = [spec_for(n) for n in only] if only else list(KNOWN_MODELS.values())
    rows = []
    for spec in specs:
        if not build:
            rows.append(encoder_row(spec))
            continue
        try:
            row = build_offline(spec.aliases[0])
        except EncoderError as err:
            if spec.backend != "transformers":
                raise
            row = encoder_row(spec)
            row["checked"] = f"skipped: {str(err).split(': ', 1)[-1]}"
        rows.append(row)
        if progress:
            progress(row)
    return rows


def class_token(inner):
    """A transformers ViT as an encoder: the CLS token of its last hidden state (Phikon's output)."""
    from torch import nn

    class ClassToken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).last_hidden_state[:, 0]

    return ClassToken(inner)
