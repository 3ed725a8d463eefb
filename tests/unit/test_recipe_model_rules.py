"""The recipe's model section takes its rules from `models`: the override keys, their ranges, the stage-row schema
and the smallest resolution are written once, in models, and a recipe is refused for the reason the variant would
be, when it is validated."""

from __future__ import annotations

import dataclasses

import pytest

import models
from pipelines.search.trials import scaled_model
from pipelines.training.recipe import ModelConfig, RecipeError, TableConfig, load_recipe, parse_family_member

ROW = {"block": "mbconv", "expand": 6, "kernel": 5, "stride": 2, "channels": 40, "repeats": 2}
TABLE = {"stem": 16, "stages": [ROW], "head": 640}


@pytest.mark.parametrize("key", ["resolution", "eval_resolution"])
def test_a_resolution_below_the_networks_floor_is_refused_by_the_schema(key):
    with pytest.raises(RecipeError, match=rf"model.{key} \(given 24\): {key} must be >= {models.MIN_RESOLUTION} "):
        load_recipe("demo").with_overrides(model={key: 24})
    assert getattr(load_recipe("demo").with_overrides(model={key: models.MIN_RESOLUTION}).model, key) == 32


@pytest.mark.parametrize(("key", "value"), [("crop_ratio", 0), ("crop_ratio", 1.5), ("late_depth_stages", -1),
                                            ("dropout", 1.0), ("stochastic_depth", -0.1), ("width_mult", 0),
                                            ("alpha", -1.0), ("phi", float("inf"))])
def test_each_override_is_refused_in_the_words_of_models(key, value):
    with pytest.raises(ValueError) as expected:
        models.check_override(key, value)
    with pytest.raises(RecipeError) as refused:
        load_recipe("v1").with_overrides(model={key: value})
    assert str(expected.value) in str(refused.value)


def test_the_override_keys_are_models():
    assert set(models.OVERRIDE_KEYS) <= set(ModelConfig.model_fields)
    assert set(models.COEFFICIENT_KEYS) | set(models.PHI_SIZE_KEYS) <= set(models.OVERRIDE_KEYS)
    every = ModelConfig(phi=-1, alpha=1.2, beta=1.1, gamma=1.15, width_mult=1.0, depth_mult=1.0, resolution=64,
                        eval_resolution=64, crop_ratio=0.9, dropout=0.1, stochastic_depth=0.1, late_depth_stages=0)
    assert tuple(every.overrides()) == models.OVERRIDE_KEYS
    # Whoever sets phi anew resets what phi decides: a family member, and a scaling trial (which resets phi too).
    member = parse_family_member("phi=1")
    assert all(member[key] is None for key in models.PHI_SIZE_KEYS)
    trial = scaled_model(models.resolve_variant("efficientnet_b0", phi=-3), 1.2, 1.1, 1.15)
    assert all(trial[key] is None for key in ("phi", "coefficients", *models.COEFFICIENT_KEYS, "eval_resolution"))


def test_a_stage_row_is_models_own_row():
    table = TableConfig(**TABLE)
    assert table.stages == [models.StageSpec(**ROW)]
    # What a job key hashes: the recipe's JSON shape, every row with its SE ratio.
    assert table.model_dump() == {**TABLE, "stages": [{**ROW, "se_ratio": 0.0}], "ten_percent_rule": True}
    assert list(table.model_dump()["stages"][0]) == [f.name for f in dataclasses.fields(models.StageSpec)]
    assert models.architecture_from_dict(table.model_dump()).stages == (models.StageSpec(**ROW),)
    for row, message in (({**ROW, "kernel": 4}, "kernel must be odd"), ({**ROW, "block": "conv"}, "mbconv"),
                         ({**ROW, "expand": 0}, "expand must be a positive int"), ({**ROW, "se": 0.25}, "se"),
                         ({**ROW, "se_ratio": 1.5}, r"se_ratio must be in \[0, 1\]")):
        with pytest.raises(RecipeError, match=message):
            load_recipe("demo").with_overrides(model={"table": {**TABLE, "stages": [row]}})
    for table, message in (({**TABLE, "stages": []}, "at least one stage"), ({**TABLE, "stem": 0}, "stem must be")):
        with pytest.raises(RecipeError, match=message):
            load_recipe("demo").with_overrides(model={"table": table})


def test_register_as_is_a_stored_name():
    assert load_recipe("demo").with_overrides(register_as="efficientnet-pets.v2").register_as == "efficientnet-pets.v2"
    with pytest.raises(RecipeError, match="register_as"):
        load_recipe("demo").with_overrides(register_as="-no good")
