"""The encoder registry: names, aliases and the published facts of the known foundation models.

Pure data and name handling (no torch at import): `histoflow.encoders` loads models by these
names and re-exports everything here, so ``from histoflow.encoders import KNOWN_MODELS`` keeps
working. Offline builds of these models live in :mod:`histoflow.encoder_builds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_FORMAT = "histoflow-encoder/1"
OUTPUTS = ("pooled", "cls", "cls+mean_patch", "mean_patch")


class EncoderError(InputError):
    """An encoder cannot be built: the message says which file/access/package is missing."""




def encoder_slug(name: str) -> str:
    """A path-safe form of an encoder name (``hf-hub:MahmoodLab/UNI2-h`` -> ``hf-hub-MahmoodLab_UNI2-h``)."""
    slug = name.strip().replace(":", "-").replace("/", "_").replace("\\", "_")
    slug = "".join(c if (c.isalnum() or c in "._-") else "_" for c in slug)
    if not slug or slug in {".", ".."}:
        raise EncoderError(f"encoder name {name!r} is empty or not usable in a path (check features.encoders)")
    return slug


# ---------------------------------------------------------------------------------------------
# Known pathology foundation models (sizes, normalisation, kwargs and pooling from the model cards)


@dataclass(frozen=True)
class ModelSpec:
    repo: str                          # Hugging Face repo id
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    output: str = "pooled"             # see OUTPUTS
    backend: str = "timm"              # timm | transformers
    kwargs: Callable[[], dict] | None = None  # timm.create_model kwargs (built lazily: they hold classes)
    aliases: tuple[str, ...] = ()
    mpp: float = 0.5                   # resolution the model was trained at (µm/px)
    licence: str = ""
    # Offline build (`histoflow encoders --build`, tests): the timm architecture the Hub's
    # config.json names and the model_args it holds; `kwargs` (the model card's) go on top.
    timm_arch: str = ""
    hub_args: Callable[[], dict] | None = None
    params_m: float | None = None      # published parameter count (millions); None = not checked
    sources: dict = field(default_factory=dict)  # registry field -> URL it was checked against


def _uni_kwargs() -> dict:
    return {"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0}


def _uni2_kwargs() -> dict:
    import timm
    import torch

    return {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
            "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU, "reg_tokens": 8,
            "dynamic_img_size": True}


def _virchow_kwargs() -> dict:
    import timm
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _hoptimus_kwargs() -> dict:
    return {"init_values": 1e-5, "dynamic_img_size": False}


HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# Where each registry value was checked (read in this repository's history, 2026-12): TRIDENT's
# loaders (mahmoodlab) load every one of these checkpoints with strict=True from these kwargs and
# build their eval transforms explicitly, so they are the reference we copy; the Hugging Face
# model cards themselves are gated and were not readable offline (their URLs are listed too).
_TRIDENT = "https://github.com/mahmoodlab/TRIDENT/blob/a91fa8490e0210ebbbe58452c3babe009e0ab7ca/"
SRC_TRIDENT_LOAD = _TRIDENT + "trident/patch_encoder_models/load.py"
SRC_TRIDENT_CONCH = _TRIDENT + "trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py"
SRC_TRIDENT_MAG = _TRIDENT + ".claude/skills/trident/reference.md"   # dims + `--mag 20` per encoder
SRC_VIRCHOW2_PAPER = "https://arxiv.org/abs/2408.00738"             # 632 M, mixed magnification
SRC_HOPTIMUS1 = ("https://resources.bioptimus.com/bioptimus-launches-h-optimus-1-a-state-of-the-art-"
                 "foundation-model-for-pathology")                   # 1.1 B
SRC_BIORODEO = "https://bio.rodeo/models/"                           # secondary summaries (params, licence)
SRC_ISSUE = "issue 20 (the lead's figure; not re-checked against a primary source)"


def _card(repo: str) -> str:
    return f"https://huggingface.co/{repo}"


def _src(repo: str, *, arch=SRC_TRIDENT_LOAD, pre=SRC_TRIDENT_LOAD, params=None, mpp=SRC_TRIDENT_MAG,
         licence=None, dim=SRC_TRIDENT_MAG) -> dict:
    out = {"model_card": _card(repo), "architecture": arch, "preprocessing": pre, "dim": dim, "mpp": mpp}
    if params:
        out["params_m"] = params
    if licence:
        out["licence"] = licence
    return out


def _uni_hub_args() -> dict:
    return {"img_size": 224, "patch_size": 16, "num_classes": 0}


def _virchow_hub_args() -> dict:
    return {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
            "dynamic_img_size": True}


def _virchow2_hub_args() -> dict:
    return {**_virchow_hub_args(), "reg_tokens": 4}


def _hoptimus_hub_args() -> dict:
    return {"img_size": 224, "num_classes": 0, "global_pool": "token"}


def _gigapath_hub_args() -> dict:
    # the Hub config overrides the dinov2 ViT-g/14 defaults: 16-px patches at 224 px
    return {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0}


def _conch15_trunk_args() -> dict:
    # TITAN/TRIDENT's CONCH v1.5 trunk: an iBOT ViT-L/16 (timm key names) with LayerScale, built at
    # 224 px and run at 448 px with its position embedding interpolated.
    return {"img_size": 224, "patch_size": 16, "init_values": 1.0, "num_classes": 0, "dynamic_img_size": True}


KNOWN_MODELS: dict[str, ModelSpec] = {s.repo: s for s in (
    ModelSpec("MahmoodLab/UNI", 1024, kwargs=_uni_kwargs, aliases=("uni",), licence="CC-BY-NC-ND-4.0, gated",
              timm_arch="vit_large_patch16_224", hub_args=_uni_hub_args, params_m=303.0,
              sources=_src("MahmoodLab/UNI", params=SRC_ISSUE)),
    ModelSpec("MahmoodLab/UNI2-h", 1536, kwargs=_uni2_kwargs, aliases=("uni2-h", "uni2"),
              licence="CC-BY-NC-ND-4.0, gated", timm_arch="vit_giant_patch14_224", params_m=681.0,
              sources=_src("MahmoodLab/UNI2-h", params=SRC_ISSUE)),
    # CONCH v1.5: the vision tower TITAN uses (pytorch_model_vision.bin): ViT-L/16 trunk + one-query
    # attentional pooler + LayerNorm -> 768-d. Resize(448, bilinear) + CenterCrop(448), ImageNet.
    ModelSpec("MahmoodLab/conchv1_5", 768, input_size=448, output="pooled", backend="conch",
              aliases=("conch-v1.5", "conchv1_5", "conch_v15"), licence="CC-BY-NC-ND-4.0, gated",
              timm_arch="vit_large_patch16_224", hub_args=_conch15_trunk_args,
              sources=_src("MahmoodLab/conchv1_5", arch=SRC_TRIDENT_CONCH, pre=SRC_TRIDENT_CONCH)),
    # Virchow/Virchow2: the model card's embedding is [class token, mean of patch tokens]
    # (registers excluded), 2 x 1280.
    ModelSpec("paige-ai/Virchow", 2560, interpolation="bicubic", output="cls+mean_patch",
              kwargs=_virchow_kwargs, aliases=("virchow",), licence="Apache-2.0, gated",
              timm_arch="vit_huge_patch14_224", hub_args=_virchow_hub_args, params_m=632.0,
              sources=_src("paige-ai/Virchow", params=SRC_BIORODEO + "virchow")),
    ModelSpec("paige-ai/Virchow2", 2560, interpolation="bicubic", output="cls+mean_patch",
              kwargs=_virchow_kwargs, aliases=("virchow2",), licence="CC-BY-NC-ND-4.0, gated",
              timm_arch="vit_huge_patch14_224", hub_args=_virchow2_hub_args, params_m=632.0,
              sources=_src("paige-ai/Virchow2", params=SRC_VIRCHOW2_PAPER)),
    ModelSpec("bioptimus/H-optimus-0", 1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, interpolation="bilinear",
              kwargs=_hoptimus_kwargs, aliases=("h-optimus-0",), licence="Apache-2.0, gated",
              timm_arch="vit_giant_patch14_reg4_dinov2", hub_args=_hoptimus_hub_args, params_m=1100.0,
              sources=_src("bioptimus/H-optimus-0", params=SRC_BIORODEO + "h-optimus-0",
                           licence=SRC_BIORODEO + "h-optimus-0")),
    ModelSpec("bioptimus/H-optimus-1", 1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, interpolation="bilinear",
              kwargs=_hoptimus_kwargs, aliases=("h-optimus-1",), licence="CC-BY-NC-ND-4.0, gated",
              timm_arch="vit_giant_patch14_reg4_dinov2", hub_args=_hoptimus_hub_args, params_m=1100.0,
              sources=_src("bioptimus/H-optimus-1", params=SRC_HOPTIMUS1)),
    # Prov-GigaPath: Resize(256, bicubic) + CenterCrop(224) in its model card = crop_pct 0.875.
    ModelSpec("prov-gigapath/prov-gigapath", 1536, interpolation="bicubic", crop_pct=0.875,
              aliases=("prov-gigapath", "gigapath"), licence="Apache-2.0, gated",
              timm_arch="vit_giant_patch14_dinov2", hub_args=_gigapath_hub_args, params_m=1100.0,
              sources=_src("prov-gigapath/prov-gigapath", params=SRC_ISSUE)),
    # Phikon / Phikon-v2 are Hugging Face transformers models (class token of last_hidden_state).
    ModelSpec("owkin/phikon-v2", 1024, output="cls", backend="transformers", aliases=("phikon-v2",),
              licence="Owkin non-commercial", sources=_src("owkin/phikon-v2")),
    ModelSpec("owkin/phikon", 768, output="cls", backend="transformers", aliases=("phikon",),
              licence="Owkin non-commercial", sources=_src("owkin/phikon")),
)}
ALIASES: dict[str, str] = {a: s.repo for s in KNOWN_MODELS.values() for a in s.aliases}
# H-optimus-0/1: TRIDENT's transform is Resize(224) (torchvision's default, bilinear) on 224-px
# tiles at 0.5 µm/px, so the resize is a no-op at the intended tile size.


def resolve_name(name: str) -> str:
    """Canonical form of an encoder name: aliases become ``hf-hub:<repo>``; ``hf_hub:`` -> ``hf-hub:``."""
    name = name.strip()
    if name.lower() in ALIASES:
        return f"hf-hub:{ALIASES[name.lower()]}"
    if name.startswith("hf_hub:"):
        return "hf-hub:" + name[len("hf_hub:"):]
    return name





ENCODER_COLUMNS = ("name", "repo", "dim", "params_m", "input_px", "mpp", "output", "licence", "checked")


def registry_names() -> list[str]:
    """The short name of every known foundation model (its first alias), in registry order."""
    return [s.aliases[0] for s in KNOWN_MODELS.values()]


def spec_for(name: str) -> ModelSpec:
    """The registry entry for an alias, ``hf-hub:<repo>`` or ``<repo>``."""
    resolved = resolve_name(name)
    repo = resolved[len("hf-hub:"):] if resolved.startswith("hf-hub:") else resolved
    if repo not in KNOWN_MODELS:
        raise EncoderError(f"{name!r} is not a known foundation model; known: {', '.join(registry_names())}")
    return KNOWN_MODELS[repo]


def timm_build_kwargs(spec: ModelSpec) -> dict:
    """``timm.create_model`` kwargs of an offline build: the Hub config's model_args + the card's kwargs."""
    kwargs = dict(spec.hub_args() if spec.hub_args else {})
    kwargs.update(spec.kwargs() if spec.kwargs else {})
    kwargs.setdefault("num_classes", 0)
    return kwargs


def encoder_row(spec: ModelSpec) -> dict[str, Any]:
    """The registry's (published) row of `histoflow encoders`."""
    return {"name": spec.aliases[0], "repo": spec.repo, "dim": spec.dim,
            "params_m": "" if spec.params_m is None else spec.params_m, "input_px": spec.input_size,
            "mpp": spec.mpp, "output": spec.output, "licence": spec.licence, "checked": "registry"}


def trained_mpp(name: str) -> float | None:
    """µm/px a named foundation model was trained at (None for other encoders)."""
    try:
        return spec_for(name).mpp
    except EncoderError:
        return None



def needs_transformers(name: str) -> bool:
    """Whether encoder ``name`` (e.g. phikon, phikon-v2) is a Hugging Face transformers model."""
    resolved = resolve_name(name)
    spec = KNOWN_MODELS.get(resolved[len("hf-hub:"):]) if resolved.startswith("hf-hub:") else None
    return spec is not None and spec.backend == "transformers"


LARGE_MODEL_PARAMS_M = 100.0
LARGE_MODEL_FILE_BYTES = 400 * 2**20      # ~100 M float32 parameters
_LARGE_TIMM = ("large", "huge", "giant", "gigantic", "vit_l", "vit_h", "vit_g", "eva02_l", "dinov2_l")


def encoder_is_large(name: str) -> bool:
    """Whether loading encoder ``name`` is a large fixed cost (>= 100 M parameters): a known
    foundation model by its published size, a ``local:`` file by its size, a ``timm:`` model by
    its name (large/huge/giant). Cheap (no torch): the workflow asks it at parse time."""
    import os

    resolved = resolve_name(name)
    if resolved.startswith("hf-hub:"):
        spec = KNOWN_MODELS.get(resolved[len("hf-hub:"):])
        return spec is None or spec.params_m is None or spec.params_m >= LARGE_MODEL_PARAMS_M
    if resolved.startswith("local:"):
        try:
            return os.path.getsize(os.path.expanduser(resolved[len("local:"):])) >= LARGE_MODEL_FILE_BYTES
        except OSError:
            return False
    if resolved.startswith("timm:"):
        return any(tag in resolved.lower() for tag in _LARGE_TIMM)
    return False


def features_model_is_large(features: dict) -> bool:
    """Config section ``features``: any large encoder, or GPU jobs (a GPU job never reloads its
    model per slide). Decides ``slides_per_job: auto`` (histoflow.batches.slides_per_job)."""
    return int(features.get("gpu", 0) or 0) > 0 or any(encoder_is_large(n) for n in features.get("encoders", []))
