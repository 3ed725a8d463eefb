"""Deployments of the flows, and the nightly schedule.

`effnet serve` (or `python -m flows.deployments`) registers them with the Prefect server named by
PREFECT_API_URL and polls for their runs, so `prefect deployment run train-family/b0-b7` starts the B0-B7
family. On a multi-node stack use a `process` work pool instead (see infra/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models import variant_range

NIGHTLY_CRON = "0 2 * * *"
TIMEZONE = "UTC"  # stored explicitly: a schedule without one is ambiguous on the server


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # "train-family" or "stage-imagenet"
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    nightly: bool = False
    description: str = ""


# Two compound-scaled members far below B0 (phi < 0 shrinks depth, width and resolution together) so the
# family trains on two CPU cores in minutes; resolutions come out near the demo tiers.
DEMO_FAMILY = ("phi=-9", "phi=-7")
V1_FAMILY = variant_range("efficientnet_b0", "efficientnet_b7")  # the published B0-B7 (B8 is not in the paper)

DEPLOYMENTS = (
    DeploymentSpec("train-family", "b0-b7", {"variants": V1_FAMILY, "recipe": "v1"}, nightly=True,
                   description="EfficientNet B0-B7, V1 paper recipe, on the latest staged ImageNet"),
    DeploymentSpec("train-family", "demo", {"variants": list(DEMO_FAMILY), "recipe": "demo"},
                   description="Two tiny compound-scaled members on the latest staged dataset (CPU)"),
    DeploymentSpec("stage-imagenet", "ilsvrc2012", {}, description="Stage ILSVRC2012: pass source and out"),
)


def build_deployments(names: list[str] | None = None) -> list[Any]:
    """Prefect RunnerDeployments for the specs (all, or those named 'flow/name')."""
    from flows.stage_imagenet import stage_imagenet
    from flows.train_family import train_family

    flows = {"train-family": train_family, "stage-imagenet": stage_imagenet}
    out = []
    for spec in DEPLOYMENTS:
        if names and f"{spec.flow}/{spec.name}" not in names:
            continue
        kwargs: dict[str, Any] = {"name": spec.name, "parameters": spec.parameters, "description": spec.description}
        if spec.nightly:
            from prefect.schedules import Cron

            kwargs["schedule"] = Cron(NIGHTLY_CRON, timezone=TIMEZONE)
        out.append(flows[spec.flow].to_deployment(**kwargs))
    return out


def serve_all(names: list[str] | None = None) -> None:
    from prefect import serve

    # pause_on_shutdown=False: stopping the server process must not silently pause the nightly schedule.
    serve(*build_deployments(names), pause_on_shutdown=False)


if __name__ == "__main__":
    serve_all()
