"""Pure pieces of the stack path: the cluster fit check, the job key, the epoch line, recipe errors, stack settings."""

from __future__ import annotations

import json

import pytest

from pipelines.settings import DataLayout, StackError, is_loopback_address
from pipelines.training import cluster
from pipelines.training.job import _job_key, tuned_variant_slug
from pipelines.training.recipe import RecipeError, load_recipe
from pipelines.training.supervise import format_epoch_line


@pytest.mark.parametrize("workers, per_worker, nodes, fits", [
    (2, {"CPU": 1}, [{"CPU": 2}], True),
    (3, {"CPU": 1}, [{"CPU": 2}], False),
    (2, {"CPU": 2}, [{"CPU": 2}, {"CPU": 2}], True),
    (1, {"CPU": 3}, [{"CPU": 2}, {"CPU": 2}], False),  # 4 CPUs in all, but no node holds a whole worker
    (8, {"CPU": 8, "GPU": 1}, [{"CPU": 2}], False),
    (8, {"CPU": 8, "GPU": 1}, [{"CPU": 64, "GPU": 8}], True),
    (2, {"CPU": 1, "GPU": 1}, [{"CPU": 96, "GPU": 1}, {"CPU": 8, "GPU": 1}], True),
])
def test_unmet_request_places_whole_workers_on_nodes(workers, per_worker, nodes, fits):
    assert (cluster.unmet_request(workers, per_worker, nodes) is None) == fits


def test_unmet_request_names_what_is_missing_and_what_the_cluster_has():
    message = cluster.unmet_request(8, {"CPU": 8, "GPU": 1}, [{"CPU": 2, "memory": 1e9}])
    assert "8 workers x {CPU: 8, GPU: 1}" in message and "{CPU: 2}" in message
    assert "missing: CPU, GPU" in message and "\n" not in message
    split = cluster.unmet_request(1, {"CPU": 3}, [{"CPU": 2}, {"CPU": 2}])
    assert "room on one node" in split


def test_worker_resources_follow_the_recipe():
    assert cluster.worker_resources(load_recipe("v1")) == {"CPU": 8.0, "GPU": 1.0}
    assert cluster.worker_resources(load_recipe("demo")) == {"CPU": 1.0}


def test_job_key_changes_with_every_override():
    recipe = load_recipe("demo")
    key = _job_key("efficientnet_b0_phi-9", recipe, "imagenet-abc")
    assert key == _job_key("efficientnet_b0_phi-9", load_recipe("demo"), "imagenet-abc")  # deterministic
    others = {
        _job_key("efficientnet_b0_phi-9", recipe.with_overrides(schedule={"epochs": 1}), "imagenet-abc"),
        _job_key("efficientnet_b0_phi-9", recipe.with_overrides(data={"batch_size": 8}), "imagenet-abc"),
        _job_key("efficientnet_b0_phi-8", recipe, "imagenet-abc"),
        _job_key("efficientnet_b0_phi-9", recipe, "imagenet-def"),
    }
    assert key not in others and len(others) == 4


def test_job_key_is_the_first_ten_hex_of_the_recipes_canonical_json():
    """The key's hash is what it was first computed with: a finished job's key must not change under a rerun."""
    import hashlib

    recipe = load_recipe("demo").with_overrides(model={"width_mult": 1.1})
    digest = hashlib.sha256(json.dumps(recipe.model_dump(), sort_keys=True).encode()).hexdigest()[:10]
    assert tuned_variant_slug(recipe) == recipe.model.spec().name == "efficientnet_b0_phi-9_w1.1"
    assert _job_key(tuned_variant_slug(recipe), recipe, "imagenet-abc") == (
        f"efficientnet_b0_phi-9_w1.1__demo-{digest}__imagenet-abc")


def test_epoch_line_is_one_line_with_what_a_user_follows():
    line = format_epoch_line("efficientnet_b0", 2, 10, {"train_loss": 1.23456, "minival_top1": 55.5,
                                                        "best_minival_top1": 60.0, "images_per_s": 1234.5,
                                                        "epoch_seconds": 12.3, "image_size": 224})
    assert line == ("efficientnet_b0 epoch 3/10, train loss 1.235, minival top-1 55.5, best 60.0, 224 px, "
                    "1234 img/s, 12.3 s")
    assert "minival" not in format_epoch_line("b0", 0, 1, {"minival_top1": float("nan"), "epoch_seconds": 1.0})


def test_recipe_errors_are_one_line_per_problem_with_the_key_path(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe("demo").with_overrides(schedule={"epochs": 0}, data={"batch_size": -1})
    message = str(err.value)
    assert "\n" not in message
    assert "schedule.epochs (given 0)" in message and "data.batch_size (given -1)" in message
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  optimizer: adam\n  lr: 1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(bad))
    assert "optim.optimizer (given 'adam')" in str(err.value) and "optim.lr" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_stack_file_points_every_client_at_the_stack(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    layout = DataLayout(tmp_path)
    assert layout.stack is None and layout.tracking_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert layout.ray_address is None
    (tmp_path / "stack.json").write_text(json.dumps({
        "prefect_api_url": "http://127.0.0.1:1/api", "mlflow_tracking_uri": "http://127.0.0.1:2",
        "ray_address": "127.0.0.1:3", "ray_dashboard_url": "http://127.0.0.1:4", "ray_auth_mode": "token"}))
    layout = DataLayout(tmp_path)
    assert layout.tracking_uri == "http://127.0.0.1:2" and layout.ray_address == "127.0.0.1:3"
    assert layout.artifact_root is None
    # Nothing answers on those ports: a recorded stack that is down is an error, not a silent fallback.
    with pytest.raises(StackError, match="does not answer: Prefect"):
        layout.use_stack()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert DataLayout(tmp_path).tracking_uri == "http://elsewhere:5000"  # the caller's variable wins
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(StackError, match="not a stack settings file"):
        DataLayout(tmp_path).stack


@pytest.mark.parametrize("address, loopback", [
    (None, True), ("local", True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
    ("ray://127.0.0.1:10001", True), ("10.0.0.5:6379", False), ("head.cluster:6379", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback_address(address) == loopback


def test_a_second_data_directory_in_the_same_process_keeps_its_own_store(tmp_path, monkeypatch):
    """MLflow exports the URI a client is made for; read back as the user's shared server, it sent a second data
    directory's runs into the first one's store (every arm of a benchmark, every test of a session)."""
    from pipelines.registry import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = DataLayout(tmp_path / "a"), DataLayout(tmp_path / "b")
    tracking.client(first.tracking_uri)
    assert second.tracking_uri == f"sqlite:///{tmp_path}/b/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://shared:5000")
    tracking.client(first.tracking_uri)
    assert second.tracking_uri == "http://shared:5000"  # the user's variable is left as it was
