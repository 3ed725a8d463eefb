"""The deployment list as declared (`flows.deployments.DEPLOYMENTS`), read without a Prefect server: its members
name real variants and recipes. The deployments registered on a server: tests/integration/test_deployments.py."""

from __future__ import annotations

import pytest

import models
from flows.deployments import select_specs
from pipelines.training.recipe import load_recipe


def test_v2_family_names_real_variants_and_recipe():
    (spec,) = select_specs(["train-family/v2-s-m-l"])
    assert spec.parameters["variants"] == ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]
    assert set(spec.parameters["variants"]) <= set(models.list_models())
    assert load_recipe(spec.parameters["recipe"]).progressive.enabled
    assert not spec.nightly  # the schedule is the nightly's alone
    with pytest.raises(ValueError, match="unknown deployment train-family/b9"):
        select_specs(["train-family/b9"])
