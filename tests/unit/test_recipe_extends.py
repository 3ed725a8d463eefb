"""Recipes that extend another: sections merge field by field, the file's own name and description, bad chains
named in one line."""

from __future__ import annotations

import pytest

from pipelines.training.recipe import RecipeError, load_recipe


def test_the_progressive_recipes_are_their_bases_plus_what_they_change():
    v1, v2 = load_recipe("v1"), load_recipe("v2-progressive")
    assert v2.optim == v1.optim and v2.regularization == v1.regularization and v2.ray == v1.ray
    assert v2.model.variant == "efficientnet_v2_s" and v2.progressive.enabled and not v1.progressive.enabled
    demo, demo_p = load_recipe("demo"), load_recipe("demo-progressive")
    assert demo_p.optim == demo.optim and demo_p.data == demo.data
    assert (demo_p.schedule.epochs, demo_p.schedule.patience) == (12, None) != (demo.schedule.epochs,
                                                                                 demo.schedule.patience)
    assert demo_p.name == "demo-progressive" and demo_p.description != demo.description


def test_a_field_set_in_the_extending_file_replaces_only_that_field(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr_per_256: 0.5\n  weight_decay: 0.25\nschedule:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim:\n  lr_per_256: 0.125\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert (child.optim.lr_per_256, child.optim.weight_decay, child.schedule.epochs) == (0.125, 0.25, 7)
    assert child.name == "child"


def test_a_named_base_is_a_built_in_recipe(tmp_path):
    (tmp_path / "short.yaml").write_text("extends: demo\nschedule:\n  epochs: 2\n  patience: null\n")
    short, demo = load_recipe(tmp_path / "short.yaml"), load_recipe("demo")
    assert short.schedule.epochs == 2 and short.optim == demo.optim and short.model == demo.model


def test_a_circle_of_extends_is_one_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="circle"):
        load_recipe(tmp_path / "a.yaml")


def test_an_unknown_base_names_the_known_recipes(tmp_path):
    (tmp_path / "x.yaml").write_text("extends: no-such-recipe\n")
    with pytest.raises(RecipeError, match="no-such-recipe.*known recipes: .*demo"):
        load_recipe(tmp_path / "x.yaml")
