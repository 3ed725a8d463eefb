"""Deployments of the flows, and the nightly schedule: one list, two ways to run it.

- On a work pool (the stack, `make up`): `effnet deploy --pool effnet` registers each deployment with the
  Prefect server named by PREFECT_API_URL, its code loaded from this checkout (`flow.from_source`: the worker
  changes to the checkout and imports the flow's file from there, no image, no push), and the pool's worker
  (`prefect worker start -p effnet`) runs what `prefect deployment run train-family/b0-b7` or the schedule asks.
- In one process, without a work pool: `effnet serve` (or `python -m flows.deployments`) registers the same
  deployments and polls for their runs itself.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from models import variant_range
from pipelines.settings import PROJECT_ROOT
from pipelines.training.family import DEMO_FAMILY

NIGHTLY_CRON = "0 2 * * *"
TIMEZONE = "UTC"  # stored explicitly: a schedule without one is ambiguous on the server
TIMEZONE_ENV = "EFFNET_NIGHTLY_TIMEZONE"  # the deployer's choice (an IANA name, e.g. Europe/Berlin)


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # a flow's name (`deployable_flows`)
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    nightly: bool = False  # on the cron schedule
    description: str = ""
    one_at_a_time: bool = False  # a run that finds another of this deployment running is cancelled

    @property
    def full_name(self) -> str:
        """`flow/name`, as `prefect deployment run` takes it."""
        return f"{self.flow}/{self.name}"


V1_FAMILY = variant_range("efficientnet_b0", "efficientnet_b7")  # the published B0-B7 (B8 is not in the paper)
V2_FAMILY = variant_range("efficientnet_v2_s", "efficientnet_v2_l")  # the paper's S/M/L (XL needs ImageNet-21k)

# The demo's staging, as `make demo` stages it (its archives plant one undecodable file among a few hundred).
DEMO_STAGING: dict[str, Any] = {"tiers": [64, 96, 128], "shard_size": 64, "minival": 0.2, "max_bad_fraction": 0.05}

DEPLOYMENTS = (
    DeploymentSpec("train-family", "b0-b7", {"variants": V1_FAMILY, "recipe": "v1"},
                   description="EfficientNet B0-B7, V1 paper recipe, on the latest staged ImageNet"),
    DeploymentSpec("train-family", "v2-s-m-l", {"variants": V2_FAMILY, "recipe": "v2-progressive"},
                   description="EfficientNetV2 S/M/L, progressive learning, on the latest staged ImageNet"),
    DeploymentSpec("train-family", "demo", {"variants": list(DEMO_FAMILY), "recipe": "demo"},
                   description="Two tiny compound-scaled members on the latest staged dataset (CPU)"),
    DeploymentSpec("stage-imagenet", "ilsvrc2012", {}, description="Stage ILSVRC2012: pass source and out"),
    DeploymentSpec("nightly", "default", {"variants": V1_FAMILY, "recipe": "v1", "mode": "finetune"}, nightly=True,
                   one_at_a_time=True,
                   description="Every night: stage the images added to the source, fine-tune B0-B7's champions on "
                               "them, promote on minival"),
    DeploymentSpec("search-scaling", "default", {},
                   description="Compound scaling's step 1: grid search of alpha, beta, gamma at phi = 1 (defaults: "
                               "the demo's baseline and grid; pass baseline, recipe, grid for ImageNet)"),
    DeploymentSpec("scaling-study", "default", {},
                   description="Width, depth, resolution and compound scaling at equal FLOPs, side by side "
                               "(defaults: demo size)"),
    DeploymentSpec("search-baseline", "default", {},
                   description="The baseline search at proxy scale (V1 space around B0, random search; defaults: "
                               "the demo's), the best table stored as a named baseline"),
    DeploymentSpec("transfer", "v2-paper", {"family": V2_FAMILY, "recipe": "finetune"},
                   description="Transfer as the V2 paper runs it: V2-S/M/L's champions fine-tuned onto each dataset "
                               "version given (pass datasets), each registered as <variant>-<dataset>; the transfer "
                               "table on the parent MLflow run and as the run's artifact"),
    DeploymentSpec("nightly", "demo", {"variants": list(DEMO_FAMILY), "recipe": "demo", "mode": "finetune",
                                       "staging": DEMO_STAGING, "finetune_epochs": 2}, one_at_a_time=True,
                   description="The nightly of the demo family: pass source (make demo writes one to the data "
                               "directory's demo-imagenet)"),
)


def select_specs(names: list[str] | None = None) -> list[DeploymentSpec]:
    """The specs named 'flow/name' (all when none are named); ValueError for a name not in the list."""
    known = {spec.full_name: spec for spec in DEPLOYMENTS}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown deployment {', '.join(unknown)}; known: {', '.join(known)}")
    return [spec for spec in DEPLOYMENTS if not names or spec.full_name in names]


def flow_file(flow: Any) -> Path:
    """The file that defines a flow's function (under its decorators, `failures.one_line_failures` among them)."""
    return Path(inspect.getfile(inspect.unwrap(flow.fn))).resolve()


def entrypoint(flow: Any) -> str:
    """`file.py:function` of a flow, relative to the checkout: what a worker imports after changing to it."""
    return f"{flow_file(flow).relative_to(PROJECT_ROOT).as_posix()}:{flow.fn.__name__}"


def nightly_timezone(timezone: str | None = None) -> str:
    """The nightly schedule's timezone: `timezone`, else $EFFNET_NIGHTLY_TIMEZONE, else UTC; ValueError for a name
    that is not in the IANA database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = timezone or os.environ.get(TIMEZONE_ENV) or TIMEZONE
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}: give an IANA name such as UTC or Europe/Berlin") from None
    return name


def deployable_flows() -> dict[str, Any]:
    """The flows deployments run, by name (the name `prefect deployment run` takes before the slash)."""
    from flows.nightly import nightly
    from flows.scaling import scaling_study, search_scaling
    from flows.search_baseline import search_baseline
    from flows.stage_imagenet import stage_imagenet
    from flows.train_family import train_family
    from flows.transfer import transfer

    flows = (train_family, stage_imagenet, nightly, search_scaling, scaling_study, search_baseline, transfer)
    return {f.name: f for f in flows}


def build_deployments(names: list[str] | None = None, source: Path | None = None,
                      timezone: str | None = None) -> list[Any]:
    """Prefect RunnerDeployments for the specs (all, or those named 'flow/name'); the nightly's cron in
    `timezone` (see `nightly_timezone`).

    With `source` (a checkout), each flow is loaded from its file there, so that the deployment carries a pull
    step (`set_working_directory`) and a work pool's worker can run it.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron
    from prefect.utilities.hashing import file_hash

    tz = nightly_timezone(timezone)
    flows = deployable_flows()
    out = []
    for spec in select_specs(names):
        flow = flows[spec.flow]
        if source is not None:
            flow = flow.from_source(source=str(source), entrypoint=entrypoint(flow))
        # The version Prefect would give: a hash of the flow's file (its own guess would hash the decorator's file).
        kwargs: dict[str, Any] = {"name": spec.name, "parameters": spec.parameters, "description": spec.description,
                                  "version": file_hash(str(flow_file(flow)))}
        if spec.nightly:
            kwargs["schedule"] = Cron(NIGHTLY_CRON, timezone=tz)
        if spec.one_at_a_time:
            # CANCEL_NEW, not ENQUEUE: nights that each outlast a day would otherwise queue up without end; the
            # next night stages everything added since anyway.
            kwargs["concurrency_limit"] = ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
        out.append(flow.to_deployment(**kwargs))
    return out


def deploy_all(work_pool_name: str, names: list[str] | None = None, timezone: str | None = None) -> list[UUID]:
    """Register the deployments on a `process` work pool, their code in this checkout; their ids.

    ValueError when the pool does not exist or a deployment is refused (Prefect prints which, and why).
    """
    from prefect import deploy

    deployments = build_deployments(names, source=PROJECT_ROOT, timezone=timezone)
    # build/push False: the code is already where the worker runs it; there is no image.
    # `deploy` is sync here (no running event loop): its result is the list, never the coroutine.
    ids = cast(list[UUID], deploy(*deployments, work_pool_name=work_pool_name, build=False, push=False,
                                  print_next_steps_message=False, ignore_warnings=True))
    if len(ids) != len(deployments):
        raise ValueError(f"{len(deployments) - len(ids)} of {len(deployments)} deployments were refused by the "
                         "Prefect server (see the table above)")
    return ids


def serve_all(names: list[str] | None = None, timezone: str | None = None) -> None:
    from prefect import serve

    # pause_on_shutdown=False: stopping the server process must not silently pause the nightly schedule.
    serve(*build_deployments(names, timezone=timezone), pause_on_shutdown=False)


if __name__ == "__main__":
    serve_all()
