"""The baseline search's space and rewards (issue 19's pure parts): B0 and V2-S are points of their spaces, every
sampled point builds through the model builder and is what its rows say, and the rewards match hand-computed
values."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import models
from models import ARCHITECTURES, plan_blocks
from models.search_space import (
    describe,
    normalised_step_times,
    register_architecture,
    space_around,
    v1_reward,
    v2_reward,
)

B0, V2_S = ARCHITECTURES["v1_b0"], ARCHITECTURES["v2_s"]


def test_b0_and_v2_s_are_points_of_their_spaces() -> None:
    assert space_around(B0).contains(B0) and space_around(V2_S).contains(V2_S)
    assert not space_around(B0).contains(V2_S)  # other channels, strides, stem
    # 2 kinds x 2 kernels x 3 expansions x 2 SE ratios x (repeats within 1 of the base's) per stage.
    assert space_around(B0).stages[3].repeats == (2, 3, 4) and space_around(B0).stages[0].repeats == (1, 2)
    assert len(space_around(B0).stages[3].options()) == 2 * 2 * 3 * 3 * 2


def test_every_sampled_point_builds_and_is_what_its_rows_say() -> None:
    rng = random.Random(0)
    for base, variant in ((B0, "efficientnet_b0"), (V2_S, "efficientnet_v2_s")):
        space = space_around(base)
        for _ in range(6):
            arch = space.sample(rng)
            assert space.contains(arch)
            assert space.contains(space.mutate(arch, rng))
            name = register_architecture(arch)
            assert register_architecture(arch) == name  # the same table, the same name
            spec = dataclasses.replace(models.get_variant(variant), architecture=name, name=name,
                                       train_resolution=64, eval_resolution=64)
            blocks = plan_blocks(spec).blocks
            for stage, (row, text) in enumerate(zip(arch.stages, describe(arch))):
                mine = [b for b in blocks if b.stage == stage]
                assert len(mine) == row.repeats, text
                assert {(b.block, b.kernel, b.expand, b.se_ratio) for b in mine} == {
                    (row.block, row.kernel, row.expand, row.se_ratio)}, text
                assert mine[0].stride == row.stride and mine[0].out_channels == row.channels, text
            net = models.build_model(spec, num_classes=3)
            assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_a_name_holds_one_table() -> None:
    register_architecture(B0, "test_b0_copy")
    with pytest.raises(ValueError, match="taken by another table"):
        register_architecture(V2_S, "test_b0_copy")


@pytest.mark.parametrize("accuracy, flops, expected", [  # ACC x (FLOPS / 400M)^-0.07, worked out by hand
    (0.75, 400e6, 0.75),
    (0.75, 800e6, 0.7144785),
    (0.75, 200e6, 0.7872875),
    (0.60, 1.2e9, 0.5555879),
])
def test_the_v1_reward(accuracy, flops, expected) -> None:
    assert v1_reward(accuracy, flops) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("accuracy, step_time, params, expected", [  # A x S^-0.07 x P^-0.05, by hand
    (0.8, 1.0, 1.0, 0.8),
    (0.8, 2.0, 1.0, 0.7621104),
    (0.8, 1.0, 5e6, 0.3699487),
    (0.8, 0.5, 2e7, 0.3623353),
])
def test_the_v2_reward(accuracy, step_time, params, expected) -> None:
    assert v2_reward(accuracy, step_time, params) == pytest.approx(expected, abs=1e-6)


def test_rewards_refuse_figures_that_are_not_positive_and_step_times_are_relative() -> None:
    with pytest.raises(ValueError, match="positive figures"):
        v1_reward(0.7, 0.0)
    with pytest.raises(ValueError, match="positive figures"):
        v2_reward(0.7, 1.0, -5)
    assert normalised_step_times([2.0, 1.0, 4.0]) == [1.0, 0.5, 2.0]
    assert normalised_step_times([1.0, 3.0]) == [0.5, 1.5]


def test_a_stored_baseline_is_what_a_family_member_and_the_scaling_search_build(tmp_path) -> None:
    from pipelines.training.family import member_recipes
    from pipelines.settings import DataLayout
    from pipelines.search import trials
    from pipelines.training.baselines import load_baseline, save_baseline

    layout = DataLayout(tmp_path / "data").ensure()
    arch = space_around(B0).sample(random.Random(3))
    save_baseline(layout, "my-nas", arch, source={"search": "test"})
    assert load_baseline(layout, "my-nas") == arch
    ((_, recipe),) = member_recipes(["phi=-9,baseline=my-nas"], "demo", None, layout=layout)
    assert recipe.model.baseline is None and recipe.model.table is not None  # the rows themselves travel
    spec = recipe.model.spec()
    assert ARCHITECTURES[spec.architecture] == arch and spec.phi == -9
    (plan,) = trials.search_trials(spec, [models.PAPER_COEFFICIENTS])
    assert ARCHITECTURES[trials.member_spec(plan.model).architecture] == arch  # scaled, same rows
    with pytest.raises(ValueError, match="no baseline 'other'; known: my-nas"):
        member_recipes(["phi=-9,baseline=other"], "demo", None, layout=layout)
