"""Starting a job from a registered model's weights: the URI forms the recipe's `init.from` takes, and fitting a
source's tensors to the job's model (the same classes, a new head, a new head with the rows of the shared class ids,
or a model that does not fit: an error). From a registered version, lineage included:
tests/integration/test_transfer_flow.py."""

from __future__ import annotations

import pytest
import torch

import models
from pipelines.registry.model_ref import parse_model_uri
from pipelines.training.recipe import RecipeError, load_recipe
from pipelines.training.warm_start import BIAS, CLASSIFIER, WEIGHT, fitted_state, matched_head, matched_rows


@pytest.mark.parametrize("uri, parsed", [
    ("models:/efficientnet-b0/3", ("efficientnet-b0", "3", None)),
    ("models:/efficientnet-b0-phi-9@champion", ("efficientnet-b0-phi-9", None, "champion")),
])
def test_model_uris(uri, parsed):
    assert parse_model_uri(uri) == parsed
    assert load_recipe("demo").with_overrides(init={"from": uri}).init.from_ == uri


@pytest.mark.parametrize("uri", ["runs:/abc/model", "models:/b0", "models:/b0/latest", "/tmp/x.pt"])
def test_other_uris_are_refused(uri):
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        parse_model_uri(uri)
    with pytest.raises(RecipeError, match="init.from"):
        load_recipe("demo").with_overrides(init={"from": uri})


def _model(num_classes: int, phi: float = -9, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create_model("efficientnet_b0", num_classes=num_classes, phi=phi)


def test_keep_takes_every_tensor():
    source, target = _model(4, seed=1), _model(4, seed=2)
    state = fitted_state(source.state_dict(), target, "keep")
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())


def test_reset_keeps_the_body_and_builds_a_new_head():
    source, target = _model(4, seed=1), _model(7, seed=2)
    state = fitted_state(source.state_dict(), target, "reset")
    target.load_state_dict(state)  # whole: nothing missing, nothing left over
    for k, v in state.items():
        expected = (target if k.startswith(CLASSIFIER) else source).state_dict()[k]
        assert torch.equal(v, expected), k
    assert state[CLASSIFIER + "weight"].shape[0] == 7


def test_other_classes_with_keep_say_to_reset():
    with pytest.raises(ValueError, match="its classifier has 4 classes, the dataset 7: set init.head: reset"):
        fitted_state(_model(4).state_dict(), _model(7), "keep")


def test_another_variant_does_not_fit():
    with pytest.raises(ValueError, match="do not fit the job's variant"):
        fitted_state(_model(4, phi=-7).state_dict(), _model(4, phi=-9), "reset")


# head: match (ImageNet-21k -> ILSVRC2012): the rows of the class ids both were trained on come from the source.
SOURCE_CLASSES = ("n01", "n02", "n03", "n04", "n05", "n06")  # e.g. 21k's WNIDs
TARGET_CLASSES = ("n05", "n99", "n02")  # e.g. 1k's: mostly among them, one not


@pytest.mark.parametrize("source, target, rows", [
    (SOURCE_CLASSES, TARGET_CLASSES, {0: 4, 2: 1}),
    (("a", "b", "c"), ("a", "b", "c"), {0: 0, 1: 1, 2: 2}),
    (("a", "b", "c"), ("c", "b"), {0: 2, 1: 1}),
])
def test_matched_rows(source, target, rows):
    assert matched_rows(source, target) == rows


def test_no_shared_class_id_is_one_line():
    with pytest.raises(ValueError, match="^head: match finds no class id shared by the source's 2 classes and the "
                                         "dataset's 1 [^\n]*use head: reset$"):
        matched_rows(("n01", "n02"), ("airplane",))


def test_match_copies_the_shared_rows_and_leaves_the_others_fresh():
    source, target = _model(len(SOURCE_CLASSES), seed=1), _model(len(TARGET_CLASSES), seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    rows = matched_rows(SOURCE_CLASSES, TARGET_CLASSES)
    state = fitted_state(source.state_dict(), target, "match", rows)
    target.load_state_dict(state)  # whole: nothing missing, nothing left over
    src = source.state_dict()
    for t, s in ((0, 4), (2, 1)):  # n05 and n02: the source's rows, weight and bias
        assert torch.equal(state[WEIGHT][t], src[WEIGHT][s]) and torch.equal(state[BIAS][t], src[BIAS][s])
    # n99, which the source lacks: as freshly initialised, untouched.
    assert torch.equal(state[WEIGHT][1], fresh[WEIGHT][1]) and torch.equal(state[BIAS][1], fresh[BIAS][1])
    assert not torch.equal(state[WEIGHT][0], fresh[WEIGHT][0])
    for k, v in state.items():  # the body: the source's
        if not k.startswith(CLASSIFIER):
            assert torch.equal(v, src[k]), k
    assert torch.equal(target.state_dict()[WEIGHT], state[WEIGHT])


def test_match_needs_its_rows_and_the_same_features():
    with pytest.raises(ValueError, match="head: match needs the rows"):
        fitted_state(_model(6).state_dict(), _model(3), "match")
    with pytest.raises(ValueError, match="its classifier weighs .* features, the job's variant"):
        matched_head(_model(6, phi=-7).state_dict(), _model(3).state_dict(), {0: 1})
    with pytest.raises(ValueError, match="its classifier has 2 rows, fewer than the classes it records"):
        matched_head(_model(2).state_dict(), _model(3).state_dict(), {0: 5})


def test_recipe_heads():
    assert load_recipe("demo").with_overrides(init={"from": "models:/x/1", "head": "match"}).init.head == "match"
    with pytest.raises(RecipeError, match="init.head"):
        load_recipe("demo").with_overrides(init={"from": "models:/x/1", "head": "rows"})
