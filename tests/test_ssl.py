"""Self-supervised pretraining: seeded and reproducible, stain/geometry views that keep the
image valid, a checkpoint load_encoder reads as ssl:<arch>, and features that separate tumour
(dense, crowded, pleomorphic nuclei) from normal tiles better than an untrained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoflow.encoders import load_encoder
from histoflow.ssl import (SSLSettings, augment, build_backbone, choose_tiles, embed, hed_jitter_batch, pretrain,
                           save_encoder)


def synth_tile(rng: np.random.Generator, tumour: bool, px: int) -> np.ndarray:
    """An H&E-like tile: eosin background, haematoxylin nuclei (tumour: dense, large, irregular),
    with a strong per-tile stain/brightness variation the encoder has to see through."""
    s = px / 224
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
    h = np.zeros((px, px), np.float32)
    e = 0.25 + 0.1 * rng.random((px, px)).astype(np.float32)
    for _ in range(int(rng.integers(70, 110) if tumour else rng.integers(12, 25))):
        cx, cy = rng.uniform(0, px, 2)
        r = s * (rng.uniform(5, 9) if tumour else rng.uniform(2.5, 4))
        ecc = rng.uniform(0.5, 1.0) if tumour else rng.uniform(0.8, 1.0)
        ang = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        h = np.maximum(h, ((u / r) ** 2 + (v / (r * ecc)) ** 2 < 1) * rng.uniform(0.6, 1.0))
    hs, es = rng.uniform(0.4, 1.6), rng.uniform(0.4, 1.6)
    od = h[..., None] * hs * np.array([0.65, 0.70, 0.29]) + e[..., None] * es * np.array([0.07, 0.99, 0.11])
    rgb = np.exp(-od * 1.2) * rng.uniform(0.8, 1.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def synth_set(n: int, seed: int, px: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return np.stack([synth_tile(rng, bool(t), px) for t in labels]), labels


def test_hed_jitter_is_the_stain_modules_transform():
    stain = pytest.importorskip("histoflow.stain")
    rgb, _ = synth_set(2, 0, 32)
    rng = np.random.default_rng(5)
    expected = stain.hed_jitter(rgb[0], rng, sigma=0.1)
    rng = np.random.default_rng(5)
    a = rng.uniform(0.9, 1.1, size=3)
    b = rng.uniform(-0.1, 0.1, size=3)
    x = torch.from_numpy(rgb[:1]).permute(0, 3, 1, 2).double() / 255
    got = hed_jitter_batch(x, torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    got = np.rint(got[0].permute(1, 2, 0).numpy() * 255)
    assert np.abs(got - expected.astype(float)).max() <= 1


def test_views_are_valid_images_seeded_and_different():
    tiles, _ = synth_set(8, 1, 32)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    s = SSLSettings(image_px=32)
    v1 = augment(x, torch.Generator().manual_seed(3), s)
    v1b = augment(x, torch.Generator().manual_seed(3), s)
    v2 = augment(x, torch.Generator().manual_seed(4), s)
    assert v1.shape == x.shape and float(v1.min()) >= 0 and float(v1.max()) <= 1
    assert torch.equal(v1, v1b)
    assert not torch.allclose(v1, v2)


def test_same_seed_gives_identical_checkpoint_and_it_loads_as_ssl_encoder(tmp_path):
    tiles, _ = synth_set(32, 2, 32)
    s = SSLSettings(arch="resnet-tiny", image_px=32, epochs=2, batch_size=16)
    a, hist, (mean, std) = pretrain(tiles, s, seed=11, progress=False)
    b, _, _ = pretrain(tiles, s, seed=11, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert list(hist["epoch"]) == [1, 2] and np.isfinite(hist["loss"]).all()
    path = tmp_path / "ssl" / "resnet-tiny" / "encoder.pt"
    save_encoder(path, a, s, mean, std, seed=11)
    enc = load_encoder("ssl:resnet-tiny", ssl_checkpoint=path)
    assert (enc.dim, enc.input_size) == (128, 32) and enc.mean == pytest.approx(mean)
    x = (torch.from_numpy(tiles[:4]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        np.testing.assert_allclose(enc.model(x).numpy(), embed(a, tiles[:4], mean, std), rtol=1e-5, atol=1e-5)
    # the same checkpoint is also a valid local: encoder (no sidecar needed)
    assert load_encoder(f"local:{path}").dim == 128


def test_ssl_features_separate_tumour_tiles_better_than_untrained_ones():
    from sklearn.neighbors import KNeighborsClassifier

    px = 32
    train, y_train = synth_set(256, 3, px)
    test, y_test = synth_set(200, 4, px)
    s = SSLSettings(arch="resnet-tiny", image_px=px, epochs=5, batch_size=64, lr=3e-3)
    trained, hist, (mean, std) = pretrain(train, s, seed=1, progress=False)
    torch.manual_seed(1)
    untrained = build_backbone("resnet-tiny")

    def knn_accuracy(net):
        clf = KNeighborsClassifier(5).fit(embed(net, train, mean, std), y_train)
        return clf.score(embed(net, test, mean, std), y_test)

    acc_ssl, acc_random = knn_accuracy(trained), knn_accuracy(untrained)
    print(f"kNN accuracy: ssl {acc_ssl:.3f}, random-init {acc_random:.3f}")
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert acc_ssl >= 0.9
    assert acc_ssl > acc_random


def test_tiles_are_shared_evenly_between_slides():
    import pandas as pd

    def table(slide, n, mpp=1.0):
        return pd.DataFrame({"slide_id": slide, "x": np.arange(n) * 10, "y": 0, "target_mpp": mpp})

    chosen = choose_tiles([table("a", 5), table("b", 100), table("c", 100), table("d", 50, mpp=0.5)],
                          max_tiles=65, mpp=1.0, seed=0)
    counts = chosen["slide_id"].value_counts().to_dict()
    assert counts == {"a": 5, "b": 30, "c": 30}      # a's unused share goes to the others
    again = choose_tiles([table("a", 5), table("b", 100), table("c", 100)], max_tiles=65, mpp=1.0, seed=0)
    assert chosen.equals(again)


def test_crop_px_views_are_crops_at_the_tiles_own_resolution():
    """ssl.crop_px: views are crop_px squares cut from the tile at its resolution (not the whole
    tile shrunk): the affine crop spans crop_px / image_px of the tile's side."""
    from histoflow.errors import InputError

    px, crop = 64, 32
    stripes = ((np.arange(px) // 2) % 2).astype(np.float32)       # period 4 px
    x = torch.from_numpy(np.broadcast_to(stripes, (4, 3, px, px)).copy())
    s = SSLSettings(image_px=px, crop_px=crop, crop_scale_min=1.0, hed_sigma=0.0)
    from histoflow import ssl as ssl_mod

    theta = ssl_mod._geometry(4, torch.Generator().manual_seed(0), 1.0, "cpu", window=crop / px)
    # the crop spans crop/px of the tile per side (times the aspect jitter of at most sqrt(4/3))
    assert (theta[:, :2, :2].abs().amax(dim=(1, 2)) <= crop / px * np.sqrt(4 / 3) + 1e-6).all()
    v = augment(x, torch.Generator().manual_seed(0), s)
    assert v.shape == (4, 3, crop, crop)
    whole = augment(x, torch.Generator().manual_seed(0), SSLSettings(image_px=px, crop_scale_min=1.0, hed_sigma=0.0))
    assert whole.shape == x.shape
    with pytest.raises(InputError, match="ssl.crop_px"):
        SSLSettings(image_px=64, crop_px=128).check()


def test_crop_px_training_gives_an_encoder_for_whole_tiles():
    tiles, _ = synth_set(32, 2, 64)
    s = SSLSettings(arch="resnet-tiny", image_px=64, crop_px=32, epochs=1, batch_size=16)
    net, hist, (mean, std) = pretrain(tiles, s, seed=3, progress=False)
    assert np.isfinite(hist["loss"]).all()
    assert embed(net, tiles[:3], mean, std).shape == (3, 128)     # features on the whole 64 px tile
