"""Compound-scaling coefficient sets as data: checked (>= 1, alpha * beta^2 * gamma^2 within a tolerance of 2),
named (`paper`, or a stored search result) in recipes and family members, resolved to numbers when a job is
planned, and the member built from them has the depth, width and resolution the set implies. V2's own rule: a
resolution override above the paper's cap of 480 is refused unless asked for."""

from __future__ import annotations

import pytest

import models
from models import PAPER_COEFFICIENTS, CoefficientSet, check_coefficients, round_resolution
from pipelines.settings import DataLayout
from pipelines.training.coefficients import load_coefficient_set, resolve_coefficients, save_coefficient_set
from pipelines.training.job import scaling_tags
from pipelines.training.recipe import RecipeError, load_recipe, parse_family_member
from pipelines.registry.tracking import Tags

FOUND = CoefficientSet("my-search", 1.3, 1.1, 1.1)  # 1.3 * 1.21 * 1.21 = 1.903


@pytest.mark.parametrize("alpha, beta, gamma, tolerance, problem", [
    (1.2, 1.1, 1.15, 0.1, None),  # the paper's: 1.920
    (1.3, 1.1, 1.1, 0.1, None),
    (1.2, 1.1, 1.15, 0.01, "= 1.920 (alpha 1.2, beta 1.1, gamma 1.15), not within 1% of 2"),
    (1.5, 1.1, 1.2, 0.1, "= 2.614"),
    (2.0, 1.0, 1.0, 0.1, None),  # depth only
    (0.9, 1.2, 1.2, 0.1, "must be >= 1 (scaling up makes nothing smaller), got alpha 0.9"),
    (0, 1.2, 1.2, 0.1, "alpha must be > 0"),
    (1.2, float("nan"), 1.2, 0.1, "beta must be finite"),
])
def test_sets_are_checked(alpha, beta, gamma, tolerance, problem):
    if problem is None:
        assert check_coefficients("s", alpha, beta, gamma, tolerance).flops_factor == pytest.approx(
            alpha * beta**2 * gamma**2)
    else:
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            check_coefficients("s", alpha, beta, gamma, tolerance)


@pytest.mark.parametrize("member, expected", [
    ("phi=2", {"phi": 2.0}),
    ("phi=2,coefficients=my-search", {"phi": 2.0, "coefficients": "my-search", "alpha": None}),
    ("phi=1, alpha=1.3, beta=1.1, gamma=1.1", {"phi": 1.0, "alpha": 1.3, "gamma": 1.1, "coefficients": None}),
])
def test_members_name_their_coefficients(member, expected):
    parsed = parse_family_member(member)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize("member, problem", [
    ("phi=2,coefficients=a,alpha=1.2", "a named coefficient set or alpha/beta/gamma, not both"),
    ("phi=2,delta=1", "'delta=1' is not one of coefficients=..., alpha=..., beta=..., gamma=..."),
    ("phi=2,alpha=tall", "alpha must be a number"),
])
def test_bad_members_say_why(member, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_family_member(member)


def test_a_bad_set_in_a_recipe_is_one_line():
    with pytest.raises(RecipeError) as err:
        load_recipe("demo").with_overrides(model=parse_family_member("phi=1,alpha=1.5,beta=1.1,gamma=1.2"))
    assert "model: coefficient set 'explicit': alpha * beta^2 * gamma^2 = 2.614" in str(err.value)
    assert "\n" not in str(err.value) and "{" not in str(err.value)
    with pytest.raises(RecipeError, match="only apply together with phi"):
        load_recipe("v1").with_overrides(model={"alpha": 1.3})


def test_a_stored_set_resolves_into_the_member_it_scales(tmp_path):
    layout = DataLayout(tmp_path)
    save_coefficient_set(layout, FOUND, source={"search": "run-1"})
    assert load_coefficient_set(layout, "my-search") == (FOUND, 0.1)
    recipe = resolve_coefficients(
        load_recipe("demo").with_overrides(model=parse_family_member("phi=2,coefficients=my-search")), layout)
    m = recipe.model
    assert (m.alpha, m.beta, m.gamma, m.coefficients) == (1.3, 1.1, 1.1, "my-search")
    spec = m.spec()
    assert spec.depth_mult == pytest.approx(1.3**2) and spec.width_mult == pytest.approx(1.1**2)
    assert spec.train_resolution == round_resolution(224 * 1.1**2)
    paper = models.resolve_variant("efficientnet_b0", phi=2)
    assert spec.name != paper.name and "alpha1.3" in spec.name  # another registered model than the paper's
    assert scaling_tags(recipe) == {Tags.PHI: "2", Tags.COEFFICIENTS: "my-search",
                                    Tags.SCALING: "alpha=1.3 beta=1.1 gamma=1.1"}
    assert scaling_tags(load_recipe("demo"))[Tags.COEFFICIENTS] == "paper"
    assert scaling_tags(load_recipe("v1")) == {}  # a table variant


def test_unknown_clashing_and_built_in_sets_are_errors(tmp_path):
    layout = DataLayout(tmp_path)
    save_coefficient_set(layout, FOUND)
    with pytest.raises(ValueError, match="no coefficient set 'nope'; known: paper, my-search"):
        resolve_coefficients(load_recipe("demo").with_overrides(model={"coefficients": "nope"}), layout)
    clash = load_recipe("demo").with_overrides(model={"coefficients": "my-search", "alpha": 1.25})
    with pytest.raises(ValueError, match="has alpha 1.3, the recipe says alpha 1.25"):
        resolve_coefficients(clash, layout)
    with pytest.raises(ValueError, match="built in"):
        save_coefficient_set(layout, PAPER_COEFFICIENTS)
    (layout.coefficients / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a coefficient set"):
        load_coefficient_set(layout, "broken")
    assert resolve_coefficients(load_recipe("demo").with_overrides(model={"coefficients": "paper"}),
                                layout).model.alpha == PAPER_COEFFICIENTS.alpha


def test_v2_resolutions_above_the_papers_cap_are_refused_unless_asked_for():
    with pytest.raises(ValueError, match="train/eval resolution 400/500 goes above V2's cap of 480"):
        models.resolve_variant("efficientnet_v2_m", resolution=400)
    assert models.resolve_variant("efficientnet_v2_m", resolution=400, allow_large_resolution=True
                                  ).eval_resolution == 500
    assert models.resolve_variant("efficientnet_v2_m", resolution=320).eval_resolution == 400  # below: as before
    assert models.get_variant("efficientnet_v2_xl").eval_resolution == 512  # a table variant keeps its own
    assert models.resolve_variant("efficientnet_b7", resolution=640).eval_resolution == 640  # V1 has no cap
    # The recipe's switch reaches the models' check.
    recipe = load_recipe("v2-progressive").with_overrides(model={"variant": "efficientnet_v2_m", "resolution": 400})
    with pytest.raises(ValueError, match="set model.allow_large_resolution: true"):
        recipe.model.spec()
    allowed = recipe.with_overrides(model={"allow_large_resolution": True})
    assert allowed.model.spec().eval_resolution == 500
