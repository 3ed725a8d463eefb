"""Progressive-learning schedule (pure functions of epoch and recipe) and the batch augmentations."""

from __future__ import annotations

import pytest
import torch

import models
from pipelines.training import augment
from pipelines.training.recipe import load_recipe
from pipelines.training.schedules import epoch_settings, progressive_stage, stage_fraction

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "epoch,total,stages,expected",
    [(0, 8, 4, 0), (1, 8, 4, 0), (2, 8, 4, 1), (7, 8, 4, 3), (9, 10, 4, 3), (5, 10, 4, 2), (0, 3, 4, 0),
     (2, 3, 4, 2), (349, 350, 4, 3), (87, 350, 4, 0), (88, 350, 4, 1)],
)
def test_progressive_stage_splits_training_in_equal_parts(epoch, total, stages, expected):
    assert progressive_stage(epoch, total, stages) == expected


@pytest.mark.parametrize("rule,fractions", [("paper", [0, 1 / 3, 2 / 3, 1]), ("automl", [0.25, 0.5, 0.75, 1])])
def test_stage_fraction_rules(rule, fractions):
    assert [stage_fraction(i, 4, rule) for i in range(4)] == pytest.approx(fractions)


def _v2_recipe(rule: str, epochs: int = 8):
    return load_recipe("v2-progressive").with_overrides(progressive={"rule": rule}, schedule={"epochs": epochs})


@pytest.mark.parametrize(
    "variant,rule,sizes,dropouts,magnitudes,mixups",
    [
        # Paper Table 6: S 128->300, RandAug 5->15, mixup 0, dropout 0.1->0.3.
        ("efficientnet_v2_s", "paper", [128, 185, 242, 300], [0.1, 0.1667, 0.2333, 0.3], [5, 8.333, 11.667, 15],
         [0, 0, 0, 0]),
        # L: 128->380, RandAug 5->25, mixup 0->0.4, dropout 0.1->0.5.
        ("efficientnet_v2_l", "paper", [128, 212, 296, 380], [0.1, 0.2333, 0.3667, 0.5], [5, 11.667, 18.333, 25],
         [0, 0.1333, 0.2667, 0.4]),
        # automl: size = 128 + (max - 128) * (i + 1) / 4 (stage 0 is 171 for S), dropout constant.
        ("efficientnet_v2_s", "automl", [171, 214, 257, 300], [0.2] * 4, [6.25, 7.5, 8.75, 10], [0, 0, 0, 0]),
    ],
)
def test_v2_progressive_settings_per_stage(variant, rule, sizes, dropouts, magnitudes, mixups):
    recipe, spec = _v2_recipe(rule), models.get_variant(variant)
    per_stage = [epoch_settings(e, recipe, spec) for e in (0, 2, 4, 6)]
    assert [s.stage for s in per_stage] == [0, 1, 2, 3]
    assert [s.image_size for s in per_stage] == sizes
    assert [s.dropout for s in per_stage] == pytest.approx(dropouts, abs=1e-3)
    assert [s.randaug_magnitude for s in per_stage] == pytest.approx(magnitudes, abs=1e-3)
    assert [s.mixup_alpha for s in per_stage] == pytest.approx(mixups, abs=1e-3)


def test_non_progressive_recipe_is_constant_at_the_variant_values():
    recipe, spec = load_recipe("v1"), models.get_variant("efficientnet_b3")
    settings = {epoch_settings(e, recipe, spec) for e in range(0, 350, 50)}
    (only,) = settings
    assert only.image_size == spec.train_resolution and only.dropout == spec.dropout


def test_progressive_without_a_table_needs_explicit_ranges():
    recipe = load_recipe("demo").with_overrides(progressive={"enabled": True})
    with pytest.raises(ValueError, match="progressive table"):
        epoch_settings(0, recipe, models.resolve_variant("efficientnet_b0", phi=-9))


def _batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("name", sorted(augment.AUTOAUGMENT_OPS))
def test_every_op_keeps_shape_and_range(name):
    x = _batch().float()
    y = augment.AUTOAUGMENT_OPS[name](x.clone(), 9.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
    if name != "Identity":
        assert not torch.equal(y, x) or name in ("Equalize", "AutoContrast", "Posterize")


def test_rand_augment_is_seeded_and_changes_images():
    x = _batch()
    a = augment.rand_augment(x, 9, generator=torch.Generator().manual_seed(3))
    b = augment.rand_augment(x, 9, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(augment.rand_augment(x, 0), x)  # magnitude 0: off


def test_auto_augment_keeps_dtype_and_shape():
    x = _batch(n=32)
    y = augment.auto_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_mix_batch_targets_are_distributions():
    x = _batch().float()
    labels = torch.arange(8) % 4
    same, t = augment.mix_batch(x, labels, 4, 0.0, 0.0, 0.1)
    assert torch.equal(same, x)
    assert t.sum(1) == pytest.approx(torch.ones(8)) and t.argmax(1).tolist() == labels.tolist()
    assert t.max().item() == pytest.approx(0.9 + 0.1 / 4)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        mixed, soft = augment.mix_batch(x, labels, 4, mixup, cutmix, 0.1, torch.Generator().manual_seed(5))
        assert soft.sum(1) == pytest.approx(torch.ones(8))
        assert not torch.equal(mixed, x)


@pytest.mark.parametrize("n,world", [(10, 3), (12, 2), (7, 4), (1, 2), (100, 8)])
def test_shuffled_rank_positions_keep_exact_once_and_equal_counts(n, world):
    from pipelines.loading.sampling import rank_positions

    per_rank = [rank_positions(n, r, world, pad=True, shuffle_seed=11) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # equal counts: no DDP hang
    assert set().union(*map(set, per_rank)) == set(range(n))  # every sample at least once
    assert sum(len(p) for p in per_rank) - n < world  # only padding repeats
    evals = [rank_positions(n, r, world, pad=False, shuffle_seed=11) for r in range(world)]
    assert sorted(p for e in evals for p in e) == list(range(n))  # eval: exactly once
    if n >= 4 * world:  # the assignment changes with the seed (epoch)
        assert rank_positions(n, 0, world, pad=True, shuffle_seed=12) != per_rank[0]
