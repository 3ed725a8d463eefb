"""On a CUDA device, what a CPU run never exercises: preprocessing and augmentation on the device with a device
generator, and a tiny model learning under bf16 autocast in channels_last memory, as `train_one_epoch` runs it.

Marked `gpu`: skipped, with the reason, where `torch.cuda.is_available()` is False (tests/conftest.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from pipelines.loading import make_loader
from pipelines.loading.transforms import normalize
from pipelines.training import augment
from pipelines.training.recipe import load_recipe
from pipelines.training.schedules import epoch_settings, peak_lr
from pipelines.training.steps import build_optimizer, prepare_batch, set_bn_momentum

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CLASSES = 4  # the session's demo ImageNet


def _uint8_batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_on_the_device_equals_the_cpu_result(channels_last: bool) -> None:
    images = _uint8_batch()
    out = normalize(images.to(CUDA), channels_last=channels_last)
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.cpu(), normalize(images))


def test_augmentations_run_on_the_device_seeded_by_a_device_generator() -> None:
    images = _uint8_batch(n=16).to(CUDA)

    def rand_augment(seed: int) -> torch.Tensor:
        return augment.rand_augment(images, 9, 2, torch.Generator(device=CUDA).manual_seed(seed))

    out = rand_augment(3)
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, rand_augment(3)) and not torch.equal(out, rand_augment(4))
    assert (out != images).flatten(1).any(1).sum() >= len(images) // 2  # most images changed
    auto = augment.auto_augment(images, torch.Generator(device=CUDA).manual_seed(0))
    assert auto.device.type == "cuda" and not torch.equal(auto, images)

    x = normalize(images)
    labels = torch.arange(len(images), device=CUDA) % CLASSES
    mixed, targets = augment.mix_batch(x, labels, CLASSES, 0.4, 1.0, 0.1, torch.Generator(device=CUDA).manual_seed(5))
    assert mixed.device.type == targets.device.type == "cuda" and not torch.equal(mixed, x)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(images), device=CUDA))


def test_a_tiny_model_learns_a_batch_under_bf16_autocast_in_channels_last(staged_dataset: Path) -> None:
    """A few steps on one real batch, each as `train_one_epoch` takes it: the loss stays finite and falls."""
    recipe = load_recipe("demo").with_overrides(runtime={"amp": True, "channels_last": True})
    spec = recipe.model.spec()  # b0 at phi=-9: 64 px
    images, labels = next(iter(make_loader(staged_dataset, "train", spec.train_resolution, recipe.data.batch_size)))
    images, labels = images.to(CUDA), labels.to(CUDA)
    torch.manual_seed(0)
    model = models.build_model(spec, CLASSES)
    set_bn_momentum(model, recipe.model.bn_momentum)
    model = model.to(CUDA, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr(recipe.optim, recipe.data.batch_size)
    settings = epoch_settings(0, recipe, spec)
    generator = torch.Generator(device=CUDA).manual_seed(0)

    losses = []
    for _ in range(30):
        x, targets = prepare_batch(images, labels, recipe, settings, CLASSES, True, generator)
        assert x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=recipe.runtime.amp):
            logits = model(x)
        assert logits.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], f"the loss did not fall: {losses}"
    # Measured on CPU with the same steps: 15 of 16 right. Chance is 1 in 4.
    assert (logits.argmax(1) == labels).float().mean().item() > 0.5


def test_the_memory_model_brackets_the_measured_peak_per_image() -> None:
    """pipelines.training.sizing counts the activations kept for backward on the meta device; on a real GPU under
    bf16 autocast in channels_last, the measured peak added per image must lie within a factor of 2 of it (the
    headroom covers what it leaves out)."""
    from pipelines.training.sizing import memory_model

    spec = models.resolve_variant("efficientnet_b0")
    model = models.build_model(spec, 1000).to(CUDA, memory_format=torch.channels_last).train()

    def peak(batch: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        x = torch.randn(batch, 3, 224, 224, device=CUDA).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(8)  # cuDNN picks its algorithms (and workspaces) on the first pass
    measured = (peak(32) - peak(16)) / 16
    modelled = memory_model(spec, 1000, 224, amp=True, optimizer="rmsprop", ema=True).per_image_bytes
    assert 0.5 <= measured / modelled <= 2.0, f"measured {measured / 2**20:.1f} MB per image, modelled " \
                                              f"{modelled / 2**20:.1f} MB"
