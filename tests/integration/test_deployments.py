"""The deployments users run (`prefect deployment run train-family/b0-b7`) exist with the nightly schedule."""

from __future__ import annotations

import asyncio

from flows.deployments import DEPLOYMENTS, NIGHTLY_CRON, TIMEZONE, build_deployments


def test_deployments_register_with_schedule(prefect_server):
    from prefect.client.orchestration import get_client

    ids = [d.apply() for d in build_deployments()]
    assert len(ids) == len(DEPLOYMENTS)

    async def read(name):
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    b0_b7 = asyncio.run(read("train-family/b0-b7"))
    assert b0_b7.parameters["variants"] == [f"efficientnet_b{i}" for i in range(8)]
    (sched,) = b0_b7.schedules
    assert sched.schedule.cron == NIGHTLY_CRON and sched.schedule.timezone == TIMEZONE and sched.active
    demo = asyncio.run(read("train-family/demo"))
    assert not demo.schedules
