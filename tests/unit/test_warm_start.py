"""Starting a job from a registered model's weights: the URI forms the recipe's `init.from` takes, and fitting a
source's tensors to the job's model (the same classes, a new head, or a model that does not fit: an error)."""

from __future__ import annotations

import pytest
import torch

import models
from pipelines.registry.model_ref import parse_model_uri
from pipelines.training.recipe import RecipeError, load_recipe
from pipelines.training.warm_start import CLASSIFIER, fitted_state


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
