"""`search-baseline` as a user runs it (real Prefect test server, the session's Ray cluster, an MLflow store):
sampled tables trained as Tune trials with ASHA, each a nested run with its reward; the best stored as a named
baseline that a family then trains with through `train-family`; bad input failing in one line."""

from __future__ import annotations

import pytest
from helpers import flow_run_artifacts
from mlflow.tracking import MlflowClient

from flows.search_baseline import ARTIFACT, search_baseline
from flows.train_family import train_family
from models import ARCHITECTURES
from models.search_space import space_around
from pipelines.registry.model_ref import load_model
from pipelines.registry.tracking import EXPERIMENT, Tags
from pipelines.training.baselines import load_baseline

OVERRIDES = {"data": {"batch_size": 4}}


def test_the_search_stores_the_best_table_and_a_family_trains_from_it(staged_dataset, data_layout_tmp,
                                                                      prefect_server, ray_cluster):
    layout = data_layout_tmp
    state = search_baseline(samples=3, epochs=2, dataset_dir=str(staged_dataset), data_dir=str(layout.root),
                            overrides=OVERRIDES, name="test-nas", max_concurrent_trials=1, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    c = MlflowClient(tracking_uri=layout.tracking_uri, registry_uri=layout.tracking_uri)
    trials = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id],
                           filter_string=f"tags.{Tags.PARENT_RUN} = '{out['parent_run']}'")
    assert len(trials) == 3
    for t in trials:  # accuracy, FLOPs, parameters and step time, and the reward, on each trial's run
        assert {"minival_top1", "gmacs", "model_params", "seconds_per_image", "reward"} <= set(t.data.metrics)
    best = max(trials, key=lambda t: t.data.metrics["reward"])
    assert best.data.tags[Tags.TRIAL] == out["trial"] and best.data.metrics["reward"] == pytest.approx(out["reward"])
    stored = load_baseline(layout, "test-nas")
    assert space_around(ARCHITECTURES["v1_b0"]).contains(stored)
    files = {f.path.split("/")[-1] for f in c.list_artifacts(out["parent_run"], "search")}
    assert {"baselines.png", "baselines.html", "baselines.csv"} <= files
    assert ARTIFACT in flow_run_artifacts(c.get_run(out["parent_run"]).data.tags[Tags.FLOW_RUN])

    family = train_family(["phi=-9,baseline=test-nas"], recipe="demo", dataset_dir=str(staged_dataset),
                          data_dir=str(layout.root), overrides={**OVERRIDES, "ray": {"num_workers": 1},
                                                                "schedule": {"epochs": 1}}, return_state=True)
    assert family.is_completed(), family.message
    (row,) = family.result()
    registered = load_model(f"models:/{row['registered_model']}/{row['version']}", layout.tracking_uri)
    assert ARCHITECTURES[registered.spec.architecture] == stored  # the weights rebuild the searched table


@pytest.mark.parametrize("kwargs, message", [
    ({"space": "v3"}, "space and reward must be among v1, v2"),
    ({"grace_period": 9}, "1 <= grace_period (9) <= epochs (4)"),
    ({"name": "taken"}, "a baseline named 'taken' exists"),
])
def test_bad_input_fails_in_one_line(staged_dataset, data_layout_tmp, prefect_server, kwargs, message):
    from pipelines.training.baselines import save_baseline

    save_baseline(data_layout_tmp, "taken", ARCHITECTURES["v1_b0"])
    state = search_baseline(dataset_dir=str(staged_dataset), data_dir=str(data_layout_tmp.root), return_state=True,
                            **kwargs)
    assert state.is_failed() and message in state.message and "\n" not in state.message, state.message
