"""The nightly as a team leaves it running, three nights on a real Prefect server, Ray cluster and MLflow store:
night 1 stages the source and trains the family (no champion yet: from scratch); images are added; night 2
stages only them, as a new version on top of the first, fine-tunes each champion on it, and moves `champion`
only where the new version beats the champion on the new minival (one member made to improve, the other to stay
where it was); night 3 finds nothing new and says so. The deployment's concurrency limit is Prefect's own: a second
run while one holds the slot is cancelled by the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.nightly import ARTIFACT, nightly
from pipelines.dataset import latest_version, read_manifest
from pipelines.settings import DataLayout
from pipelines.source.demo import extract_to_tree
from pipelines.registry.tracking import CHAMPION, Tags

from helpers import add_images, check_family_run, flow_run_artifacts

IMPROVES, STAYS = "phi=-9", "phi=-8"
SLUGS = {IMPROVES: "efficientnet_b0_phi-9", STAYS: "efficientnet_b0_phi-8"}  # the rows' variants
STAGING = {"tiers": [32, 64], "shard_size": 8, "minival": 0.25, "max_bad_fraction": 0.05}
# One Ray worker each: both members train at once on the session's 2-CPU cluster; small batches: more steps.
OVERRIDES = {"ray": {"num_workers": 1}, "schedule": {"epochs": 3, "patience": None}, "data": {"batch_size": 4}}
# Night 1: IMPROVES barely trains (its champion stays near chance, and a few epochs beat it by far). Night 2:
# STAYS fine-tunes with a learning rate and a BN momentum of ~0, so its new version is its champion's weights,
# which score the same on any minival: not better, so the champion stays.
NIGHT_1 = {IMPROVES: {"optim": {"lr_per_256": 1e-9}}}
NIGHT_2 = {STAYS: {"optim": {"lr_per_256": 1e-12}, "model": {"bn_momentum": 1e-9}}}


def _night(tree: Path, layout: DataLayout, member_overrides: dict | None):
    return nightly([IMPROVES, STAYS], recipe="demo", mode="finetune", source=str(tree), data_dir=str(layout.root),
                   staging=STAGING, finetune_epochs=3, finetune_lr_scale=1.0, overrides=OVERRIDES,
                   member_overrides=member_overrides, return_state=True)


def test_three_nights(demo_archives, demo_summary, tmp_path, prefect_server, ray_cluster):
    tree = extract_to_tree(demo_archives, tmp_path / "tree", "tree")
    layout = DataLayout(tmp_path / "data").ensure()
    c = MlflowClient(tracking_uri=layout.tracking_uri, registry_uri=layout.tracking_uri)

    first = _night(tree, layout, NIGHT_1)
    assert first.is_completed(), first.message
    v1 = latest_version(layout.datasets)
    rows1 = {r["variant"]: r for r in first.result()}
    assert all(r["champion"] and r["init_from"] is None for r in rows1.values())  # no champion yet: from scratch
    # The night's family run (a train-family subflow): side by side, compared, summarised.
    family_flow_run = c.get_run(rows1[SLUGS[IMPROVES]]["run_id"]).data.tags[Tags.FLOW_RUN]
    check_family_run(layout, ray_cluster, family_flow_run, list(rows1.values()),
                     dict.fromkeys(SLUGS.values(), OVERRIDES["schedule"]["epochs"]))

    new = add_images(tree, demo_summary.wnids, {demo_summary.wnids[0]: 3, demo_summary.wnids[2]: 2})
    second = _night(tree, layout, NIGHT_2)
    assert second.is_completed(), second.message
    v2 = latest_version(layout.datasets)
    # Only the new images were staged, as a version on top of the first one (its shards reused, same minival).
    old, grown = read_manifest(v1), read_manifest(v2)
    assert grown.base_version == v1.name != v2.name
    assert set(old.minival_keys) <= set(grown.minival_keys)
    assert (sum(grown.splits[s].samples for s in ("train", "minival"))
            == sum(old.splits[s].samples for s in ("train", "minival")) + len(new))

    rows2 = {r["variant"]: r for r in second.result()}
    assert set(rows2) == set(rows1)
    moved = {}
    for variant, row in rows2.items():
        before = rows1[variant]
        name = row["registered_model"]
        mv = c.get_model_version(name, row["version"])
        assert int(row["version"]) == int(before["version"]) + 1 and mv.tags[Tags.DATASET_VERSION] == v2.name
        # Fine-tuned from the champion of the night before, that lineage on the run and the version.
        assert row["init_from"] == mv.tags[Tags.INIT_FROM] == f"models:/{name}/{before['version']}"
        assert c.get_run(row["run_id"]).data.tags[Tags.INIT_FROM] == row["init_from"]
        # The champion measured on the new minival too, and the alias where the rule puts it.
        assert row["champion_before"] == before["version"] and row["champion_before_top1"] is not None
        improved = row["promotion_top1"] > row["champion_before_top1"]
        champion = str(c.get_model_version_by_alias(name, CHAMPION).version)
        assert champion == (row["version"] if improved else before["version"]), (variant, row)
        assert row["champion"] is improved
        moved[variant] = improved
    assert moved == {SLUGS[IMPROVES]: True, SLUGS[STAYS]: False}, rows2  # both ways

    # The decisions on the flow run (Prefect UI) and, before/after, on the family's parent MLflow run.
    table = flow_run_artifacts(second.state_details.flow_run_id)[ARTIFACT].data
    for variant, row in rows2.items():
        assert f"| {variant} |" in table and row["promotion"] in table, table
    parent = c.get_run(rows2[SLUGS[IMPROVES]]["run_id"]).data.tags[Tags.PARENT_RUN]
    assert {a.path for a in c.list_artifacts(parent, "nightly")} == {"nightly/champions.html",
                                                                     "nightly/champions.csv"}

    third = _night(tree, layout, None)
    assert third.is_completed() and "nothing to do" in third.message, third.message
    assert latest_version(layout.datasets) == v2
    for row in rows2.values():  # no new version
        assert len(c.search_model_versions(f"name = '{row['registered_model']}'")) == int(row["version"])


@pytest.mark.parametrize("kwargs, named", [
    (dict(source="/nonexistent/imagenet"), "/nonexistent/imagenet"),
    (dict(mode="sometimes"), "mode must be one of finetune, retrain"),
    (dict(staging={"tierz": [32]}), "unknown stage-imagenet parameter(s) tierz"),
    (dict(variants=["phi=-9", "efficientnet_b99"]), "efficientnet_b99"),
    (dict(finetune_epochs=0), "finetune_epochs (0)"),
])
def test_bad_nightly_input_fails_in_one_line(kwargs, named, demo_archives, tmp_path, prefect_server):
    args = {"variants": [IMPROVES], "recipe": "demo", "source": str(demo_archives), "data_dir": str(tmp_path),
            "staging": STAGING, **kwargs}
    state = nightly(**args, return_state=True)
    assert state.is_failed() and named in state.message and "\n" not in state.message, state.message
    assert not (tmp_path / "datasets" / "LATEST").exists()  # failed before (or while) staging: nothing staged


def test_a_second_night_while_one_runs_is_cancelled(prefect_server):
    """Prefect's deployment concurrency limit, as `nightly/demo` is deployed: the second run's move to Pending is
    refused by the server and the run cancelled (CANCEL_NEW), while the first holds the slot."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    from flows.deployments import build_deployments

    (deployment,) = build_deployments(["nightly/demo"])
    deployment_id = deployment.apply()

    async def nights() -> list[str]:
        async with get_client() as client:
            async def start() -> str:
                run = await client.create_flow_run_from_deployment(deployment_id, parameters={"source": "/nowhere"})
                await client.set_flow_run_state(run.id, Pending())
                return run.id

            async def state(run_id: str) -> str:
                return (await client.read_flow_run(run_id)).state.type.value

            first = await start()
            await client.set_flow_run_state(first, Running())
            second = await start()
            seen = [await state(first), await state(second)]
            await client.set_flow_run_state(first, Completed())  # the slot back
            third = await start()
            return [*seen, await state(third)]

    assert asyncio.run(nights()) == ["RUNNING", "CANCELLED", "PENDING"]
