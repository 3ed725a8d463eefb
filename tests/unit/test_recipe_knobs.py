"""The recipe knobs small and new datasets need: the training crop's ranges and flip, the translation, the eval
crop ratio, label smoothing; the papers' values stay the defaults."""

from __future__ import annotations

import math
import random

import pytest
import torch

import models
from pipelines.loading.transforms import TrainCrop, random_resized_crop_box
from pipelines.training.augment import random_translate
from pipelines.training.recipe import RecipeError, load_recipe


def test_the_defaults_are_the_papers() -> None:
    recipe = load_recipe("v1")
    assert recipe.data.train_crop == TrainCrop((0.08, 1.0), (3 / 4, 4 / 3))
    assert recipe.regularization.label_smoothing == 0.1
    assert models.resolve_variant("efficientnet_b0").crop_ratio == 0.875  # 224 / (224 + 32)


def test_the_training_crop_stays_within_the_ranges_given() -> None:
    rng = random.Random(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(400, 300, rng, scale=(0.25, 0.5), ratio=(0.9, 1.1))
        assert 0.25 * 0.98 <= w * h / (400 * 300) <= 0.5 * 1.02
        assert 0.9 * 0.97 <= w / h <= 1.1 * 1.03
        assert 0 <= left <= 400 - w and 0 <= top <= 300 - h


@pytest.mark.parametrize("data, message", [
    ({"rrc_scale": [0.5, 0.2]}, "data.rrc_scale must be"),
    ({"rrc_scale": [0.0, 1.0]}, "data.rrc_scale must be"),
    ({"rrc_ratio": [2.0, 1.0]}, "data.rrc_ratio must be"),
])
def test_bad_crop_ranges_are_refused(data, message) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe("demo").with_overrides(data=data)


def test_a_recipe_sets_the_eval_crop_ratio_and_label_smoothing() -> None:
    recipe = load_recipe("demo").with_overrides(model={"crop_ratio": 1.0}, regularization={"label_smoothing": 0.0},
                                                data={"rrc_scale": [0.35, 1.0]})
    spec = recipe.model.spec()
    assert spec.crop_ratio == 1.0 and spec.name.endswith("_crop1") and spec.eval_resize == spec.eval_resolution
    assert recipe.data.train_crop.scale == (0.35, 1.0) and recipe.regularization.label_smoothing == 0.0
    # The ratio is the variant's metadata: what evaluation and the registered preprocessing read.
    assert models.resolve_variant("efficientnet_b0", eval_resolution=300, crop_ratio=0.9).crop_ratio == 0.9
    assert math.isclose(models.resolve_variant("efficientnet_b0", eval_resolution=300).crop_ratio, 300 / 332)
    with pytest.raises(ValueError, match="crop_ratio must be in"):
        models.resolve_variant("efficientnet_b0", crop_ratio=1.5)


def test_the_flip_and_the_translation_are_recipe_knobs() -> None:
    assert load_recipe("v1").data.train_crop.flip and load_recipe("v1").augment.translate == 0.0
    recipe = load_recipe("demo").with_overrides(data={"flip": False}, augment={"translate": 0.125})
    assert recipe.data.train_crop == TrainCrop((0.08, 1.0), (3 / 4, 4 / 3), flip=False)
    assert recipe.augment.translate == 0.125
    with pytest.raises(RecipeError, match="augment.translate"):
        load_recipe("demo").with_overrides(augment={"translate": 0.5})


def test_translation_moves_each_image_by_whole_pixels_within_the_range() -> None:
    images = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8)  # no zero pixel: a zero is the border
    out = random_translate(images, 0.125, torch.Generator().manual_seed(0))  # up to 2 px each way
    assert out.dtype == images.dtype and out.shape == images.shape
    shifts = set()
    for image, moved in zip(images, out):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved, _shifted(image, dy, dx))]
        assert len(found) == 1  # exactly one whole-pixel shift within +-2 explains the output
        shifts.add(found[0])
    assert len(shifts) > 10  # the shifts vary image to image
    again = random_translate(images, 0.125, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # drawn from the generator only
    assert random_translate(images, 0.0, torch.Generator()) is images


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` moved down by dy and right by dx, zeros where nothing moved in: written out by slices."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        image[:, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out
