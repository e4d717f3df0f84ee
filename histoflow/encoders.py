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

from .encoder_builds import (_conch_tower, class_token, _make_head, _random_fill, _transformers_config,  # noqa: F401
                             build_backbone_offline, build_offline, encoder_module, encoder_rows)
from .encoder_registry import (ALIASES, ENCODER_COLUMNS, HOPTIMUS_MEAN, HOPTIMUS_STD,  # noqa: F401
                               IMAGENET_MEAN, IMAGENET_STD, KNOWN_MODELS, LOCAL_FORMAT, OUTPUTS, EncoderError,
                               ModelSpec, encoder_row, encoder_slug, needs_transformers,
                               registry_names, resolve_name, spec_for, timm_build_kwargs, trained_mpp)
from .devices import resolve_device  # noqa: F401 - the one rule, re-exported for callers
from .logs import get_logger

log = get_logger(__name__)

# torchvision's original ImageNet ResNet-50 (IMAGENET1K_V1), the weights CLAM's features used.
RESNET50_FILES = ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth", "resnet50-11ad3fa6.pth")
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


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



def _finalise(model, *, name: str, input_size: int, mean, std, interpolation: str, crop_pct: float,
              weights_source: str, output: str, device: str, meta: dict | None = None,
              weights_file: str | os.PathLike | None = None, probe_extra: str = "") -> LoadedEncoder:
    """Freeze the model, move it to ``device`` and measure its output dimension with a dry run
    (skipped when the dimension is cached for ``weights_file``, the weights' own file)."""
    import torch

    device = resolve_device(device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    probe = hashlib.sha1(f"{name}|{output}|{int(input_size)}|{type(model).__name__}|{probe_extra}".encode()).hexdigest()
    dim = cached_dim(weights_file, probe)
    if dim is None:
        # the dry run measures the output width (cached per weights file: a ViT-L's takes ~1 s on CPU)
        with torch.inference_mode():
            y = model(torch.zeros(2, 3, int(input_size), int(input_size), device=device))
        if y.ndim != 2 or y.shape[0] != 2:
            raise EncoderError(f"encoder {name!r} returns shape {tuple(y.shape)} for 2 tiles, not 2 x dim; "
                               "choose an output pooling ('output' in the sidecar JSON)")
        dim = int(y.shape[1])
        remember_dim(weights_file, probe, dim)
    return LoadedEncoder(model=model, name=name, input_size=int(input_size),
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                         dim=dim, interpolation=str(interpolation), crop_pct=float(crop_pct),
                         weights_source=weights_source, output=output, device=device, meta=dict(meta or {}))



CHECKSUM_CACHE_ENV = "HISTOFLOW_CACHE_DIR"


def checksum_cache_dir() -> Path:
    """Where weight checksums are cached: $HISTOFLOW_CACHE_DIR, else $XDG_CACHE_HOME/histoflow
    (~/.cache/histoflow). Local to the site (it holds file paths); safe to delete."""
    base = os.environ.get(CHECKSUM_CACHE_ENV)
    if base:
        return Path(base).expanduser() / "checksums"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "histoflow" / "checksums"


def _checksum_key(path: Path, st: os.stat_result) -> dict[str, Any]:
    return {"path": str(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _checksum_entry(path: Path, st: os.stat_result) -> Path:
    key = json.dumps(_checksum_key(path, st), sort_keys=True)
    # one small file per (path, size, mtime): concurrent jobs never lose each other's entries
    return checksum_cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.json"


def _read_cache_entry(path: Path, st: os.stat_result) -> dict[str, Any]:
    try:
        entry = json.loads(_checksum_entry(path, st).read_text())
    except (OSError, ValueError):
        return {}
    return entry if isinstance(entry, dict) and entry.get("key") == _checksum_key(path, st) else {}


def _write_cache_entry(path: Path, st: os.stat_result, **values: Any) -> None:
    """Merge ``values`` into the file's cache entry (atomic write; a read-only cache is no error)."""
    from .io import write_json

    entry = _read_cache_entry(path, st) or {"key": _checksum_key(path, st)}
    entry.update(values)
    try:
        write_json(_checksum_entry(path, st), entry)
    except OSError as err:   # a cache, never a reason to fail
        log.debug("checksum cache %s not writable: %s", checksum_cache_dir(), err)


def file_sha256(path: str | os.PathLike) -> str:
    """The file's full sha256 hex digest, cached on disk by (path, size, mtime): a multi-GB
    checkpoint is hashed once, not once per job. Streamed, so large files do not fill memory."""
    path = Path(path).resolve()
    st = path.stat()
    cached = _read_cache_entry(path, st).get("sha256")
    if isinstance(cached, str) and len(cached) == 64:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    _write_cache_entry(path, st, sha256=digest.hexdigest())
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike, n_hex: int = 16) -> str:
    """``<path> sha256:<prefix>`` (the sha256 is cached, see :func:`file_sha256`)."""
    return f"{path} sha256:{file_sha256(path)[:n_hex]}"


def cached_dim(path: str | os.PathLike | None, probe: str) -> int | None:
    """The output width measured before for weights file ``path`` under ``probe`` (its arch,
    output and input size), or None: saves the dry run of a large model on every job."""
    if not path:
        return None
    try:
        p = Path(path).resolve()
        dim = _read_cache_entry(p, p.stat()).get("dims", {}).get(probe)
    except OSError:
        return None
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def remember_dim(path: str | os.PathLike | None, probe: str, dim: int) -> None:
    if not path:
        return
    try:
        p = Path(path).resolve()
        st = p.stat()
    except OSError:
        return
    dims = dict(_read_cache_entry(p, st).get("dims", {}))
    dims[probe] = int(dim)
    _write_cache_entry(p, st, dims=dims)


def torch_load(path: str | os.PathLike):
    """``torch.load`` of weights only, memory-mapped when the file allows it (zip format): a large
    checkpoint is paged in as the model reads it instead of copied first (faster, lower RSS)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format


def load_into(build: Callable[[], Any], state: dict, *, target: Callable[[Any], Any] | None = None):
    """``build()`` with ``state`` loaded strictly, as ``load_state_dict`` would (same values, the
    model's own dtypes). Built on the meta device and filled by assignment: no random init of
    hundreds of millions of weights only to overwrite them, no second copy of the loaded
    tensors. A model holding a tensor the state lacks (a non-persistent buffer) is rebuilt the
    usual way. ``target(built)`` is the module the state is for (default: ``built`` itself)."""
    import torch

    target = target or (lambda m: m)
    with torch.device("meta"):
        built = build()
    module = target(built)
    want = module.state_dict()
    # assignment keeps the file's dtype: cast to the model's (load_state_dict's copy does that)
    state = {k: (v.to(want[k].dtype) if k in want and hasattr(v, "dtype") and v.dtype != want[k].dtype else v)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        built = build()
        target(built).load_state_dict(state, strict=True)
    return built


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

    path = find_resnet50_weights(weights_dir)
    if path is None:
        model, _ = truncated_resnet50()
        if not allow_random_weights:
            where = weights_search_dirs(weights_dir)[0]
            raise EncoderError(
                f"encoder 'resnet50-trunc' needs ImageNet weights: download {RESNET50_URL} into {where} "
                "(or set features.weights_dir / HISTOFLOW_WEIGHTS to the folder holding resnet50-*.pth)")
        source = "random-init (allow_random_weights)"
        log.warning("resnet50-trunc: no weights found, using RANDOM weights (allowed for tests/benchmarks only)")
    else:
        state = _unwrap_state(torch_load(path), None, ("module.",))
        try:
            model, _ = load_into(truncated_resnet50, state, target=lambda built: built[1])
        except RuntimeError as err:
            raise EncoderError(f"{path} is not a torchvision ResNet-50 state_dict ({_first_line(err)}); "
                               f"use {RESNET50_URL}") from None
        source = file_fingerprint(path)
    return _finalise(model, name="resnet50-trunc", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation="bilinear", crop_pct=1.0, weights_source=source, output="pooled", device=device,
                     weights_file=path)


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

    return _finalise(class_token(net), name=f"hf-hub:{spec.repo}", input_size=spec.input_size, mean=spec.mean,
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
        obj = torch_load(path)
    except Exception as err:
        raise EncoderError(f"encoder {name!r}: {path} is not a TorchScript file or a weights-only torch "
                           f"checkpoint ({_first_line(err)}); see docs/encoders.md for the format") from None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("histoflow-ssl"):
        return load_ssl_checkpoint(path, device=device, name=name, checkpoint=obj)
    arch = side.get("arch")
    if not arch:
        raise EncoderError(f"encoder {name!r}: a state_dict needs a sidecar {path.name}.json naming its "
                           "'arch' (resnet50-trunc, timm:<model> or ssl:<arch>); see docs/encoders.md")
    state = _unwrap_state(obj, side.get("state_dict_key"), tuple(side.get("strip_prefixes", ["module."])))
    if arch == "resnet50-trunc" and any(k.startswith("conv1.") for k in state):
        # a full torchvision ResNet-50 state_dict: load it whole, keep the truncated part
        build, target, default_output = truncated_resnet50, (lambda built: built[1]), "pooled"
    else:
        build, target = (lambda: build_architecture(arch, side.get("timm_kwargs"))), (lambda built: built[0])
        default_output = None
    try:
        built = load_into(build, state, target=target)
    except RuntimeError as err:
        raise EncoderError(f"encoder {name!r}: weights do not fit arch {arch!r} ({_first_line(err)}); "
                           "fix 'arch'/'timm_kwargs'/'state_dict_key'/'strip_prefixes' in the sidecar") from None
    net, default_output = built[0], default_output or built[1]
    output = side.get("output", default_output)
    return _finalise(_make_head(net, output), name=name, weights_source=source, output=output, device=device,
                     weights_file=path, probe_extra=json.dumps(side, sort_keys=True), **common)


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
                     weights_source=file_fingerprint(path), output="pooled", device=device, weights_file=path,
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
