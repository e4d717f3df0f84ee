"""The encoder registry: every name gives a frozen model mapping N x 3 x S x S to N x dim, with
its own preprocessing, weights from local files only, and one-line errors when weights are missing.
All weights here are tiny random models saved by the test: no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histoflow.encoders import (ALIASES, KNOWN_MODELS, EncoderError, LoadedEncoder, encoder_slug,
                                load_encoder, resolve_name)

REPO = Path(__file__).resolve().parent.parent


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_slug_is_path_safe_and_distinct():
    assert encoder_slug("hf-hub:MahmoodLab/UNI2-h") == "hf-hub-MahmoodLab_UNI2-h"
    assert encoder_slug("timm:resnet18.a1_in1k") == "timm-resnet18.a1_in1k"
    assert encoder_slug("ssl:resnet-tiny") == "ssl-resnet-tiny"
    assert "/" not in encoder_slug("local:/data/models/enc.pt")
    assert encoder_slug("resnet50-trunc") != encoder_slug("ssl:resnet50-trunc")


def test_resnet50_trunc_loads_local_weights_and_gives_1024_d(tmp_path, monkeypatch):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    ref = resnet50(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet50-0676ba61.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    enc = load_encoder("resnet50-trunc", weights_dir=tmp_path)
    assert isinstance(enc, LoadedEncoder)
    assert (enc.dim, enc.input_size, enc.mean, enc.std) == (1024, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    assert "resnet50-0676ba61.pth" in enc.weights_source and "sha256:" in enc.weights_source
    x = torch.randn(2, 3, 64, 64)
    ref.eval()
    with torch.no_grad():
        trunk = torch.nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.maxpool, ref.layer1, ref.layer2, ref.layer3)
        expected = trunk(x).mean(dim=(2, 3))
        got = enc.model(x)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, expected)


def test_resnet50_trunc_without_weights_fails_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("HISTOFLOW_WEIGHTS", raising=False)
    with pytest.raises(EncoderError) as info:
        load_encoder("resnet50-trunc", weights_dir=tmp_path / "weights")
    msg = _one_line(info.value)
    assert str(tmp_path / "weights") in msg and "resnet50-0676ba61.pth" in msg and "HISTOFLOW_WEIGHTS" in msg
    # explicit opt-in only: random weights for tests/benchmarks, recorded as such
    enc = load_encoder("resnet50-trunc", weights_dir=tmp_path / "weights", allow_random_weights=True)
    assert enc.dim == 1024 and enc.weights_source.startswith("random-init")


def test_weights_found_through_histoflow_weights_env(tmp_path, monkeypatch):
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), tmp_path / "resnet50-11ad3fa6.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HISTOFLOW_WEIGHTS", str(tmp_path))
    assert "resnet50-11ad3fa6.pth" in load_encoder("resnet50-trunc").weights_source


def _tiny_timm(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=0, **kwargs).eval()


def test_local_state_dict_with_sidecar_reproduces_the_model(tmp_path):
    net = _tiny_timm()
    ckpt = tmp_path / "enc.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    (tmp_path / "enc.pt.json").write_text(json.dumps({
        "arch": "timm:resnet10t", "input_size": 48, "mean": [0.7, 0.6, 0.7], "std": [0.2, 0.2, 0.2],
        "interpolation": "bicubic"}))
    enc = load_encoder(f"local:{ckpt}")
    assert (enc.input_size, enc.mean, enc.interpolation, enc.dim) == (48, (0.7, 0.6, 0.7), "bicubic", 512)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), net(x))


def test_local_torchscript_file(tmp_path):
    net = _tiny_timm()
    path = tmp_path / "scripted.pt"
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(path))
    (tmp_path / "scripted.json").write_text(json.dumps({"input_size": 32}))
    enc = load_encoder(f"local:{path}", trust_local_code=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), net(x))
    assert enc.dim == 512 and enc.input_size == 32


def test_local_state_dict_without_sidecar_or_wrong_arch_is_a_clear_error(tmp_path):
    net = _tiny_timm()
    ckpt = tmp_path / "bare.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(EncoderError, match="sidecar"):
        load_encoder(f"local:{ckpt}")
    (tmp_path / "bare.pt.json").write_text(json.dumps({"arch": "timm:resnet18"}))
    with pytest.raises(EncoderError) as info:
        load_encoder(f"local:{ckpt}")
    assert "do not fit" in _one_line(info.value)
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(f"local:{tmp_path / 'missing.pt'}")


def test_class_token_plus_mean_patch_tokens_excludes_registers(tmp_path):
    """Virchow2's embedding: [class token, mean of patch tokens], register tokens left out."""
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "reg_tokens": 4}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    (tmp_path / "vit.json").write_text(json.dumps({"arch": "timm:vit_tiny_patch16_224", "timm_kwargs": kwargs,
                                                    "input_size": 32, "output": "cls+mean_patch"}))
    enc = load_encoder(f"local:{tmp_path / 'vit.pt'}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # 1 cls + 4 registers
        torch.testing.assert_close(enc.model(x), expected)
    assert enc.dim == 48


def test_known_foundation_models_carry_their_model_card_settings():
    v2 = KNOWN_MODELS["paige-ai/Virchow2"]
    assert (v2.dim, v2.output) == (2560, "cls+mean_patch")
    uni2 = KNOWN_MODELS["MahmoodLab/UNI2-h"]
    kw = uni2.kwargs()
    assert (uni2.dim, kw["reg_tokens"], kw["patch_size"], kw["embed_dim"]) == (1536, 8, 14, 1536)
    hopt = KNOWN_MODELS["bioptimus/H-optimus-0"]
    assert hopt.mean == (0.707223, 0.578729, 0.703617) and hopt.std == (0.211883, 0.230117, 0.177517)
    assert KNOWN_MODELS["prov-gigapath/prov-gigapath"].crop_pct == pytest.approx(0.875)
    assert resolve_name("UNI2-h") == "hf-hub:MahmoodLab/UNI2-h"
    assert resolve_name("hf_hub:prov-gigapath/prov-gigapath") == "hf-hub:prov-gigapath/prov-gigapath"
    assert set(ALIASES) >= {"uni", "uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "phikon-v2"}


def test_unknown_names_and_ssl_without_checkpoint_fail_in_one_line():
    with pytest.raises(EncoderError) as info:
        load_encoder("imagenet-vgg")
    assert "features.encoders" in _one_line(info.value)
    with pytest.raises(EncoderError, match="ssl_pretrain"):
        load_encoder("ssl:resnet-tiny")
    with pytest.raises(EncoderError, match="no such model"):
        load_encoder("timm:not_a_real_model_xyz", allow_random_weights=True)


HF_SCRIPT = r"""
import json, sys, torch
from histoflow.encoders import load_encoder, EncoderError
enc = load_encoder("hf-hub:acme/tiny-path")
x = torch.load(sys.argv[1])
with torch.no_grad():
    y = enc.model(x)
try:
    load_encoder("hf-hub:acme/not-downloaded")
    missing = ""
except EncoderError as err:
    missing = str(err)
print(json.dumps({"y": y.tolist(), "dim": enc.dim, "size": enc.input_size, "mean": enc.mean,
                  "source": enc.weights_source, "missing": missing}))
"""


def test_hf_hub_model_loads_offline_from_the_local_cache(tmp_path):
    """timm.create_model('hf-hub:...') with HF_HUB_OFFLINE=1 reads HF_HOME's cache: no network."""
    from safetensors.torch import save_file

    net = _tiny_timm()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hf" / "hub" / "models--acme--tiny-path"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    (snap / "config.json").write_text(json.dumps({
        "architecture": "resnet10t", "num_classes": 0, "num_features": 512,
        "pretrained_cfg": {"input_size": [3, 40, 40], "mean": [0.6, 0.5, 0.6], "std": [0.25, 0.25, 0.2],
                           "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0}}))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snap / "model.safetensors"))
    x = torch.randn(2, 3, 40, 40)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path / "x.pt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (res["dim"], res["size"], res["mean"]) == (512, 40, [0.6, 0.5, 0.6])
    assert commit in res["source"]
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(res["y"]), net(x), atol=1e-5, rtol=1e-4)
    # a model absent from the cache: one line saying how to pre-download it
    assert "\n" not in res["missing"] and "hf download acme/not-downloaded" in res["missing"]
    assert "HF_HUB_OFFLINE" in res["missing"]


def test_local_torchscript_is_code_and_needs_trust_local_code(tmp_path):
    from histoflow.config import validate_config
    from histoflow.errors import InputError

    path = tmp_path / "scripted.pt"
    torch.jit.trace(_tiny_timm(), torch.zeros(1, 3, 32, 32)).save(str(path))
    with pytest.raises(EncoderError, match="trust_local_code") as info:
        load_encoder(f"local:{path}")
    assert "\n" not in str(info.value)
    config = {"samples": "x.tsv", "features": {"encoders": [f"local:{path}"]}}
    with pytest.raises(InputError) as info:
        validate_config(config)
    msg = str(info.value)
    assert "\n" not in msg and "features.encoders" in msg and "features.trust_local_code: true" in msg
    validate_config({"samples": "x.tsv", "features": {"encoders": [f"local:{path}"], "trust_local_code": True}})
    # a weights-only state_dict is data: it needs no trust
    ckpt = tmp_path / "weights.pt"
    torch.save(_tiny_timm().state_dict(), ckpt)
    validate_config({"samples": "x.tsv", "features": {"encoders": [f"local:{ckpt}"]}})


@pytest.mark.parametrize("name", ["phikon", "phikon-v2", "hf-hub:owkin/phikon"])
def test_phikon_without_transformers_is_refused_at_config_validation(name, monkeypatch):
    import importlib.util

    from histoflow.config import validate_config
    from histoflow.errors import InputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "transformers" else real(mod, *a))
    with pytest.raises(InputError) as info:
        validate_config({"samples": "x.tsv", "features": {"encoders": ["resnet50-trunc", name]}})
    msg = str(info.value)
    assert "\n" not in msg and "features.encoders" in msg and "pip install transformers" in msg
    validate_config({"samples": "x.tsv", "features": {"encoders": ["resnet50-trunc", "uni"]}})


# ------------------------------------------------------------------ per-job fixed cost (issue 22)


def test_weight_checksum_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from histoflow import encoders as E

    monkeypatch.setenv("HISTOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 1000)
    real = E.file_sha256(weights)
    assert real == __import__("hashlib").sha256(b"x" * 1000).hexdigest()
    entries = list((tmp_path / "cache" / "checksums").glob("*.json"))
    assert len(entries) == 1
    # the cache is what answers the second time: a planted digest comes back unchanged
    entry = json.loads(entries[0].read_text())
    entry["sha256"] = "f" * 64
    entries[0].write_text(json.dumps(entry))
    assert E.file_sha256(weights) == "f" * 64
    assert E.file_fingerprint(weights).endswith("sha256:" + "f" * 16)
    # a rewritten file (new size or mtime) is hashed again
    weights.write_bytes(b"y" * 1000)
    os.utime(weights, ns=(1, 1))
    assert E.file_sha256(weights) == __import__("hashlib").sha256(b"y" * 1000).hexdigest()
    # an unwritable cache is no error
    monkeypatch.setenv("HISTOFLOW_CACHE_DIR", "/proc/no-such-cache")
    assert E.file_sha256(weights) == __import__("hashlib").sha256(b"y" * 1000).hexdigest()


def test_dry_run_dimension_is_cached_per_weights_file(tmp_path, monkeypatch):
    from histoflow import encoders as E

    monkeypatch.setenv("HISTOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    net = _tiny_timm()
    ckpt = tmp_path / "enc.pt"
    torch.save(net.state_dict(), ckpt)
    (tmp_path / "enc.pt.json").write_text(json.dumps({"arch": "timm:resnet10t", "input_size": 32}))
    first = load_encoder(f"local:{ckpt}")
    assert first.dim == 512
    calls = []
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("dry run ran")), raising=True)
    second = load_encoder(f"local:{ckpt}")     # no forward pass: the width comes from the cache
    monkeypatch.undo()
    assert second.dim == 512 and not calls
    # another sidecar (another output/input size) is another probe: measured again
    (tmp_path / "enc.pt.json").write_text(json.dumps({"arch": "timm:resnet10t", "input_size": 40}))
    assert E.cached_dim(ckpt, "nope") is None
    assert load_encoder(f"local:{ckpt}").dim == 512


@pytest.mark.parametrize("half", [False, True])
def test_meta_device_load_gives_the_same_model_and_dtype(tmp_path, monkeypatch, half):
    """Building on the meta device and assigning the file's tensors changes nothing: same
    outputs as a plain build + load_state_dict, float32 weights even from a float16 file."""
    import timm

    monkeypatch.setenv("HISTOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    state = {k: (v.half() if half else v) for k, v in vit.state_dict().items()}
    torch.save(state, tmp_path / "vit.pt")
    (tmp_path / "vit.json").write_text(json.dumps({"arch": "timm:vit_tiny_patch16_224", "timm_kwargs": kwargs,
                                                    "input_size": 32}))
    enc = load_encoder(f"local:{tmp_path / 'vit.pt'}")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    ref.load_state_dict(state)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in enc.model.parameters())
    assert all(not b.is_meta for b in enc.model.buffers())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.model(x), ref(x))
