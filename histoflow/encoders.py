"""Tile encoders: one registry of names, each resolving to a frozen model plus its preprocessing.

Names (``features.encoders`` in config.yaml):

* ``resnet50-trunc``: torchvision ResNet-50 cut after ``layer3`` + global average pooling
  (1024-d, CLAM's baseline) with ImageNet weights from a local file.
* ``timm:<model>``: any timm model (``timm:resnet50.a1_in1k``), pooled output.
* ``hf-hub:<org>/<repo>``: a Hugging Face Hub model loaded by timm; pathology foundation models
  in :data:`KNOWN_MODELS` get their own size, normalisation, kwargs and output pooling.
  Aliases (``uni``, ``uni2-h``, ``conch-v1.5``, ``virchow2``, ``h-optimus-0``, ...) name the same models;
  `histoflow encoders [--build]` lists them and builds each offline (:func:`encoder_rows`).
* ``local:<path>``: a user's checkpoint (TorchScript, a histoflow checkpoint, or a state_dict
  with a sidecar JSON; see :func:`load_local` and docs/encoders.md).
* ``ssl:<arch>``: an encoder trained on the cohort's own tiles by the ``ssl_pretrain`` rule
  (``{outdir}/ssl/{arch}/encoder.pt``, see :mod:`histoflow.ssl`).

Every encoder maps a normalised float tensor ``N x 3 x S x S`` to ``N x dim``. No encoder ever
falls back silently to random weights: missing weights are a one-line error naming the file to
provide (``allow_random_weights=True`` exists for tests and benchmarks only).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .devices import resolve_device  # noqa: F401 - the one rule, re-exported for callers
from .errors import InputError
from .logs import get_logger

log = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's original ImageNet ResNet-50 (IMAGENET1K_V1), the weights CLAM's features used.
RESNET50_FILES = ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth", "resnet50-11ad3fa6.pth")
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
LOCAL_FORMAT = "histoflow-encoder/1"
OUTPUTS = ("pooled", "cls", "cls+mean_patch", "mean_patch")


class EncoderError(InputError):
    """An encoder cannot be built: the message says which file/access/package is missing."""


@dataclass(frozen=True)
class LoadedEncoder:
    """A frozen encoder and how to feed it.

    Feed ``model`` RGB tiles resized to ``input_size`` (with ``interpolation``; a centre crop of
    ``crop_pct`` of a ``input_size / crop_pct`` resize when ``crop_pct < 1``), scaled to [0, 1]
    and normalised with ``mean``/``std``. ``weights_source`` says where the weights came from
    (file + sha256 prefix, or Hub repo + commit) for the audit log.
    """

    model: Any  # torch.nn.Module in eval mode, gradients off
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    weights_source: str = ""
    output: str = "pooled"
    device: str = "cpu"
    meta: dict = field(default_factory=dict)

    def audit(self) -> dict[str, Any]:
        """Flat description for MLflow params / Parquet metadata."""
        return {"encoder": self.name, "encoder_dim": self.dim, "encoder_input_size": self.input_size,
                "encoder_mean": list(self.mean), "encoder_std": list(self.std),
                "encoder_interpolation": self.interpolation, "encoder_crop_pct": self.crop_pct,
                "encoder_output": self.output, "encoder_weights": self.weights_source}


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


def _finalise(model, *, name: str, input_size: int, mean, std, interpolation: str, crop_pct: float,
              weights_source: str, output: str, device: str, meta: dict | None = None) -> LoadedEncoder:
    """Freeze the model, move it to ``device`` and measure its output dimension with a dry run."""
    import torch

    device = resolve_device(device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        y = model(torch.zeros(2, 3, int(input_size), int(input_size), device=device))
    if y.ndim != 2 or y.shape[0] != 2:
        raise EncoderError(f"encoder {name!r} returns shape {tuple(y.shape)} for 2 tiles, not 2 x dim; "
                           "choose an output pooling ('output' in the sidecar JSON)")
    return LoadedEncoder(model=model, name=name, input_size=int(input_size),
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                         dim=int(y.shape[1]), interpolation=str(interpolation), crop_pct=float(crop_pct),
                         weights_source=weights_source, output=output, device=device, meta=dict(meta or {}))


def file_fingerprint(path: str | os.PathLike, n_hex: int = 16) -> str:
    """``<path> sha256:<prefix>`` (streamed, so large checkpoints do not fill memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path} sha256:{digest.hexdigest()[:n_hex]}"


# ---------------------------------------------------------------------------------------------
# resnet50-trunc


def truncated_resnet50():
    """torchvision ResNet-50 up to ``layer3`` (stride 16, 1024 channels) + global average pooling."""
    from torch import nn
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), net


def weights_search_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where ``resnet50-trunc`` looks for its ImageNet weights, in order."""
    import torch

    dirs: list[Path] = []
    if weights_dir:
        dirs.append(Path(weights_dir).expanduser())
    env = os.environ.get("HISTOFLOW_WEIGHTS")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_resnet50_weights(weights_dir: str | os.PathLike | None = None) -> Path | None:
    for base in weights_search_dirs(weights_dir):
        if base.is_file():
            return base
        if not base.is_dir():
            continue
        for fname in RESNET50_FILES:
            if (base / fname).is_file():
                return base / fname
        found = sorted(base.glob("resnet50-*.pth"))
        if found:
            return found[0]
    return None


def load_resnet50_trunc(*, weights_dir=None, allow_random_weights: bool = False, device: str = "cpu") -> LoadedEncoder:
    import torch

    model, full = truncated_resnet50()
    path = find_resnet50_weights(weights_dir)
    if path is None:
        if not allow_random_weights:
            where = weights_search_dirs(weights_dir)[0]
            raise EncoderError(
                f"encoder 'resnet50-trunc' needs ImageNet weights: download {RESNET50_URL} into {where} "
                "(or set features.weights_dir / HISTOFLOW_WEIGHTS to the folder holding resnet50-*.pth)")
        source = "random-init (allow_random_weights)"
        log.warning("resnet50-trunc: no weights found, using RANDOM weights (allowed for tests/benchmarks only)")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = _unwrap_state(state, None, ("module.",))
        try:
            full.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise EncoderError(f"{path} is not a torchvision ResNet-50 state_dict ({_first_line(err)}); "
                               f"use {RESNET50_URL}") from None
        source = file_fingerprint(path)
    return _finalise(model, name="resnet50-trunc", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation="bilinear", crop_pct=1.0, weights_source=source, output="pooled", device=device)


# ---------------------------------------------------------------------------------------------
# timm / Hugging Face Hub


def _hf_message(repo: str, err: BaseException) -> str:
    from huggingface_hub import constants

    page = f"https://huggingface.co/{repo}"
    kind = type(err).__name__
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if kind == "GatedRepoError" or "gated" in str(err).lower() or "401" in str(err) or "403" in str(err):
        return (f"encoder 'hf-hub:{repo}' is gated: request access on {page}, then run `hf auth login` "
                "(or set HF_TOKEN) on a node with internet and pre-download it (HF_HUB_OFFLINE=0)")
    if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return f"encoder 'hf-hub:{repo}': no such model on the Hub (check the name at {page}) or it is private (`hf auth login`)"
    cache = constants.HF_HUB_CACHE
    return (f"encoder 'hf-hub:{repo}' is not in the local Hugging Face cache {cache}"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: pre-download it on a login node with internet "
            f"(HF_HUB_OFFLINE=0 hf download {repo}, after `hf auth login` if gated), then run with "
            "HF_HUB_OFFLINE=1 and the same HF_HOME")


def _is_hub_error(err: BaseException) -> bool:
    mod = type(err).__module__ or ""
    return mod.startswith("huggingface_hub") or isinstance(err, (OSError, ConnectionError, TimeoutError))


def hub_revision(repo: str) -> str:
    """The cached commit of ``repo`` (for the audit log), or ``?``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
        if isinstance(found, str):
            return Path(found).parent.name
    except Exception:  # audit detail only
        pass
    return "?"


def load_timm(model_name: str, *, hub: bool, allow_random_weights: bool = False, device: str = "cpu",
              output: str | None = None, extra_kwargs: dict | None = None) -> LoadedEncoder:
    """``timm:<model>`` (hub=False) or ``hf-hub:<repo>`` (hub=True) through ``timm.create_model``."""
    import timm
    from timm.data import resolve_data_config

    spec = KNOWN_MODELS.get(model_name) if hub else None
    if spec is not None and spec.backend == "transformers":
        return _load_transformers(spec, device=device)
    if spec is not None and spec.backend == "conch":
        return load_conch_v15(spec, device=device, allow_random_weights=allow_random_weights)
    kwargs = dict(spec.kwargs() if (spec and spec.kwargs) else {})
    kwargs.setdefault("num_classes", 0)
    kwargs.update(extra_kwargs or {})
    timm_name = f"hf-hub:{model_name}" if hub else model_name
    pretrained = not allow_random_weights
    try:
        net = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if "Unknown model" in str(err):
            raise EncoderError(f"encoder 'timm:{model_name}': timm {timm.__version__} has no such model "
                               "(list them with timm.list_models('*pattern*'))") from None
        if _is_hub_error(err):
            repo = model_name if hub else f"timm/{model_name}"
            raise EncoderError(_hf_message(repo, err)) from None
        raise
    name = f"hf-hub:{model_name}" if hub else f"timm:{model_name}"
    if spec is not None:
        size, mean, std, interp, crop = spec.input_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct
        out = output or spec.output
    else:
        cfg = resolve_data_config(model=net)
        size = int(cfg["input_size"][-1])
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        interp, crop = str(cfg.get("interpolation", "bilinear")), float(cfg.get("crop_pct", 1.0))
        out = output or "pooled"
    if allow_random_weights:
        source = "random-init (allow_random_weights)"
    elif hub:
        source = f"hf-hub:{model_name}@{hub_revision(model_name)}"
    else:
        tag = (getattr(net, "pretrained_cfg", None) or {}).get("hf_hub_id") or model_name
        source = f"timm:{tag}"
    return _finalise(_make_head(net, out), name=name, input_size=size, mean=mean, std=std,
                     interpolation=interp, crop_pct=crop, weights_source=source, output=out, device=device,
                     meta={"licence": spec.licence, "trained_mpp": spec.mpp} if spec else {})


def _load_transformers(spec: ModelSpec, *, device: str) -> LoadedEncoder:
    try:
        from transformers import AutoModel
    except ImportError:
        raise EncoderError(f"encoder 'hf-hub:{spec.repo}' is a Hugging Face transformers model: "
                           "ask for `transformers` in requirements.lock (pip install transformers)") from None
    from torch import nn

    try:
        net = AutoModel.from_pretrained(spec.repo)
    except Exception as err:
        if _is_hub_error(err):
            raise EncoderError(_hf_message(spec.repo, err)) from None
        raise

    class ClassToken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).last_hidden_state[:, 0]

    return _finalise(ClassToken(net), name=f"hf-hub:{spec.repo}", input_size=spec.input_size, mean=spec.mean,
                     std=spec.std, interpolation=spec.interpolation, crop_pct=spec.crop_pct,
                     weights_source=f"hf-hub:{spec.repo}@{hub_revision(spec.repo)}", output="cls",
                     device=device, meta={"licence": spec.licence, "trained_mpp": spec.mpp})


# ---------------------------------------------------------------------------------------------
# local:<path>


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def _unwrap_state(obj: Any, key: str | None, prefixes) -> dict:
    """The state_dict inside a checkpoint: ``obj[key]`` (or a usual wrapper key), prefixes stripped."""
    if key:
        for part in key.split("."):
            obj = obj[part]
    elif isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
        for wrapper in ("state_dict", "model", "teacher", "student", "encoder"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    state = {}
    for k, v in obj.items():
        for prefix in prefixes:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def sidecar_path(path: Path) -> Path | None:
    """``<file>.json`` or ``<file without suffix>.json`` beside a local checkpoint."""
    for cand in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if cand.is_file() and cand != path:
            return cand
    return None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def build_architecture(arch: str, timm_kwargs: dict | None = None):
    """An untrained backbone for a sidecar's ``arch``: ``resnet50-trunc``, ``timm:<model>`` or ``ssl:<arch>``."""
    if arch == "resnet50-trunc":
        return truncated_resnet50()[0], "pooled"
    if arch.startswith("timm:"):
        import timm

        kwargs = {"num_classes": 0, **(timm_kwargs or {})}
        try:
            return timm.create_model(arch[len("timm:"):], pretrained=False, **kwargs), "pooled"
        except RuntimeError as err:
            raise EncoderError(f"sidecar arch {arch!r}: {_first_line(err)}") from None
    if arch.startswith("ssl:"):
        from .ssl import build_backbone

        return build_backbone(arch[len("ssl:"):]), "pooled"
    raise EncoderError(f"sidecar arch {arch!r} is not resnet50-trunc, timm:<model> or ssl:<arch>")


TORCHSCRIPT_NEEDS_TRUST = ("a TorchScript file is code (it runs when loaded); set features.trust_local_code: true "
                           "if you trust it, or give a weights-only state_dict with a sidecar JSON (docs/encoders.md)")


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled code), not plain weights."""
    path = Path(path).expanduser()
    return path.is_file() and _is_torchscript(path)


def needs_transformers(name: str) -> bool:
    """Whether encoder ``name`` (e.g. phikon, phikon-v2) is a Hugging Face transformers model."""
    resolved = resolve_name(name)
    spec = KNOWN_MODELS.get(resolved[len("hf-hub:"):]) if resolved.startswith("hf-hub:") else None
    return spec is not None and spec.backend == "transformers"


def load_local(path: str | os.PathLike, *, device: str = "cpu", name: str | None = None,
               trust_local_code: bool = False) -> LoadedEncoder:
    """``local:<path>``: a TorchScript file, a histoflow checkpoint, or a state_dict + sidecar JSON.

    Sidecar ``<path>.json`` (or ``<stem>.json``) keys: ``arch`` (required for a state_dict),
    ``timm_kwargs``, ``input_size`` (224), ``mean``/``std`` (ImageNet), ``interpolation``
    (bilinear), ``crop_pct`` (1.0), ``output`` (pooled | cls | cls+mean_patch | mean_patch),
    ``state_dict_key`` (e.g. ``teacher``), ``strip_prefixes`` (["module."]).
    """
    import torch

    path = Path(path).expanduser()
    name = name or f"local:{path}"
    if not path.is_file():
        raise EncoderError(f"encoder {name!r}: file {str(path)!r} does not exist (fix the path in features.encoders)")
    side_file = sidecar_path(path)
    side: dict = json.loads(side_file.read_text()) if side_file else {}
    source = file_fingerprint(path)
    common = dict(input_size=side.get("input_size", 224), mean=side.get("mean", IMAGENET_MEAN),
                  std=side.get("std", IMAGENET_STD), interpolation=side.get("interpolation", "bilinear"),
                  crop_pct=side.get("crop_pct", 1.0))
    if _is_torchscript(path):
        if not trust_local_code:
            raise EncoderError(f"encoder {name!r}: {TORCHSCRIPT_NEEDS_TRUST}")
        if not side_file:
            log.warning("%s: TorchScript without a sidecar JSON: assuming 224 px, ImageNet mean/std", path)
        net = torch.jit.load(str(path), map_location="cpu")
        output = side.get("output", "pooled")
        return _finalise(_make_head(net, output), name=name, weights_source=source, output=output, device=device, **common)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderError(f"encoder {name!r}: {path} is not a TorchScript file or a weights-only torch "
                           f"checkpoint ({_first_line(err)}); see docs/encoders.md for the format") from None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("histoflow-ssl"):
        return load_ssl_checkpoint(path, device=device, name=name, checkpoint=obj)
    arch = side.get("arch")
    if not arch:
        raise EncoderError(f"encoder {name!r}: a state_dict needs a sidecar {path.name}.json naming its "
                           "'arch' (resnet50-trunc, timm:<model> or ssl:<arch>); see docs/encoders.md")
    net, default_output = build_architecture(arch, side.get("timm_kwargs"))
    state = _unwrap_state(obj, side.get("state_dict_key"), tuple(side.get("strip_prefixes", ["module."])))
    target = net
    if arch == "resnet50-trunc" and any(k.startswith("conv1.") for k in state):
        # a full torchvision ResNet-50 state_dict: load it whole, keep the truncated part
        net, target = truncated_resnet50()
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EncoderError(f"encoder {name!r}: weights do not fit arch {arch!r} ({_first_line(err)}); "
                           "fix 'arch'/'timm_kwargs'/'state_dict_key'/'strip_prefixes' in the sidecar") from None
    output = side.get("output", default_output)
    return _finalise(_make_head(net, output), name=name, weights_source=source, output=output, device=device, **common)


# ---------------------------------------------------------------------------------------------
# ssl:<arch>


def load_ssl_checkpoint(path: str | os.PathLike, *, device: str = "cpu", name: str | None = None,
                        checkpoint: dict | None = None) -> LoadedEncoder:
    """A checkpoint written by :func:`histoflow.ssl.save_encoder` (``{outdir}/ssl/{arch}/encoder.pt``)."""
    import torch

    from .ssl import build_backbone

    path = Path(path)
    if checkpoint is None:
        if not path.is_file():
            raise EncoderError(f"encoder {name or path}: checkpoint {str(path)!r} does not exist; "
                               "run the ssl_pretrain rule (snakemake ssl_pretrain) first")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    arch = checkpoint["arch"]
    net = build_backbone(arch, **checkpoint.get("arch_kwargs", {}))
    net.load_state_dict(checkpoint["state_dict"], strict=True)
    return _finalise(_make_head(net, "pooled"), name=name or f"ssl:{arch}", input_size=checkpoint["input_size"],
                     mean=checkpoint["mean"], std=checkpoint["std"], interpolation="bilinear", crop_pct=1.0,
                     weights_source=file_fingerprint(path), output="pooled", device=device,
                     meta={k: checkpoint[k] for k in ("epochs", "n_tiles", "seed", "method", "tile_mpp") if k in checkpoint})


# ---------------------------------------------------------------------------------------------
# The entry point


def load_encoder(name: str, *, ssl_checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                 weights_dir: str | os.PathLike | None = None, allow_random_weights: bool = False,
                 trust_local_code: bool = False) -> LoadedEncoder:
    """Build the encoder ``name`` (see the module docstring for the names), frozen, in eval mode.
    A ``local:`` TorchScript file runs code when loaded: only with ``trust_local_code``."""
    raw = name
    name = resolve_name(name)
    if name == "resnet50-trunc":
        return load_resnet50_trunc(weights_dir=weights_dir, allow_random_weights=allow_random_weights, device=device)
    if name.startswith("timm:"):
        return load_timm(name[len("timm:"):], hub=False, allow_random_weights=allow_random_weights, device=device)
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        if repo.count("/") != 1:
            raise EncoderError(f"encoder {raw!r}: give hf-hub:<org>/<model> (e.g. hf-hub:MahmoodLab/UNI2-h)")
        return load_timm(repo, hub=True, allow_random_weights=allow_random_weights, device=device)
    if name.startswith("local:"):
        return load_local(name[len("local:"):], device=device, name=name, trust_local_code=trust_local_code)
    if name.startswith("ssl:"):
        if ssl_checkpoint is None:
            raise EncoderError(f"encoder {raw!r} needs its checkpoint {{outdir}}/ssl/{name[4:]}/encoder.pt "
                               "(the features rule passes it; run `snakemake ssl_pretrain`)")
        return load_ssl_checkpoint(ssl_checkpoint, device=device, name=name)
    known = ", ".join(sorted(ALIASES))
    raise EncoderError(f"encoder {raw!r} is unknown: use resnet50-trunc, timm:<model>, hf-hub:<org>/<model>, "
                       f"local:<path>, ssl:<arch> or an alias ({known}) in features.encoders")


# ---------------------------------------------------------------------------------------------
# Offline builds of the named foundation models (no download): `histoflow encoders [--build]`
# and tests/test_encoder_registry.py. The architecture comes from the registry alone, so a wrong
# kwarg shows up as a strict state_dict load failure against the real checkpoint's layout.

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
        class ClassToken(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(pixel_values=x).last_hidden_state[:, 0]

        return ClassToken(backbone)
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


def encoder_row(spec: ModelSpec) -> dict[str, Any]:
    """The registry's (published) row of `histoflow encoders`."""
    return {"name": spec.aliases[0], "repo": spec.repo, "dim": spec.dim,
            "params_m": "" if spec.params_m is None else spec.params_m, "input_px": spec.input_size,
            "mpp": spec.mpp, "output": spec.output, "licence": spec.licence, "checked": "registry"}


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


def trained_mpp(name: str) -> float | None:
    """µm/px a named foundation model was trained at (None for other encoders)."""
    try:
        return spec_for(name).mpp
    except EncoderError:
        return None


CONCH_WEIGHTS = "pytorch_model_vision.bin"


def fit_pos_embed(state: dict, model, key: str = "trunk.pos_embed") -> dict:
    """Resample a checkpoint's position embedding to ``model``'s grid (what TRIDENT does before its
    strict load of CONCH v1.5: bilinear, no antialias); the run then interpolates to 448 px."""
    from timm.layers import resample_abs_pos_embed

    target = model.state_dict()[key]
    if key in state and tuple(state[key].shape) != tuple(target.shape):
        trunk = model.trunk
        prefix = 0 if getattr(trunk, "no_embed_class", False) else int(getattr(trunk, "num_prefix_tokens", 1))
        state = dict(state)
        state[key] = resample_abs_pos_embed(state[key], new_size=trunk.patch_embed.grid_size,
                                            num_prefix_tokens=prefix, interpolation="bilinear",
                                            antialias=False, verbose=False)
    return state


def load_conch_v15(spec: ModelSpec, *, device: str = "cpu", allow_random_weights: bool = False) -> LoadedEncoder:
    """``conch-v1.5``: TITAN's CONCH v1.5 vision tower from the Hub's ``pytorch_model_vision.bin``."""
    import torch

    model = build_backbone_offline(spec)
    if allow_random_weights:
        source = "random-init (allow_random_weights)"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(spec.repo, CONCH_WEIGHTS)
        except Exception as err:
            if _is_hub_error(err):
                raise EncoderError(_hf_message(spec.repo, err)) from None
            raise
        state = fit_pos_embed(torch.load(path, map_location="cpu", weights_only=True), model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise EncoderError(f"{path} is not CONCH v1.5's vision tower ({_first_line(err)})") from None
        source = f"hf-hub:{spec.repo}@{hub_revision(spec.repo)}"
    return _finalise(model, name=f"hf-hub:{spec.repo}", input_size=spec.input_size, mean=spec.mean, std=spec.std,
                     interpolation=spec.interpolation, crop_pct=spec.crop_pct, weights_source=source,
                     output=spec.output, device=device, meta={"licence": spec.licence, "trained_mpp": spec.mpp})
