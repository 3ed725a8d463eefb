"""The recipe schema: shipped recipes load, unknown keys and bad values are rejected by name, overrides validate."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.training.recipe import (
    RECIPES_DIR,
    ModelConfig,
    Recipe,
    RecipeError,
    list_recipes,
    load_recipe,
    parse_family_member,
)


def _write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------- shipped recipes


# The recipes the README, the deployments and the CLI's defaults name: each must be listed and load by its name.
KNOWN_RECIPES = ("demo", "demo-progressive", "finetune", "small", "small-progressive", "v1", "v2-progressive")


@pytest.mark.parametrize("name", KNOWN_RECIPES)
def test_the_known_recipes_are_listed_and_load_by_name(name: str) -> None:
    assert name in list_recipes()
    assert load_recipe(name).name == name


def test_an_unknown_recipe_is_refused_in_one_line_naming_the_known_ones() -> None:
    assert list_recipes() == sorted(list_recipes())  # as `effnet recipes` prints them
    with pytest.raises(RecipeError) as refused:
        load_recipe("v3")
    message = str(refused.value)
    assert message.startswith("recipe 'v3' not found; known recipes: ") and "\n" not in message
    assert set(KNOWN_RECIPES) <= set(message.rsplit(": ", 1)[1].split(", "))


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description
    assert load_recipe(RECIPES_DIR / f"{name}.yaml") == recipe  # by path too
    assert Recipe.model_validate(recipe.model_dump()) == recipe  # what a checkpoint stores rebuilds it


def test_v1_recipe_is_the_papers() -> None:
    r = load_recipe("v1")
    o = r.optim
    assert (o.optimizer, o.lr_per_256, o.momentum, o.rmsprop_decay, o.eps, o.weight_decay) == (
        "rmsprop", 0.016, 0.9, 0.9, 1e-3, 1e-5)
    assert (o.schedule, o.warmup_epochs, o.decay_rate, o.decay_epochs) == ("exponential", 5, 0.97, 2.4)
    assert (r.regularization.label_smoothing, r.regularization.ema_decay) == (0.1, 0.9999)
    assert r.schedule.epochs == 350


def test_demo_recipe_fits_two_cpu_workers() -> None:
    r = load_recipe("demo")
    assert (r.ray.num_workers, r.ray.cpus_per_worker, r.ray.use_gpu) == (2, 1, False)


# --------------------------------------------------------------------------------------------- rejected files


@pytest.mark.parametrize(
    "text, named",
    [
        ("learning_rate: 0.1\n", "learning_rate"),
        ("optim:\n  lr: 0.1\n", r"optim\.lr\b"),
        ("model:\n  variant: efficientnet_b0\n  widht_mult: 1.1\n", r"model\.widht_mult"),
        ("data:\n  batch_size: 16\n  workers: 2\n", r"data\.workers"),
        ("ray:\n  gpus: 1\n", r"ray\.gpus"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(RecipeError, match=named) as err:
        load_recipe(_write(tmp_path, text))
    assert "mine.yaml" in str(err.value) and "Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize(
    "text, named",
    [
        ("optim:\n  optimizer: lamb\n", r"optim\.optimizer"),
        ("optim:\n  schedule: linear\n", r"optim\.schedule"),
        ("optim:\n  lr_per_256: 0\n", r"optim\.lr_per_256"),
        ("optim:\n  warmup_epochs: -1\n", r"optim\.warmup_epochs"),
        ("optim:\n  decay_rate: 1.5\n", r"optim\.decay_rate"),
        ("data:\n  batch_size: 0\n", r"data\.batch_size"),
        ("data:\n  backend: tfrecord\n", r"data\.backend"),
        ("schedule:\n  epochs: 0\n", r"schedule\.epochs"),
        ("regularization:\n  label_smoothing: 1.0\n", r"regularization\.label_smoothing"),
        ("model:\n  dropout: 1.0\n", r"model\.dropout"),
        ("model:\n  resolution: 8\n", r"model\.resolution"),
        ("ray:\n  num_workers: 0\n", r"ray\.num_workers"),
        ("seed: many\n", "seed"),
        ("schedule:\n  epochs: 5\n  eval_every: 6\n", "eval_every"),
        ("optim: 0.1\n", "optim"),
    ],
)
def test_bad_values_are_rejected_by_name(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(RecipeError, match=named):
        load_recipe(_write(tmp_path, text))


def test_invalid_yaml_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "optim: [unclosed\n"))


@pytest.mark.parametrize("text", ["- optim\n- data\n", "just words\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_a_recipe_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(_write(tmp_path, text))


def test_an_empty_file_is_the_defaults_named_after_the_file(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, "", name="plain.yaml"))
    assert recipe == Recipe(name="plain")
    assert load_recipe(_write(tmp_path, "name: other\n")).name == "other"


@pytest.mark.parametrize("name", ["nope", "nope.yaml", "/no/such/dir/recipe.yaml"])
def test_unknown_recipe_lists_the_known_ones(name: str) -> None:
    with pytest.raises(RecipeError, match="not found") as err:
        load_recipe(name)
    for known in list_recipes():
        assert known in str(err.value)


# --------------------------------------------------------------------------------------------- overrides


def test_with_overrides_replaces_only_what_it_names() -> None:
    v1 = load_recipe("v1")
    changed = v1.with_overrides(optim={"lr_per_256": 0.1}, schedule={"epochs": 3, "patience": None}, seed=7)
    assert changed.optim.lr_per_256 == 0.1 and changed.optim.warmup_epochs == v1.optim.warmup_epochs
    assert (changed.schedule.epochs, changed.schedule.patience, changed.seed) == (3, None, 7)
    assert changed.model == v1.model and changed.ray == v1.ray
    assert v1.optim.lr_per_256 == 0.016  # the original is untouched
    assert v1.with_overrides() == v1


def test_with_overrides_validates_like_a_file() -> None:
    v1 = load_recipe("v1")
    with pytest.raises(ValueError, match="unknown recipe section 'optimiser'"):
        v1.with_overrides(optimiser={"lr_per_256": 0.1})
    with pytest.raises(RecipeError, match=r"optim\.nope"):
        v1.with_overrides(optim={"nope": 1})
    with pytest.raises(RecipeError, match=r"data\.batch_size"):
        v1.with_overrides(data={"batch_size": -1})
    with pytest.raises(RecipeError, match="eval_every"):
        v1.with_overrides(schedule={"epochs": 1, "eval_every": 2})


def test_recipes_are_frozen() -> None:
    recipe = load_recipe("demo")
    with pytest.raises(ValidationError):
        recipe.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        recipe.optim.lr_per_256 = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- family members


@pytest.mark.parametrize(
    "member, phi",
    [("phi=-3", -3.0), ("phi=1.5", 1.5), ("  phi=0 ", 0.0), ("phi=-9", -9.0), ("phi=2e0", 2.0)],
)
def test_parse_family_member_phi(member: str, phi: float) -> None:
    overrides = parse_family_member(member)
    assert overrides["variant"] == "efficientnet_b0" and overrides["phi"] == phi
    # A phi member clears any other scaling a recipe might carry: phi alone decides the shape.
    recipe = load_recipe("demo").with_overrides(model=overrides)
    assert recipe.model.phi == phi and recipe.model.width_mult is None and recipe.model.resolution is None
    assert recipe.model.bn_momentum == load_recipe("demo").model.bn_momentum  # fields it does not name are kept


def test_parse_family_member_variant() -> None:
    assert parse_family_member("efficientnet_b3") == {"variant": "efficientnet_b3", "phi": None}
    recipe = load_recipe("demo").with_overrides(model=parse_family_member("efficientnet_b3"))
    assert recipe.model.variant == "efficientnet_b3" and recipe.model.phi is None


@pytest.mark.parametrize("member", ["phi=", "phi=abc", "phi=-3x", "phi=nan", "phi=inf", "phi=-inf"])
def test_parse_family_member_rejects_a_bad_phi(member: str) -> None:
    with pytest.raises(ValueError, match="phi must be a"):
        parse_family_member(member)


def test_model_overrides_name_only_what_is_set() -> None:
    assert ModelConfig().overrides() == {}
    assert ModelConfig(phi=-3, dropout=0.1, bn_momentum=0.1).overrides() == {"phi": -3, "dropout": 0.1}
