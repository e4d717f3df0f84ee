"""Every named foundation encoder is built from the registry alone (no download) and checked
against an independent description of its real checkpoint: the state_dict is synthesised from
that description (never taken from the built model) and loaded with strict=True, so a wrong timm
name or kwarg (a missing register token, a 14-px patch where the checkpoint has 16, a GELU MLP
where it has a packed SwiGLU) fails. Shapes only, on the meta device (cheap, in CI); the
`slow` tests materialise each model on CPU, load random tensors of those shapes strictly and run
one tile through it (`pytest -m slow tests/test_encoder_registry.py`, `make test-slow`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from histoflow.encoders import (IMAGENET_MEAN, IMAGENET_STD, KNOWN_MODELS, EncoderError, build_backbone_offline,
                                build_offline, encoder_module, encoder_rows, fit_pos_embed, registry_names, spec_for)

REPO = Path(__file__).resolve().parent.parent
TRIDENT = "https://github.com/mahmoodlab/TRIDENT/blob/a91fa8490e0210ebbbe58452c3babe009e0ab7ca/"
TRIDENT_LOAD = TRIDENT + "trident/patch_encoder_models/load.py"
TRIDENT_CONCH = TRIDENT + "trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py"

# The real checkpoints, as their configs describe them (timm key names: the Hub's timm weights and
# TRIDENT's strict local loads use these). pos_tokens: patches (img/patch)^2, plus the prefix
# tokens unless the model keeps them out of pos_embed (no_embed_class: UNI2-h, the DINOv2-reg4
# H-optimus models). mlp: ("gelu", hidden) = fc1 [hidden, dim]; ("swiglu", hidden) = timm's packed
# SwiGLU, fc1 [2*hidden, dim] (DINOv2's w12), fc2 [dim, hidden] (w3).
CHECKPOINTS = {
    # ViT-L/16, 224 px, LayerScale (init_values), GELU MLP 4x
    "uni": dict(depth=24, dim=1024, patch=16, pos_tokens=14 * 14 + 1, regs=0, mlp=("gelu", 4096)),
    # ViT-H/14-ish: 24 blocks of 1536, 8 registers, SwiGLU (mlp_ratio 2.66667*2 -> 8192 packed)
    "uni2-h": dict(depth=24, dim=1536, patch=14, pos_tokens=16 * 16, regs=8, mlp=("swiglu", 4096)),
    # TITAN's CONCH v1.5 vision tower: iBOT ViT-L/16 trunk (LayerScale), attentional pooler to 768.
    # The trunk's pos_embed is resampled at load (TRIDENT does too); its stored grid is not
    # published, so a 448-px grid (28 x 28 + cls) is synthesised to exercise the resampling.
    "conch-v1.5": dict(prefix="trunk.", depth=24, dim=1024, patch=16, pos_tokens=28 * 28 + 1, regs=0,
                       mlp=("gelu", 4096), extra={
                           "attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_q.weight": (768,),
                           "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.ln_k.weight": (1024,),
                           "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.to_q.weight": (768, 768),
                           "attn_pool_contrast.to_kv.weight": (1536, 1024),
                           "attn_pool_contrast.to_out.weight": (768, 768),
                           "ln_contrast.weight": (768,), "ln_contrast.bias": (768,)}),
    # ViT-H/14, 32 blocks of 1280, SwiGLU with mlp_ratio 5.3375: int(1280 * 5.3375) = 6832 packed
    "virchow": dict(depth=32, dim=1280, patch=14, pos_tokens=16 * 16 + 1, regs=0, mlp=("swiglu", 3416)),
    "virchow2": dict(depth=32, dim=1280, patch=14, pos_tokens=16 * 16 + 1 + 4, regs=4, mlp=("swiglu", 3416)),
    # ViT-g/14 DINOv2 with 4 registers: 40 blocks of 1536, SwiGLU 8192 packed
    "h-optimus-0": dict(depth=40, dim=1536, patch=14, pos_tokens=16 * 16, regs=4, mlp=("swiglu", 4096)),
    "h-optimus-1": dict(depth=40, dim=1536, patch=14, pos_tokens=16 * 16, regs=4, mlp=("swiglu", 4096)),
    # ViT-g DINOv2 with 16-px patches at 224 px (the Hub config overrides the /14 default)
    "prov-gigapath": dict(depth=40, dim=1536, patch=16, pos_tokens=14 * 14 + 1, regs=0, mlp=("swiglu", 4096)),
}
TIMM_NAMES = list(CHECKPOINTS)
TRANSFORMERS_NAMES = ["phikon", "phikon-v2"]
BIG = {"h-optimus-0", "h-optimus-1", "prov-gigapath"}

# Preprocessing as the eval transforms write it (TRIDENT load.py / conchv1_5.py at the commit
# above): (input px, interpolation, mean, std, crop_pct). Resize(s) + CenterCrop(s) of a square
# tile = crop_pct 1; Resize(256) + CenterCrop(224) = 0.875. torchvision Resize defaults to bilinear.
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
PREPROCESSING = {
    "uni": (224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
    "uni2-h": (224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
    "conch-v1.5": (448, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_CONCH),
    "virchow": (224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
    "virchow2": (224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
    "h-optimus-0": (224, "bilinear", *HOPT, 1.0, TRIDENT_LOAD),
    "h-optimus-1": (224, "bilinear", *HOPT, 1.0, TRIDENT_LOAD),
    "prov-gigapath": (224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 0.875, TRIDENT_LOAD),
    "phikon": (224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
    "phikon-v2": (224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, TRIDENT_LOAD),
}
# Output widths and parameter counts as published (issue 20 / papers / the registry's sources).
WIDTHS = {"uni": 1024, "uni2-h": 1536, "conch-v1.5": 768, "virchow": 2560, "virchow2": 2560,
          "h-optimus-0": 1536, "h-optimus-1": 1536, "prov-gigapath": 1536, "phikon": 768, "phikon-v2": 1024}
PARAMS_M = {"uni": 303, "uni2-h": 681, "virchow": 632, "virchow2": 632, "h-optimus-0": 1100,
            "h-optimus-1": 1100, "prov-gigapath": 1100}


def checkpoint_shapes(desc: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a timm-format ViT checkpoint described by ``desc``."""
    p, d, k = desc.get("prefix", ""), desc["dim"], desc["patch"]
    kind, hidden = desc["mlp"]
    fc1 = 2 * hidden if kind == "swiglu" else hidden
    shapes = {"patch_embed.proj.weight": (d, 3, k, k), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
              "pos_embed": (1, desc["pos_tokens"], d), "norm.weight": (d,), "norm.bias": (d,)}
    if desc["regs"]:
        shapes["reg_token"] = (1, desc["regs"], d)
    for i in range(desc["depth"]):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (fc1, d), b + "mlp.fc1.bias": (fc1,), b + "mlp.fc2.weight": (d, hidden),
            b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    out = {p + key: shape for key, shape in shapes.items()}
    out.update(desc.get("extra", {}))
    return out


def synthetic_state(name: str, *, real: bool) -> dict[str, torch.Tensor]:
    shapes = checkpoint_shapes(CHECKPOINTS[name])
    if not real:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def strict_load(name: str, state: dict, model) -> None:
    if spec_for(name).backend == "conch":
        state = fit_pos_embed(state, model)
    model.load_state_dict(state, strict=True, assign=True)


def test_every_issue_name_is_in_the_registry_and_described():
    names = set(registry_names())
    assert {"uni", "uni2-h", "conch-v1.5", "virchow", "virchow2", "h-optimus-0", "h-optimus-1",
            "prov-gigapath", "phikon", "phikon-v2"} <= names
    assert names == set(CHECKPOINTS) | set(TRANSFORMERS_NAMES)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_real_checkpoint_layout_loads_strictly_and_gives_the_published_width(name):
    spec = spec_for(name)
    with torch.device("meta"):
        backbone = build_backbone_offline(spec)
        strict_load(name, synthetic_state(name, real=False), backbone)
        model = encoder_module(spec, backbone).eval()
        y = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert tuple(y.shape) == (2, WIDTHS[name]) == (2, spec.dim)
    n = sum(p.numel() for p in backbone.parameters()) / 1e6
    if name in PARAMS_M:
        assert abs(n - PARAMS_M[name]) / PARAMS_M[name] < 0.04, f"{name}: {n:.1f} M parameters"
        assert spec.params_m == pytest.approx(PARAMS_M[name], rel=0.01)


def test_a_wrong_config_fails_the_strict_load():
    """The check has teeth: Virchow2 without its 4 registers, GigaPath at /14 both fail."""
    import dataclasses

    for name, bad in (("virchow2", {"reg_tokens": 0}), ("prov-gigapath", {"patch_size": 14})):
        spec = spec_for(name)
        args = spec.hub_args()
        wrong = dataclasses.replace(spec, hub_args=lambda a=args, b=bad: {**a, **b})
        with torch.device("meta"):
            model = build_backbone_offline(wrong)
            with pytest.raises(RuntimeError, match="reg_token|size mismatch"):
                model.load_state_dict(synthetic_state(name, real=False), strict=True)


@pytest.mark.parametrize("name", list(PREPROCESSING))
def test_preprocessing_matches_the_recorded_source(name):
    spec = spec_for(name)
    size, interp, mean, std, crop, source = PREPROCESSING[name]
    assert (spec.input_size, spec.interpolation, spec.crop_pct) == (size, interp, crop)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    assert spec.sources["preprocessing"] == source
    assert spec.sources["model_card"] == f"https://huggingface.co/{spec.repo}"
    for key in ("architecture", "dim", "mpp"):
        assert spec.sources[key].startswith("https://"), (name, key)
    if spec.params_m is not None:
        assert spec.sources.get("params_m"), f"{name}: a published parameter count needs its source"
    assert spec.mpp == 0.5   # every one is used at 20x (TRIDENT's `--mag 20`)


def test_transformers_models_are_skipped_clearly_without_transformers(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(EncoderError, match="transformers"):
        build_offline("phikon")
    (row,) = encoder_rows(build=True, only=["phikon-v2"])
    assert row["checked"].startswith("skipped: ") and "transformers" in row["checked"]
    assert row["dim"] == 1024 and row["params_m"] == ""
    with pytest.raises(EncoderError, match="not a known foundation model"):
        encoder_rows(only=["unii"])


def test_cli_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "histoflow.cli", "encoders"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines[0] == ["name", "repo", "dim", "params_m", "input_px", "mpp", "output", "licence", "checked"]
    rows = {r[0]: dict(zip(lines[0], r)) for r in lines[1:]}
    assert set(rows) == set(registry_names())
    assert rows["virchow2"]["dim"] == "2560" and rows["virchow2"]["output"] == "cls+mean_patch"
    assert rows["conch-v1.5"]["input_px"] == "448" and rows["conch-v1.5"]["params_m"] == ""
    assert all(r["checked"] == "registry" for r in rows.values())


# ---------------------------------------------------------------------------------------------
# slow: real tensors on CPU, one model at a time (the three ~1.1 B ones need ~5 GB each)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_slow_random_checkpoint_loads_strictly_and_runs_one_tile(name):
    spec = spec_for(name)
    t0 = time.perf_counter()
    with torch.device("meta"):
        backbone = build_backbone_offline(spec)
    strict_load(name, synthetic_state(name, real=True), backbone)   # assign=True: no second copy
    model = encoder_module(spec, backbone).eval()
    x = torch.randn(1, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y = model(x)
    assert tuple(y.shape) == (1, WIDTHS[name]) and torch.isfinite(y).all()
    sys.stderr.write(f"{name}: strict load + one tile in {time.perf_counter() - t0:.1f} s\n")


@pytest.mark.slow
def test_slow_cli_build_measures_dim_and_params():
    proc = subprocess.run([sys.executable, "-m", "histoflow.cli", "encoders", "--build", "--only", "uni"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    header, row = (line.split("\t") for line in proc.stdout.strip().splitlines())
    got = dict(zip(header, row))
    assert got["checked"] == "built" and got["dim"] == "1024" and got["params_m"] == "303.4"
    assert "uni: built in" in proc.stderr


@pytest.mark.slow
def test_slow_conch_v15_loads_its_hub_file_through_load_encoder(tmp_path, monkeypatch):
    """The real path of `features.encoders: [conch-v1.5]`: pytorch_model_vision.bin from the HF
    cache (here a synthetic one with a 448-px pos_embed grid), resampled, strictly loaded."""
    import huggingface_hub

    from histoflow.encoders import load_encoder

    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(synthetic_state("conch-v1.5", real=True), path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, fname: asked.append((repo, fname)) or str(path))
    enc = load_encoder("conch-v1.5")
    assert asked == [("MahmoodLab/conchv1_5", "pytorch_model_vision.bin")]
    assert (enc.dim, enc.input_size, enc.interpolation) == (768, 448, "bilinear")
    assert enc.weights_source.startswith("hf-hub:MahmoodLab/conchv1_5@")
    torch.testing.assert_close(enc.model.attn_pool_contrast.to_kv.weight,
                               synthetic_state("conch-v1.5", real=True)["attn_pool_contrast.to_kv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMERS_NAMES)
def test_slow_transformers_models_build_when_installed(name):
    pytest.importorskip("transformers")
    row = build_offline(name)
    assert row["checked"] == "built" and row["dim"] == WIDTHS[name]


# ---------------------------------------------------------------------------------------------
# A run with a named foundation encoder tiles at that encoder's µm/px unless the config says so


def _at(monkeypatch, name: str, mpp: float) -> None:
    import dataclasses

    spec = spec_for(name)
    monkeypatch.setitem(KNOWN_MODELS, spec.repo, dataclasses.replace(spec, mpp=mpp))


def test_run_tiles_at_the_encoders_mpp_and_says_so(monkeypatch, caplog):
    from histoflow.config import validate_config

    _at(monkeypatch, "uni", 0.25)   # a model trained at 40x (none of the registry's is)
    with caplog.at_level("INFO", logger="histoflow.config"):
        config = validate_config({"samples": "x.tsv", "features": {"encoders": ["uni"]}})
    assert config["features"]["mpp"] == 0.25 and config["tiling"]["mpp"] == [0.25]
    assert any("0.25 µm/px" in r.getMessage() and "uni" in r.getMessage() for r in caplog.records)
    # with the registry's own value (0.5, the default) nothing changes and it is still said
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("INFO", logger="histoflow.config"):
        config = validate_config({"samples": "x.tsv", "features": {"encoders": ["uni"]}})
    assert config["features"]["mpp"] == 0.5 and any("trained at" in r.getMessage() for r in caplog.records)


def test_an_explicit_mpp_wins_with_a_warning(monkeypatch, caplog):
    from histoflow.config import validate_config

    _at(monkeypatch, "uni", 0.25)
    with caplog.at_level("INFO", logger="histoflow.config"):
        config = validate_config({"samples": "x.tsv", "tiling": {"mpp": [0.5, 1.0]},
                                  "features": {"encoders": ["uni"], "mpp": 1.0}})
    assert config["features"]["mpp"] == 1.0 and config["tiling"]["mpp"] == [0.5, 1.0]
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "features.mpp is 1.0" in warning.getMessage() and "features.mpp: 0.25" in warning.getMessage()
    # other encoders are left alone
    caplog.clear()
    config = validate_config({"samples": "x.tsv", "features": {"encoders": ["resnet50-trunc"], "mpp": 0.5}})
    assert config["features"]["mpp"] == 0.5 and not caplog.records


def test_the_resolution_is_said_where_no_logging_is_set_up(capsys):
    """Snakemake's start-up sets up no handler for histoflow's loggers (an INFO record would be
    dropped): the line then goes to stderr, so a run with a named encoder says it either way."""
    import logging

    from histoflow.config import validate_config

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []   # pytest's capture handlers sit on the root logger
    try:
        validate_config({"samples": "x.tsv", "features": {"encoders": ["uni"]}})
    finally:
        root.handlers[:] = saved
    assert "histoflow: features.mpp/tiling.mpp: tiling at 0.5 µm/px, the resolution uni was trained at" \
        in capsys.readouterr().err


def test_the_checklist_records_which_resolution_a_named_encoder_ran_at():
    from histoflow.checklist import ChecklistItem, _encoder_resolution

    it = ChecklistItem(5, "tiles")
    _encoder_resolution(it, {"features": {"encoders": ["uni", "resnet50-trunc"], "mpp": 0.5}})
    assert it.params == {"features.trained_mpp.uni": 0.5}
    assert "the resolution uni was trained at" in it.summary[0]
    it = ChecklistItem(5, "tiles")
    _encoder_resolution(it, {"features": {"encoders": ["uni"], "mpp": 1.0}})
    assert "set by the config, not the resolution of uni (trained at 0.5 µm/px)" in it.summary[0]
    it = ChecklistItem(5, "tiles")
    _encoder_resolution(it, {"features": {"encoders": ["ssl:resnet-tiny"], "mpp": 1.0}})
    assert not it.summary and not it.params
