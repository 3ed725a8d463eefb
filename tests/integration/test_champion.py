"""Which registered version is `champion`, on a real MLflow SQLite store: the best val top-1 among the versions
of the same dataset version; a model trained on another dataset version takes the alias (the scores are not
comparable, so the newest dataset's first model leads).

The rule (`_beats_champion`) is checked against versions made directly in the registry with the tags a
registration writes (seconds); one sequence through `register_best_checkpoint` checks that registration applies
it and moves the aliases a user looks at.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import models
from pipelines.settings import DataLayout
from pipelines.training import tracking
from pipelines.training.tracking import CANDIDATE, CHAMPION, Tags, _beats_champion

_names = (f"efficientnet-rule-{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version(c: MlflowClient, name: str, tags: dict[str, str], champion: bool = False) -> str:
    mv = c.create_model_version(name, f"/nowhere/{name}", tags=tags)
    if champion:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    return str(mv.version)


def _with_champion(c: MlflowClient, dataset_version: str, val_top1: str | None) -> str:
    """A registered model whose champion (version 1) was trained on `dataset_version` and scored `val_top1` (as
    the tag holds it), and whose latest version (2, the candidate) scored 10 on the same data: a newcomer is
    measured against the champion, not against the latest version."""
    name = next(_names)
    c.create_registered_model(name)
    tags = {Tags.DATASET_VERSION: dataset_version} | ({Tags.VAL_TOP1: val_top1} if val_top1 is not None else {})
    _version(c, name, tags, champion=True)
    c.set_registered_model_alias(name, CANDIDATE, _version(c, name, {Tags.DATASET_VERSION: dataset_version,
                                                                     Tags.VAL_TOP1: "10.000"}))
    return name


def test_the_first_version_of_a_model_becomes_champion(registry: MlflowClient) -> None:
    assert _beats_champion(registry, "efficientnet-never-registered", 1.0, "v1")
    name = next(_names)
    registry.create_registered_model(name)
    _version(registry, name, {Tags.DATASET_VERSION: "v1", Tags.VAL_TOP1: "80.000"})  # registered, no champion
    assert _beats_champion(registry, name, 1.0, "v1")


@pytest.mark.parametrize(
    "val_top1, dataset_version, promoted",
    [
        (60.0, "v1", True),  # better on the same data: takes champion
        (50.001, "v1", True),
        (40.0, "v1", False),  # worse than the champion (better than the latest version): stays candidate only
        (50.0, "v1", False),  # a tie: the incumbent stays
        (10.0, "v2", True),  # another dataset version: not comparable, the newcomer takes champion
        (90.0, "v2", True),
    ],
)
def test_champion_moves_only_to_a_better_model_of_the_same_dataset_version(
    registry: MlflowClient, val_top1: float, dataset_version: str, promoted: bool
) -> None:
    name = _with_champion(registry, "v1", "50.000")
    assert _beats_champion(registry, name, val_top1, dataset_version) is promoted


def test_a_champion_without_a_score_is_beaten_by_any(registry: MlflowClient) -> None:
    name = _with_champion(registry, "v1", None)
    assert _beats_champion(registry, name, 0.0, "v1")


def _register(layout: DataLayout, model: object, val_top1: float, dataset_version: str) -> tuple[str, str, bool]:
    c = tracking.client(layout.tracking_uri)
    run = tracking.start_run(c, tracking.experiment_id(c, layout.artifact_root), f"top1-{val_top1}", {}, {})
    # The tags the training job writes on every version (pipelines/training/job.py), the score rounded as there.
    tags = {Tags.DATASET_VERSION: dataset_version, Tags.VAL_TOP1: f"{val_top1:.3f}"}
    return tracking.register_best_checkpoint(
        layout.tracking_uri, run, model, "efficientnet_b0_phi-9", np.zeros((1, 3, 32, 32), np.float32),
        {"resolution": 32}, tags, val_top1=val_top1, dataset_version=dataset_version)


def test_registration_moves_candidate_always_and_champion_only_for_a_better_model(
    data_layout_tmp: DataLayout,
) -> None:
    model = models.create_model("efficientnet_b0", num_classes=3, phi=-9).eval()
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)

    def aliases(name: str) -> dict[str, str]:
        return {alias: str(c.get_model_version_by_alias(name, alias).version) for alias in (CANDIDATE, CHAMPION)}

    name, first, became = _register(data_layout_tmp, model, 50.0, "v1")
    assert (first, became) == ("1", True)
    name, second, became = _register(data_layout_tmp, model, 40.0, "v1")  # worse on the same data
    assert (second, became) == ("2", False)
    assert aliases(name) == {CANDIDATE: "2", CHAMPION: "1"}  # the better model keeps serving
