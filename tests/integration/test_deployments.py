"""The deployments users run (`prefect deployment run train-family/b0-b7`, the nightly's schedule) exist, both as
`effnet serve` registers them and as `effnet deploy` puts them on a `process` work pool (the stack's way)."""

from __future__ import annotations

import asyncio

import pytest

from flows.deployments import (
    DEPLOYMENTS,
    NIGHTLY_CRON,
    TIMEZONE,
    TIMEZONE_ENV,
    build_deployments,
    deploy_all,
    nightly_timezone,
)
from pipelines.settings import PROJECT_ROOT

POOL = "effnet-test"


def _read(name: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    return asyncio.run(read())


def _create_process_pool(name: str) -> None:
    """A `process` work pool with the worker type's own job template, as `prefect work-pool create` makes it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    async def create():
        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                pass

    asyncio.run(create())


def test_deployments_register_with_schedule(prefect_server):
    ids = [d.apply() for d in build_deployments()]
    assert len(ids) == len(DEPLOYMENTS)

    b0_b7 = _read("train-family/b0-b7")
    assert b0_b7.parameters["variants"] == [f"efficientnet_b{i}" for i in range(8)] and not b0_b7.schedules
    night = _read("nightly/default")
    assert night.parameters == {"variants": b0_b7.parameters["variants"], "recipe": "v1", "mode": "finetune"}
    (sched,) = night.schedules
    assert sched.schedule.cron == NIGHTLY_CRON and sched.schedule.timezone == TIMEZONE and sched.active
    # Two nights never overlap: Prefect's deployment concurrency limit (see test_nightly for it at work).
    assert night.global_concurrency_limit.limit == 1
    assert night.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert not _read("train-family/demo").schedules and not _read("nightly/demo").schedules


def test_the_nightly_timezone_is_the_deployers(monkeypatch, prefect_server):
    monkeypatch.setenv(TIMEZONE_ENV, "Asia/Tokyo")
    assert nightly_timezone() == "Asia/Tokyo" and nightly_timezone("Europe/Berlin") == "Europe/Berlin"
    (deployment,) = build_deployments(["nightly/default"], timezone="Europe/Berlin")
    assert deployment.schedules[0].schedule.timezone == "Europe/Berlin"
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        nightly_timezone("Mars/Olympus")


def test_deploy_puts_every_deployment_on_the_work_pool(prefect_server):
    _create_process_pool(POOL)
    ids = deploy_all(POOL)
    assert len(ids) == len(DEPLOYMENTS)

    for spec in DEPLOYMENTS:
        d = _read(spec.full_name)
        assert d.work_pool_name == POOL, spec.full_name
        # The worker changes to this checkout and imports the flow's file from there: no image, no push.
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}]
        assert (PROJECT_ROOT / d.entrypoint.split(":")[0]).is_file(), d.entrypoint
        assert d.enforce_parameter_schema  # the server refuses a run whose parameters do not fit the flow's types
        assert bool(d.schedules) == spec.nightly, spec.full_name
    v2 = _read("train-family/v2-s-m-l")
    assert v2.parameters == {"variants": ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"],
                             "recipe": "v2-progressive"}
    assert v2.entrypoint == "flows/train_family.py:train_family"
    assert v2.parameter_openapi_schema["properties"]["variants"]["type"] == "array"
    # The UI's run form describes every field (from the flow's docstring).
    for spec in DEPLOYMENTS:
        properties = _read(spec.full_name).parameter_openapi_schema["properties"]
        undescribed = [name for name, prop in properties.items() if not prop.get("description")]
        assert not undescribed, (spec.full_name, undescribed)


def test_deploy_to_a_missing_pool_says_so(prefect_server):
    with pytest.raises(ValueError, match="Could not find work pool 'no-such-pool'"):
        deploy_all("no-such-pool", ["train-family/demo"])
