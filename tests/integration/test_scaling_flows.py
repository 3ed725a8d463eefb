"""`search-scaling` and `scaling-study` as a user runs them, on a real Prefect server, the session's Ray cluster
and an MLflow store: the search's grid under the constraint, ASHA stopping trials, the winner stored as a set
that a family then trains with; the study's four methods side by side; bad input failing in one line."""

from __future__ import annotations

import json

import pytest
from helpers import flow_run_artifacts
from mlflow.tracking import MlflowClient

import models
from flows.scaling import SEARCH_ARTIFACT, STUDY_ARTIFACT, scaling_study, search_scaling
from flows.train_family import train_family
from models.summary import count_params
from pipelines.registry.tracking import EXPERIMENT, Tags
from pipelines.training.coefficients import load_coefficient_set, save_coefficient_set

SET = "test-search"
# Small and fast: one image size tier's batch, a few epochs; the grid has 4 points within 10% of 2.
OVERRIDES = {"data": {"batch_size": 4}}
GRID = {"alphas": [1.1, 1.2, 1.3], "betas": [1.1], "gammas": [1.15, 1.2], "tolerance": 0.1}
EPOCHS = 3


def _client(layout) -> MlflowClient:
    return MlflowClient(tracking_uri=layout.tracking_uri, registry_uri=layout.tracking_uri)


def _search(staged_dataset, layout, **kwargs):
    return search_scaling(baseline="phi=-9", recipe="demo", dataset_dir=str(staged_dataset),
                          data_dir=str(layout.root), overrides=OVERRIDES, **{**GRID, **kwargs}, epochs=EPOCHS,
                          grace_period=1, reduction_factor=2, set_name=SET, return_state=True,
                          max_concurrent_trials=1)  # trials reach each rung in grid order: ASHA decides the same


def test_search_stores_the_winner_asha_stops_some_and_a_family_trains_with_the_set(
        staged_dataset, data_layout_tmp, prefect_server, ray_cluster):
    layout = data_layout_tmp
    state = _search(staged_dataset, layout)
    assert state.is_completed(), state.message
    out = state.result()
    c = _client(layout)
    trials = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id],
                           filter_string=f"tags.{Tags.PARENT_RUN} = '{out['parent_run']}'")
    # Every grid point met the constraint, and every one that meets it became a trial (a nested run).
    points = {(float(r.data.params["alpha"]), float(r.data.params["beta"]), float(r.data.params["gamma"]))
              for r in trials}
    assert points == {(1.1, 1.1, 1.2), (1.2, 1.1, 1.15), (1.2, 1.1, 1.2), (1.3, 1.1, 1.15)}
    assert all(abs(a * b * b * g * g - 2) <= 0.2 for a, b, g in points)
    # ASHA stopped some trials early: fewer epochs in their runs, tagged so; the others ran all their epochs.
    epochs = {r.data.tags[Tags.TRIAL]: len(c.get_metric_history(r.info.run_id, "minival_top1")) for r in trials}
    stopped = {r.data.tags[Tags.TRIAL] for r in trials if r.data.tags[Tags.STOPPED_BY] == "scheduler"}
    assert stopped and len(stopped) < len(trials) and out["stopped_early"] == len(stopped)
    assert all(epochs[t] < EPOCHS for t in stopped) and all(epochs[t] == EPOCHS for t in set(epochs) - stopped)
    assert all(r.info.status == "FINISHED" for r in trials)
    # The winner: the best minival top-1 among the trials, stored as a set (file and parent run) and reported.
    best = max(max(m.value for m in c.get_metric_history(r.info.run_id, "minival_top1")) for r in trials)
    assert out["minival_top1"] == best
    found, tolerance = load_coefficient_set(layout, SET)
    assert (found.alpha, found.beta, found.gamma, tolerance) == (out["alpha"], out["beta"], out["gamma"], 0.1)
    parent = c.get_run(out["parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.tags["coefficients.alpha"] == f"{found.alpha:g}"
    stored = json.loads(open(c.download_artifacts(parent.info.run_id, f"coefficients/{SET}.json")).read())
    assert stored["source"]["search_run"] == parent.info.run_id
    assert {"trials.html", "trials.csv"} <= {f.path.split("/")[-1] for f in c.list_artifacts(parent.info.run_id,
                                                                                               "search")}
    assert SEARCH_ARTIFACT in flow_run_artifacts(parent.data.tags[Tags.FLOW_RUN])

    # A rerun with the same parameters goes on in the same experiment: every trial had ended, nothing trains.
    again = _search(staged_dataset, layout)
    assert again.is_completed(), again.message
    assert again.result()["parent_run"] == out["parent_run"] and again.result()["alpha"] == out["alpha"]
    assert len(c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.{Tags.PARENT_RUN} = '{out['parent_run']}'")) == len(trials)

    # A family member that names the set is built with the depths, widths and resolution the set implies.
    phi = -8
    family = train_family([f"phi={phi},coefficients={SET}"], recipe="demo", dataset_dir=str(staged_dataset),
                          data_dir=str(layout.root), overrides={**OVERRIDES, "ray": {"num_workers": 1},
                                                                "schedule": {"epochs": 1}}, return_state=True)
    assert family.is_completed(), family.message
    (row,) = family.result()
    implied = models.compound_scale(phi, found.alpha, found.beta, found.gamma)
    spec = models.resolve_variant("efficientnet_b0", phi=phi, alpha=found.alpha, beta=found.beta, gamma=found.gamma)
    assert (spec.depth_mult, spec.width_mult, spec.train_resolution) == (implied.depth_mult, implied.width_mult,
                                                                         implied.resolution)
    assert row["variant"] == spec.name and row["train_resolution"] == row["eval_resolution"] == implied.resolution
    b0 = models.get_variant("efficientnet_b0")
    blocks = models.plan_blocks(spec).blocks
    assert len(blocks) == sum(models.round_repeats(r, implied.depth_mult)
                              for r in (s.repeats for s in models.ARCHITECTURES[b0.architecture].stages))
    assert row["params"] == count_params(models.build_model(spec, 4))
    version = c.get_model_version(row["registered_model"], row["version"])
    assert version.tags[Tags.COEFFICIENTS] == SET and version.tags[Tags.PHI] == str(phi)
    assert version.tags[Tags.SCALING] == f"alpha={found.alpha:g} beta={found.beta:g} gamma={found.gamma:g}"


def test_the_study_compares_methods_at_equal_flops(staged_dataset, data_layout_tmp, prefect_server, ray_cluster):
    layout = data_layout_tmp
    state = scaling_study(baseline="phi=-9", recipe="demo", dataset_dir=str(staged_dataset),
                          data_dir=str(layout.root), overrides=OVERRIDES, targets=[2.0],
                          methods=["width", "compound"], epochs=2, return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [(r["method"], r["target"]) for r in rows] == [("baseline", 1.0), ("width", 2.0), ("compound", 2.0)]
    assert all(r["status"] == "trained" for r in rows)
    for r in rows[1:]:
        assert r["gmacs_ratio"] == pytest.approx(2.0, rel=0.1)
    c = _client(layout)
    for r in rows:  # each member's chosen checkpoint was evaluated on val, on its own run
        (val,) = c.get_metric_history(r["run_id"], "val_top1")
        assert val.value == r["val_top1"] and 0 <= val.value <= 100 and val.step == r["best_epoch"]
    parent_id = c.get_run(rows[0]["run_id"]).data.tags[Tags.PARENT_RUN]
    parent = c.get_run(parent_id)
    assert parent.data.tags["verdict"].startswith("x2: width ")
    files = {f.path.split("/")[-1] for f in c.list_artifacts(parent_id, "comparison")}
    assert files == {"scaling_study.png", "scaling_study.html", "scaling_study.csv"}
    assert STUDY_ARTIFACT in flow_run_artifacts(parent.data.tags[Tags.FLOW_RUN])


@pytest.mark.parametrize("flow, kwargs, message", [
    ("search", {"baseline": "efficientnet_b99"}, "unknown model 'efficientnet_b99'"),
    ("search", {"alphas": [1.0], "betas": [1.0], "gammas": [1.0]}, "no point of the grid"),
    ("search", {"alphas": [0.5]}, "alphas: every value must be a number >= 1"),
    ("search", {"grace_period": 9}, "need 1 <= grace_period (9) <= epochs (8)"),
    ("search", {"set_name": "taken"}, "a coefficient set named 'taken' exists"),
    ("study", {"coefficients": "nowhere"}, "no coefficient set 'nowhere'"),
    ("study", {"methods": ["height"]}, "methods must be among width, depth, resolution, compound"),
    ("study", {"targets": [0.5]}, "each > 1"),
])
def test_bad_input_fails_in_one_line_before_anything_trains(staged_dataset, data_layout_tmp, prefect_server,
                                                            flow, kwargs, message):
    layout = data_layout_tmp
    save_coefficient_set(layout, models.CoefficientSet("taken", 1.2, 1.1, 1.15))
    run = {"search": search_scaling, "study": scaling_study}[flow]
    state = run(dataset_dir=str(staged_dataset), data_dir=str(layout.root), return_state=True, **kwargs)
    assert state.is_failed()
    assert message in state.message and "\n" not in state.message and "Traceback" not in state.message
    assert not (layout.ray_storage / "tune").exists()  # nothing trained
