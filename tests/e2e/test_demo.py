"""The demo path end to end, small: generate -> stage (Prefect) -> train a 2-member family (Ray) -> MLflow."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from flows.demo import demo
from pipelines.registry.tracking import EXPERIMENT, Tags


def test_demo_end_to_end_and_rerun(data_layout_tmp, prefect_server, ray_cluster):
    kwargs = dict(data_dir=str(data_layout_tmp.root), family=["phi=-9", "phi=-8"], epochs=3, num_classes=4,
                  train_per_class=16, val_per_class=4)
    rows = demo(**kwargs)
    assert [r["variant"] for r in rows] == ["efficientnet_b0_phi-9", "efficientnet_b0_phi-8"]
    assert rows[0]["params"] < rows[1]["params"]  # compound scaling grows the model with phi

    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)
    for r in rows:
        versions = c.search_model_versions(f"name='{r['registered_model']}'")
        assert [str(v.version) for v in versions] == [r["version"]]

    # A second run reuses the archives and the staged shards, and adds new runs and versions.
    def mtimes():
        return {p: p.stat().st_mtime_ns for p in data_layout_tmp.root.rglob("*.tar")
                if "ray" not in p.parts and "mlflow" not in p.parts}

    before = mtimes()
    again = demo(**{**kwargs, "family": ["phi=-9"]})
    assert mtimes() == before  # no archive or shard rewritten
    assert again[0]["run_id"] != rows[0]["run_id"] and not again[0]["resumed"]
    assert again[0]["version"] == "2"
    runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])
    families = [r for r in runs if r.data.tags.get(Tags.RUN_KIND) == "family"]
    assert len(runs) - len(families) == 3 and len(families) == 2  # each demo: its members nested under a family run
