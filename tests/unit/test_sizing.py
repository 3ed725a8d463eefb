"""Sizing a variant to its workers' memory, and gradient accumulation: the memory model grows with the variant
and its resolution, a larger variant on the same budget gets a smaller micro-batch and more accumulation (the
step's batch unchanged), a variant that fits not one image is a clear error, and accumulated micro-batches give
the gradient of the whole batch."""

from __future__ import annotations

import pytest
import torch

import models
from models.summary import count_params, meta_model
from pipelines.loading.transforms import normalize
from pipelines.training.recipe import load_recipe
from pipelines.training.schedules import epoch_settings
from pipelines.training.sizing import GIB, HEADROOM, MemoryModel, SizingError, memory_model, plan_batches, size_job
from pipelines.training.steps import accumulate_gradients, set_bn_momentum


def _model(name: str, resolution: int) -> MemoryModel:
    return memory_model(models.resolve_variant(name), 1000, resolution, amp=True, optimizer="rmsprop", ema=True)


def test_the_memory_model_grows_with_the_variant_and_its_resolution() -> None:
    b0, b0_large, b4 = _model("efficientnet_b0", 224), _model("efficientnet_b0", 320), _model("efficientnet_b4", 380)
    assert 0 < b0.per_image_bytes < b0_large.per_image_bytes < b4.per_image_bytes
    # Weights, gradients, two RMSProp slots and the EMA of B0's 5.3M parameters, in fp32: about 100 MB.
    assert 5 * 4 * 5.2e6 < b0.fixed_bytes < 5 * 4 * 5.4e6 + b0.per_image_bytes
    # bf16 activations of B0 at 224 px: tens of MB per image (a batch of 256 fits an 80 GB GPU, as NVIDIA trains).
    assert 20e6 < b0.per_image_bytes < 80e6 and b0.bytes_at(256) < 0.8 * 80 * GIB


def test_the_ema_adds_one_fp32_copy_of_the_parameters_the_family_table_counts() -> None:
    spec = models.resolve_variant("efficientnet_b0", phi=-9)
    with_ema, without = (memory_model(spec, 10, 64, amp=True, optimizer="sgd", ema=e) for e in (True, False))
    assert with_ema.per_image_bytes == without.per_image_bytes
    assert with_ema.fixed_bytes - without.fixed_bytes == 4 * count_params(meta_model(spec, 10))


def test_a_larger_variant_gets_a_smaller_micro_batch_and_more_accumulation() -> None:
    small = plan_batches(256, _model("efficientnet_b0", 224), 40, "b0")
    large = plan_batches(256, _model("efficientnet_b4", 380), 40, "b4")
    assert (small.micro_batch, small.accumulation) == (256, 1)
    assert large.micro_batch < 256 and large.micro_batch * large.accumulation == 256 and large.accumulation > 1
    assert large.estimated_gb <= HEADROOM * 40
    bigger = plan_batches(256, _model("efficientnet_b4", 380), 40, "b4", micro_batch=None)
    assert bigger == large  # a pure function of its inputs


def test_not_one_image_per_worker_is_a_clear_error() -> None:
    with pytest.raises(SizingError, match=r"efficientnet_b7 at 600 px needs .* GB for one image per worker.*"
                                          r"ray.device_memory_gb"):
        size_job(load_recipe("v1").with_overrides(model={"variant": "efficientnet_b7"},
                                                  ray={"device_memory_gb": 1}), models.resolve_variant(
                     "efficientnet_b7"), 1000)


def test_a_given_micro_batch_must_divide_the_batch() -> None:
    assert plan_batches(12, None, None, "x", micro_batch=4).accumulation == 3
    with pytest.raises(SizingError, match="micro_batch_size 5 does not divide data.batch_size 12"):
        plan_batches(12, None, None, "x", micro_batch=5)


def test_without_a_budget_the_batch_is_taken_whole() -> None:
    plan = size_job(load_recipe("demo"), models.resolve_variant("efficientnet_b0", phi=-9), 4)
    assert (plan.micro_batch, plan.accumulation, plan.estimated_gb) == (16, 1, None)


def test_the_v1_recipe_sizes_b0_whole_and_b7_in_micro_batches() -> None:
    recipe = load_recipe("v1")
    b0 = size_job(recipe, models.resolve_variant("efficientnet_b0"), 1000)
    b7_recipe = recipe.with_overrides(model={"variant": "efficientnet_b7"})
    b7 = size_job(b7_recipe, models.resolve_variant("efficientnet_b7"), 1000)
    assert b0.accumulation == 1 and b7.accumulation > 1 and b7.micro_batch * b7.accumulation == 256
    assert b7.as_params()["sizing.accumulation"] == str(b7.accumulation)


def test_the_model_is_sized_at_the_largest_training_resolution() -> None:
    recipe = load_recipe("v2-progressive")
    spec = models.resolve_variant("efficientnet_v2_s")
    sizes = {epoch_settings(e, recipe, spec).image_size for e in range(recipe.schedule.epochs)}
    assert len(sizes) > 1  # progressive: the size grows stage by stage
    at_max = plan_batches(recipe.data.batch_size, memory_model(spec, 1000, max(sizes), True, "rmsprop", True),
                          recipe.ray.device_memory_gb, "v2_s")
    assert size_job(recipe, spec, 1000) == at_max


def test_accumulated_micro_batches_give_the_whole_batchs_gradient() -> None:
    recipe = load_recipe("demo")
    spec = models.resolve_variant("efficientnet_b0", phi=-9)
    settings = epoch_settings(0, recipe, spec)
    torch.manual_seed(0)
    model = models.build_model(spec, 4)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    cpu, gen = torch.device("cpu"), torch.Generator()
    # Batch norm on running statistics (no dropout either), so the micro-batches' sums are exact: statistics of
    # these images, not the initial ones, under which the logits (and so the gradients) are ~0.
    set_bn_momentum(model, 1.0)
    with torch.no_grad():
        model.train()(normalize(images))
    model.eval()

    def gradients(micro: int) -> tuple[list[torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        chunks = [(images[i:i + micro], labels[i:i + micro]) for i in range(0, 8, micro)]
        loss_sum, n = accumulate_gradients(model, chunks, recipe, settings, 4, cpu, False, gen)
        assert n == 8
        return [p.grad.clone() for p in model.parameters()], loss_sum.item() / n

    whole, whole_loss = gradients(8)
    accumulated, accumulated_loss = gradients(2)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-6)
    scale = max(w.abs().max().item() for w in whole)
    assert scale > 1e-3  # a real gradient, not zeros
    assert max((a - w).abs().max().item() for a, w in zip(accumulated, whole)) <= 1e-5 * scale
