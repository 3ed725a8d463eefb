"""Which registered version is `champion`, on a real MLflow SQLite store and a real staged minival: a candidate
takes it only when its minival top-1 beats the current champion's, the champion evaluated on the same minival
from its registered weights (whatever dataset version it was trained on); val never decides.

The rule itself (`promotion_decision`) is a table, in tests/unit/test_promotion_rule.py; `decide_promotion` is
checked here with a champion registered as training registers it and evaluated for real; one sequence through
`register_best_checkpoint` checks that the decision moves the aliases a user looks at.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import models
from pipelines.settings import DataLayout
from pipelines.registry import tracking
from pipelines.training.evaluate import evaluate_split
from pipelines.registry.model_ref import load_registered_weights
from pipelines.registry.promotion import decide_promotion
from pipelines.training.recipe import load_recipe
from pipelines.registry.tracking import CANDIDATE, CHAMPION, STATE_DICT_ARTIFACT, Tags

NUM_CLASSES = 4  # the tiny demo ImageNet's
_variants = (f"efficientnet_b0_phi-{9 + i}" for i in itertools.count())  # one registered model per test


def _register(layout: DataLayout, variant: str, model: torch.nn.Module, promote: bool,
              with_weights: bool = True) -> tuple[str, str, bool]:
    """Register `model` as training does (its plain weights beside it), promoting it or not; or, without weights,
    as a version registered some other way (a run with no artifacts)."""
    c = tracking.client(layout.tracking_uri)
    run = tracking.start_run(c, tracking.experiment_id(c, layout.artifact_root), variant, {}, {})
    if not with_weights:
        name = tracking.registered_name(variant)
        c.create_registered_model(name)
        mv = c.create_model_version(name, f"runs:/{run}/elsewhere", run_id=run)
        c.set_registered_model_alias(name, tracking.CHAMPION, mv.version)
        return name, str(mv.version), True
    weights = {"state_dict": model.state_dict(), "model_args": {
        "name": "efficientnet_b0", "phi": -int(variant.rsplit("phi-", 1)[1]), "num_classes": model.num_classes}}
    return tracking.register_best_checkpoint(
        layout.tracking_uri, run, variant, np.zeros((1, 3, 32, 32), np.float32), {"resolution": 32}, {},
        promote=promote, weights=weights)


def _model(variant: str, seed: int, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create_model("efficientnet_b0", num_classes=num_classes,
                               phi=-int(variant.rsplit("phi-", 1)[1])).eval()


@pytest.fixture
def on_minival(staged_dataset: Path):
    recipe = load_recipe("demo")
    calls: list[float] = []

    def minival_top1(model: torch.nn.Module, spec) -> float:
        top1 = evaluate_split(model, str(staged_dataset), "minival", spec.eval_resolution, spec.crop_ratio,
                              recipe)["top1"]
        calls.append(top1)
        return top1

    minival_top1.calls = calls  # type: ignore[attr-defined]
    return minival_top1


def test_the_champion_is_evaluated_on_the_same_minival(data_layout_tmp: DataLayout, on_minival) -> None:
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)
    variant = next(_variants)
    name = tracking.registered_name(variant)
    # No champion yet: the candidate takes it without an evaluation of anything else.
    first = decide_promotion(c, name, 30.0, NUM_CLASSES, on_minival)
    assert first.promote and first.champion_top1 is None and first.champion_version is None
    assert not on_minival.calls

    champion = _model(variant, seed=0)
    _register(data_layout_tmp, variant, champion, promote=True)
    # Its registered weights are the model itself, rebuilt through `models` without unpickling.
    loaded, spec = load_registered_weights(c, c.get_model_version_by_alias(name, CHAMPION))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), champion.state_dict().values()))
    assert spec.name == variant

    direct = on_minival(champion, spec)  # what the champion scores on this minival
    on_minival.calls.clear()
    better = decide_promotion(c, name, direct + 1.0, NUM_CLASSES, on_minival)
    assert on_minival.calls == [direct]  # evaluated there, from its registered weights, once
    assert better.promote and better.champion_top1 == direct and better.champion_version == "1"
    assert better.tags()[Tags.CHAMPION_TOP1] == f"{direct:.3f}" and better.tags()[Tags.CHAMPION_BEFORE] == "1"
    tie = decide_promotion(c, name, direct, NUM_CLASSES, on_minival)
    assert not tie.promote and "kept the champion" in tie.reason
    worse = decide_promotion(c, name, direct - 1.0, NUM_CLASSES, on_minival)
    assert not worse.promote and worse.champion_top1 == direct


def test_a_champion_that_cannot_be_evaluated_gives_way(data_layout_tmp: DataLayout, on_minival) -> None:
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)
    variant = next(_variants)
    name = tracking.registered_name(variant)
    _register(data_layout_tmp, variant, _model(variant, 0), promote=True, with_weights=False)
    no_weights = decide_promotion(c, name, 1.0, NUM_CLASSES, on_minival)
    assert no_weights.promote and no_weights.champion_top1 is None and STATE_DICT_ARTIFACT in no_weights.reason

    other = next(_variants)
    _register(data_layout_tmp, other, _model(other, 0, num_classes=7), promote=True)
    other_classes = decide_promotion(c, tracking.registered_name(other), 1.0, NUM_CLASSES, on_minival)
    assert other_classes.promote and "7 classes" in other_classes.reason
    assert not on_minival.calls


def test_registration_moves_candidate_always_and_champion_only_when_promoted(data_layout_tmp: DataLayout) -> None:
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)
    variant = next(_variants)
    model = _model(variant, 0)

    def aliases(name: str) -> dict[str, str]:
        return {alias: str(c.get_model_version_by_alias(name, alias).version) for alias in (CANDIDATE, CHAMPION)}

    name, first, became = _register(data_layout_tmp, variant, model, promote=True)
    assert (first, became) == ("1", True)
    name, second, became = _register(data_layout_tmp, variant, model, promote=False)
    assert (second, became) == ("2", False)
    assert aliases(name) == {CANDIDATE: "2", CHAMPION: "1"}  # the better model keeps serving
    name, third, became = _register(data_layout_tmp, variant, model, promote=True)
    assert (third, became) == ("3", True) and aliases(name) == {CANDIDATE: "3", CHAMPION: "3"}
