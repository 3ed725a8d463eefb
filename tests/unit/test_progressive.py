"""Progressive-learning schedule (pure functions of epoch and recipe) and the batch augmentations."""

from __future__ import annotations

import pytest
import torch

import models
from pipelines.training import augment
from pipelines.training.recipe import load_recipe
from pipelines.training.schedules import (
    check_progressive_eval_size,
    epoch_settings,
    first_scored_epoch,
    progressive_stage,
    stage_fraction,
)


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


def _spec(recipe):
    return recipe.model.spec()


@pytest.mark.parametrize("recipe_name,variant", [("demo-progressive", None), ("small-progressive", None), ("v2-progressive", None),
                                                 ("v2-progressive", "efficientnet_v2_m"),
                                                 ("v2-progressive", "efficientnet_v2_l")])
@pytest.mark.parametrize("rule", ["paper", "automl"])
def test_the_shipped_progressive_recipes_evaluate_at_or_above_their_last_size(recipe_name, variant, rule):
    recipe = load_recipe(recipe_name).with_overrides(progressive={"rule": rule},
                                                     **({"model": {"variant": variant}} if variant else {}))
    spec = _spec(recipe)
    sizes = [epoch_settings(e, recipe, spec).image_size for e in range(recipe.schedule.epochs)]
    assert recipe.progressive.enabled and sizes[0] < sizes[-1] <= spec.eval_resolution, (sizes, spec.eval_resolution)
    check_progressive_eval_size(recipe, spec)  # so the check lets it through


def test_progressive_sizes_moved_above_the_eval_size_are_refused_until_the_resolution_follows():
    # The benchmark's setting: phi=-5 evaluates at 112 px; training moved up to 192 px.
    moved = load_recipe("demo-progressive").with_overrides(model={"phi": -5}, progressive={"image_size": [64, 192]})
    with pytest.raises(ValueError, match="ends at 192 px but efficientnet_b0_phi-5 evaluates at 112 px"):
        check_progressive_eval_size(moved, _spec(moved))
    for fix in ({"resolution": 192}, {"eval_resolution": 224}):
        fixed = moved.with_overrides(model=fix)
        check_progressive_eval_size(fixed, _spec(fixed))
        assert _spec(fixed).eval_resolution >= 192
    # Without progressive learning the sizes are not used, so nothing is refused.
    off = moved.with_overrides(progressive={"enabled": False})
    check_progressive_eval_size(off, _spec(off))


@pytest.mark.parametrize("epochs,stages,choose_from,expected", [
    (16, 4, "last_stage", 12), (12, 4, "last_stage", 9), (350, 4, "last_stage", 263), (10, 3, "last_stage", 7),
    (3, 4, "last_stage", 2),  # fewer epochs than stages: the last epoch's stage is the last one reached
    (5, 1, "last_stage", 0), (16, 4, "any_stage", 0)])
def test_early_stopping_scores_from_the_last_stage(epochs, stages, choose_from, expected):
    recipe = load_recipe("demo-progressive").with_overrides(
        schedule={"epochs": epochs}, progressive={"stages": stages, "choose_from": choose_from})
    assert first_scored_epoch(recipe) == expected
    stage_of = [epoch_settings(e, recipe, _spec(recipe)).stage for e in range(epochs)]
    if choose_from == "last_stage":  # the first epoch of the stage the training ends in
        assert stage_of[expected] == stage_of[-1] and (expected == 0 or stage_of[expected - 1] < stage_of[-1])
    off = recipe.with_overrides(progressive={"enabled": False})
    assert first_scored_epoch(off) == 0


def _batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


def _low_contrast(n=8, size=32, seed=0):
    """Smooth images in 60..180 with a little noise, each tinted differently: every op has something to change
    (AutoContrast and Equalize stretch the range, Color has hue to scale, geometric ops move an edge)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    picture = ramp.view(1, 1, 1, -1) * torch.rand(n, 3, 1, 1, generator=g) + ramp.view(1, 1, -1, 1) * 0.5
    noise = torch.rand(n, 3, size, size, generator=g) * 0.05
    return (60 + 120 * (picture + noise) / 1.55).round()


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")  # level 5 is factor 1 (the TF reference's mapping)


@pytest.mark.parametrize("name", sorted(augment.AUTOAUGMENT_OPS))
def test_every_op_changes_each_image_and_stays_in_range(name):
    x = _low_contrast()
    y = augment.AUTOAUGMENT_OPS[name](x.clone(), 9.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert y.min() >= -1e-3 and y.max() <= 255 + 1e-3  # float rounding aside (AutoContrast's 255 * 1.0000001)
    if name == "Identity":
        assert torch.equal(y, x)
    else:
        assert (y - x).abs().flatten(1).amax(1).min() >= 1, "an image came out unchanged"


@pytest.mark.parametrize("name, level", [(n, 0.0) for n in GEOMETRIC] + [(n, 5.0) for n in ENHANCE])
def test_the_neutral_level_of_an_op_leaves_images_alone(name, level):
    x = _low_contrast()
    y = augment.AUTOAUGMENT_OPS[name](x.clone(), level, torch.Generator().manual_seed(1))
    assert (y - x).abs().max() < 1e-3


def test_rand_augment_is_seeded_and_changes_images():
    x = _batch(n=32)
    a = augment.rand_augment(x, 9, generator=torch.Generator().manual_seed(3))
    b = augment.rand_augment(x, 9, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment.rand_augment(x, 9, generator=torch.Generator().manual_seed(4)))
    # Two ops of 14 drawn per image (one of the 14 is Identity, and AutoContrast leaves full-range noise
    # as it is): nearly every image changes.
    changed = (a != x).flatten(1).any(1)
    assert changed.sum() >= 30, changed
    assert torch.equal(augment.rand_augment(x, 0), x)  # magnitude 0: off
    assert torch.equal(augment.rand_augment(x, 9, num_ops=0), x)


def test_auto_augment_is_seeded_and_changes_most_images():
    x = _low_contrast(n=64).to(torch.uint8)
    y = augment.auto_augment(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(y, augment.auto_augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(y, augment.auto_augment(x, torch.Generator().manual_seed(1)))
    # Each sub-policy applies each of its two ops with its probability: 15% of images get neither, on average.
    changed = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.6 < changed < 1.0, changed


def _distinct(n=8, size=16):
    """Float images whose pixels all differ, so a mixed pixel tells which images it came from."""
    values = torch.randperm(n * 3 * size * size, generator=torch.Generator().manual_seed(0))
    return values.float().view(n, 3, size, size)


def _lam_and_partner(targets):
    """(lambda, partner of each sample) read back from soft targets of labels 0..n-1 without smoothing."""
    n = len(targets)
    own = targets.diagonal()
    partner = torch.where(own < 1, (targets - torch.diag(own)).argmax(1), torch.arange(n))
    lams = own[partner != torch.arange(n)]
    assert len(lams) and torch.allclose(lams, lams[0].expand_as(lams))  # one lambda for the whole batch
    return lams[0].item(), partner


def test_mix_batch_without_alphas_only_smooths_the_labels():
    x = _batch().float()
    labels = torch.arange(8) % 4
    same, t = augment.mix_batch(x, labels, 4, 0.0, 0.0, 0.1)
    assert torch.equal(same, x)
    assert t.sum(1) == pytest.approx(torch.ones(8)) and t.argmax(1).tolist() == labels.tolist()
    assert t.max().item() == pytest.approx(0.9 + 0.1 / 4) and t.min().item() == pytest.approx(0.1 / 4)


def test_mixup_blends_images_and_labels_by_the_same_lambda():
    x, labels = _distinct(), torch.arange(8)
    mixed, targets = augment.mix_batch(x, labels, 8, 0.4, 0.0, 0.0, torch.Generator().manual_seed(5))
    lam, partner = _lam_and_partner(targets)
    assert 0 < lam < 1
    # lambda read back from float32 targets: equal to the images' weight within float32 rounding.
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[partner], rtol=1e-5, atol=1e-3)
    again = augment.mix_batch(x, labels, 8, 0.4, 0.0, 0.0, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    other_lam, _ = _lam_and_partner(augment.mix_batch(x, labels, 8, 0.4, 0.0, 0.0,
                                                      torch.Generator().manual_seed(6))[1])
    assert other_lam != lam


def test_cutmix_pastes_one_box_and_labels_follow_its_area():
    x, labels = _distinct(), torch.arange(8)
    mixed, targets = augment.mix_batch(x, labels, 8, 0.0, 1.0, 0.0, torch.Generator().manual_seed(5))
    lam, partner = _lam_and_partner(targets)
    pasted = mixed != x  # [n, 3, h, w]
    assert torch.equal(mixed[pasted], x[partner][pasted])  # every changed pixel is the partner's own
    boxes = pasted[partner != torch.arange(8)].any(1)  # [k, h, w]: the same box in every mixed image
    assert (boxes == boxes[0]).all()
    rows, cols = boxes[0].any(1).nonzero().flatten(), boxes[0].any(0).nonzero().flatten()
    assert boxes[0].sum() == len(rows) * len(cols)  # a rectangle
    assert rows.tolist() == list(range(rows[0], rows[-1] + 1))
    assert cols.tolist() == list(range(cols[0], cols[-1] + 1))
    assert 1 - lam == pytest.approx(boxes[0].float().mean().item())  # labels mix by the area pasted


def test_mix_batch_with_both_alphas_draws_mixup_or_cutmix_per_batch():
    x, labels = _distinct(), torch.arange(8)
    kinds = set()
    for seed in range(12):
        mixed, targets = augment.mix_batch(x, labels, 8, 0.4, 1.0, 0.1, torch.Generator().manual_seed(seed))
        assert targets.sum(1) == pytest.approx(torch.ones(8))
        # Cutmix only moves pixels (each is some image's pixel at the same place); mixup blends them.
        moved_only = (mixed[:, None] == x[None]).any(1).all()
        kinds.add("cutmix" if moved_only else "mixup")
    assert kinds == {"mixup", "cutmix"}


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
