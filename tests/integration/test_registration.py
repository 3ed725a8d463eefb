"""Registration in the MLflow registry: by the logged model's id (as a tracking server requires), once per run,
and nothing half-registered left when it fails."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import models
from pipelines.registry import tracking


def _register(layout, run_id, tags):
    model = models.create_model("efficientnet_b0", num_classes=3, phi=-9).eval()
    weights = {"state_dict": model.state_dict(), "model_args": {"name": "efficientnet_b0", "phi": -9,
                                                                "num_classes": 3}}
    return tracking.register_best_checkpoint(
        layout.tracking_uri, run_id, "efficientnet_b0_phi-9", np.zeros((1, 3, 32, 32), np.float32),
        {"resolution": 32}, tags, promote=True, weights=weights)


def test_register_once_and_clean_up_a_failure(data_layout_tmp):
    c = tracking.client(data_layout_tmp.tracking_uri)
    exp = tracking.experiment_id(c, data_layout_tmp.artifact_root)
    run_a = tracking.start_run(c, exp, "a", {}, {})
    name, version, champion = _register(data_layout_tmp, run_a, {"dataset_version": "v1", "val_top1": "50"})
    assert (name, version, champion) == ("efficientnet-b0-phi-9", "1", True)
    mv = c.get_model_version(name, version)
    assert mv.source.startswith("models:/m-") and set(mv.aliases) == {"candidate", "champion"}
    # Asked again for the same run (the process died after registering): the same version, not a second one.
    assert _register(data_layout_tmp, run_a, {"dataset_version": "v1"}) == (name, "1", True)
    assert len(c.search_model_versions(f"name='{name}'")) == 1

    # A version the registry refuses (a tag key MLflow rejects): nothing of this attempt stays.
    run_b = tracking.start_run(c, exp, "b", {}, {})
    with pytest.raises(Exception):
        _register(data_layout_tmp, run_b, {"": "empty key"})
    assert len(c.search_model_versions(f"name='{name}'")) == 1
    live = [m for m in c.search_logged_models([exp]) if m.source_run_id == run_b]
    assert live == [], live
    assert tracking.Tags.REGISTERED not in c.get_run(run_b).data.tags


def test_a_failed_first_registration_leaves_no_empty_registered_model(data_layout_tmp):
    c = tracking.client(data_layout_tmp.tracking_uri)
    exp = tracking.experiment_id(c, data_layout_tmp.artifact_root)
    run = tracking.start_run(c, exp, "a", {}, {})
    with pytest.raises(Exception):
        _register(data_layout_tmp, run, {"": "empty key"})
    assert c.search_registered_models() == []
    MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)  # the store is still usable
    assert _register(data_layout_tmp, run, {"dataset_version": "v1"})[1] == "1"
