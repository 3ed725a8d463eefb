"""Family member lists come from the models' registry, not from hand-written name lists."""

from __future__ import annotations

import pytest

from flows.deployments import DEPLOYMENTS
from models import get_variant, list_models, variant_range


def test_b0_to_b7_is_the_v1_registry_without_b8():
    names = variant_range("efficientnet_b0", "efficientnet_b7")
    assert len(names) == 8 and names[0] == "efficientnet_b0" and names[-1] == "efficientnet_b7"
    assert all(get_variant(n).family == "v1" for n in names) and "efficientnet_b8" not in names
    assert names == list_models()[: len(names)]


def test_a_reversed_or_unknown_range_is_an_error():
    with pytest.raises(ValueError, match="comes after"):
        variant_range("efficientnet_b7", "efficientnet_b0")
    with pytest.raises(ValueError, match="efficientnet_b9"):
        variant_range("efficientnet_b0", "efficientnet_b9")


def test_the_b0_b7_deployment_trains_the_registry_range():
    (b0_b7,) = [d for d in DEPLOYMENTS if (d.flow, d.name) == ("train-family", "b0-b7")]
    assert b0_b7.parameters["variants"] == variant_range("efficientnet_b0", "efficientnet_b7")
