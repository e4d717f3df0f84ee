"""What a features job costs around the model (issue 22): thread budget and slides per job."""

from __future__ import annotations

import pytest

from histoflow.batches import AUTO_LARGE_MODEL_PER_JOB, slides_per_job
from histoflow.encoder_registry import encoder_is_large, features_model_is_large
from histoflow.features import plan_threads


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8, 9, 16, 33])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 6])
@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_torch_threads_plus_readers_are_the_granted_threads(threads, num_workers, device):
    torch_threads, workers = plan_threads(threads, num_workers, device)
    assert torch_threads + workers == threads           # no oversubscription, nothing idle
    assert torch_threads >= 1 and 0 <= workers <= num_workers


def test_gpu_jobs_read_with_every_spare_thread_cpu_jobs_give_the_model_the_cores():
    assert plan_threads(3, 2, "cuda") == (1, 2)        # the rule's num_workers + 1
    assert plan_threads(2, 2, "cuda") == (1, 1)        # fewer cores than asked: fewer readers
    assert plan_threads(1, 2, "cuda") == (1, 0)
    assert plan_threads(3, 2, "cpu") == (3, 0)         # the forward pass is the ceiling on CPU
    assert plan_threads(16, 2, "cpu") == (14, 2)
    assert plan_threads(16, 1, "cpu") == (15, 1)


def test_large_encoders_batch_even_a_small_cohort():
    assert slides_per_job("auto", 20) == 1
    assert slides_per_job("auto", 20, large_model=True) == 20       # one job, one model load
    assert slides_per_job("auto", 100, large_model=True) == AUTO_LARGE_MODEL_PER_JOB
    assert slides_per_job("auto", 10_000, large_model=True) == 40    # the cohort rule is larger
    assert slides_per_job(3, 20, large_model=True) == 3              # an integer is taken as it is
    assert slides_per_job("auto", 0, large_model=True) == 1


def test_which_feature_settings_count_as_a_large_model(tmp_path):
    assert encoder_is_large("uni") and encoder_is_large("virchow2") and encoder_is_large("hf-hub:org/unknown")
    assert encoder_is_large("timm:vit_large_patch16_224")
    assert not encoder_is_large("resnet50-trunc") and not encoder_is_large("timm:resnet50.a1_in1k")
    assert not encoder_is_large("ssl:resnet18") and not encoder_is_large(f"local:{tmp_path / 'missing.pt'}")
    small, big = tmp_path / "small.pt", tmp_path / "big.pt"
    small.write_bytes(b"0" * 1000)
    with open(big, "wb") as fh:                     # sparse: a 500 MB file without writing it
        fh.truncate(500 * 2**20)
    assert not encoder_is_large(f"local:{small}") and encoder_is_large(f"local:{big}")
    assert features_model_is_large({"encoders": ["resnet50-trunc"], "gpu": 1})
    assert not features_model_is_large({"encoders": ["resnet50-trunc"], "gpu": 0})
    assert features_model_is_large({"encoders": ["resnet50-trunc", "uni"]})


def test_bfloat16_on_cpu_is_opt_in_and_recorded():
    import torch

    from histoflow import features as F

    assert F.autocast_for("cpu") == "none" and F.autocast_for("cpu", "bfloat16") == "bfloat16"
    assert F.autocast_for("cuda", "none") == "float16"
    with pytest.raises(Exception, match="cpu_autocast"):
        F.FeatureSettings.from_config({"cpu_autocast": "float8"})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean = torch.zeros(1, 3, 1, 1)
    std = torch.ones(1, 3, 1, 1)
    with torch.inference_mode():
        plain = F.embed_batch(model, x, mean, std, "cpu")
        again = F.embed_batch(model, x, mean, std, "cpu", cpu_autocast="none")
        bf16 = F.embed_batch(model, x, mean, std, "cpu", cpu_autocast="bfloat16")
        ref = model(x.float() / 255.0)
    assert torch.equal(plain, again) and torch.equal(plain, ref)     # default: float32, unchanged
    assert not torch.equal(bf16, plain) and torch.allclose(bf16, plain, rtol=0.05, atol=0.05)


def test_cpu_channels_last_changes_only_the_summation_order():
    import torch

    from histoflow import features as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    with torch.inference_mode():
        ref = model(x.float() / 255.0)
        plain = F._forward(model, F._to_model_input(x, mean, std, "cpu", channels_last=False), "cpu", False)
        cl_in = F._to_model_input(x, mean, std, "cpu", channels_last=True)
        assert cl_in.is_contiguous(memory_format=torch.channels_last)
        cl = F._forward(model.to(memory_format=torch.channels_last), cl_in, "cpu", False)
    assert torch.equal(plain, ref)                   # false: bit-identical to the plain model
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    assert F.FeatureSettings().cpu_channels_last is True


def test_extract_features_runs_the_model_in_the_layout_asked_and_keeps_every_tile_at_its_row():
    """features.cpu_channels_last reaches the forward pass, and the loop that keeps one batch in
    flight puts each batch's features (the last, partial one included) at its tiles' rows."""
    import numpy as np
    import torch

    from histoflow.features import extract_features

    class Tiles:
        slide_id = "s"

        class reader:
            @staticmethod
            def reset():
                pass

        def __len__(self):
            return 23

        def __getitem__(self, i):
            return torch.full((3, 4, 4), i, dtype=torch.uint8), i, i % 5 != 0

    layouts = []

    class Model(torch.nn.Module):
        def forward(self, x):
            layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return x.mean((2, 3))[:, :2] * 255

    class Encoder:
        name, dim, mean, std, model = "e", 2, (0, 0, 0), (1, 1, 1), Model()

    for channels_last in (False, True):
        layouts.clear()
        feats, ok = extract_features(Tiles(), Encoder(), batch_size=5, num_workers=0, device="cpu", progress=False,
                                     cpu_channels_last=channels_last)
        assert layouts and set(layouts) == {channels_last}
        np.testing.assert_allclose(feats[:, 0], np.arange(23), atol=1e-3)
        assert (ok == (np.arange(23) % 5 != 0)).all()
