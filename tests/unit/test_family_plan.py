"""A family's members as recipes and rows (`pipelines.training.family`): the one section-merge rule, the rows the
flow hands to the comparison, and the demo's scale written once."""

from __future__ import annotations

import pytest
import yaml

from pipelines.registry.compare import FAILED, TRAINED
from pipelines.training.family import DEMO_BASELINE, DEMO_FAMILY, DEMO_PHI, failed_members, member_recipes, variant_row
from pipelines.training.recipe import load_recipe, merge_sections, parse_family_member
from pipelines.training.recipes import RECIPES_DIR


@pytest.mark.parametrize("base, overrides, merged", [
    ({"optim": {"lr_per_256": 1, "eps": 3}}, [{"optim": {"eps": 2}}], {"optim": {"lr_per_256": 1, "eps": 2}}),
    ({"init": None}, [{"init": {"from": "models:/m/1"}}], {"init": {"from": "models:/m/1"}}),
    ({"name": "a"}, [{"name": "b"}, None, {"data": {"batch_size": 8}}], {"name": "b", "data": {"batch_size": 8}}),
    ({"data": {"batch_size": 8}}, [{"data": {"loader_workers": 0}}, {"data": {"batch_size": 4}}],
     {"data": {"batch_size": 4, "loader_workers": 0}}),
])
def test_sections_merge_field_by_field_later_ones_winning(base, overrides, merged):
    assert merge_sections(base, *overrides) == merged


def test_overrides_and_extends_merge_alike():
    """A recipe file's `extends` and `Recipe.with_overrides` of the same sections give the same recipe."""
    sections = yaml.safe_load((RECIPES_DIR / "finetune.yaml").read_text())
    base = load_recipe(sections.pop("extends"))
    by_hand = base.with_overrides(**{k: v for k, v in sections.items() if k not in ("name", "description")})
    assert by_hand.model_dump(exclude={"name", "description"}) == load_recipe("finetune").model_dump(
        exclude={"name", "description"})


def test_member_overrides_go_over_the_family_overrides():
    (_, a), (_, b) = member_recipes(["phi=-9", "phi=-7"], "demo", {"schedule": {"epochs": 3}},
                                    {"phi=-7": {"schedule": {"epochs": 5}}})
    assert (a.schedule.epochs, b.schedule.epochs) == (3, 5)
    assert (a.model.phi, b.model.phi) == (-9, -7)
    with pytest.raises(ValueError, match="phi=-5, not among the variants"):
        member_recipes(["phi=-9"], "demo", None, {"phi=-5": {}})


def test_rows_say_trained_or_failed_and_why():
    trained = variant_row("phi=-9", {"variant": "efficientnet_b0_phi-9", "val_top1": 50.0})
    failed = variant_row("phi=-7", RuntimeError("Ray job x failed: bad\nmore lines"))
    assert trained["status"] == TRAINED and failed == {"variant": "phi=-7", "status": FAILED,
                                                       "reason": "Ray job x failed: bad"}
    assert failed_members([trained]) is None
    assert failed_members([trained, failed]) == "1 of 2 variant(s) failed: phi=-7 (Ray job x failed: bad)"


def test_the_demo_scale_is_written_once():
    """The demo recipe's own variant (what `effnet train --recipe demo` trains) is the demo family's first member,
    the demo searches' baseline."""
    assert DEMO_BASELINE == DEMO_FAMILY[0] and DEMO_PHI == parse_family_member(DEMO_BASELINE)["phi"]
    assert load_recipe("demo").model.phi == DEMO_PHI
