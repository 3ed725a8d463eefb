"""The Ray cluster a job runs on: joining it (or starting a local one), and checking a job fits before it starts.

Ray Train waits for resources that never come (an 8-GPU recipe on a CPU machine retries its worker group without
limit), so every job's request is compared with the cluster's nodes first and refused in one line.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pipelines.settings import RAY_LOOPBACK_ENV, TRACKING_URI_ENV, DataLayout
from pipelines.training.recipe import Recipe

Resources = Mapping[str, float]
# The resources a recipe asks for, the only ones messages show (Ray also lists memory, object store, node:<ip>).
_SHOWN = ("CPU", "GPU")


class ClusterError(ValueError):
    """The cluster cannot run the job as asked."""


def worker_resources(recipe: Recipe) -> dict[str, float]:
    """What one Ray Train worker of this recipe asks for."""
    return {"CPU": float(recipe.ray.cpus_per_worker), **({"GPU": 1.0} if recipe.ray.use_gpu else {})}


def _describe(resources: Resources) -> str:
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in _SHOWN if resources.get(k)) + "}"


def unmet_request(workers: int, per_worker: Resources, nodes: Sequence[Resources]) -> str | None:
    """Why `workers` bundles of `per_worker` cannot all be placed on `nodes` (total resources of each alive
    node), or None when they can. Placement is first-fit, as Ray's SPREAD/PACK strategies both need every
    bundle whole on one node."""
    free = [dict(n) for n in nodes]
    placed = 0
    for _ in range(workers):
        for node in free:
            if all(node.get(k, 0.0) >= v for k, v in per_worker.items()):
                for k, v in per_worker.items():
                    node[k] = node.get(k, 0.0) - v
                placed += 1
                break
        else:
            break
    if placed == workers:
        return None
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in _SHOWN}
    missing = [k for k, v in per_worker.items() if v * workers > totals.get(k, 0.0)] or [
        f"room on one node for a whole worker ({_describe(per_worker)})"
    ]
    return (
        f"the job asks for {workers} workers x {_describe(per_worker)}, the cluster has {len(nodes)} "
        f"node(s) with {_describe(totals)} in all (per node: {', '.join(_describe(n) for n in nodes)}); "
        f"missing: {', '.join(missing)}. Lower ray.num_workers / ray.cpus_per_worker, set ray.use_gpu: false, "
        "or add nodes"
    )


def alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_fits(recipe: Recipe) -> None:
    """Raise ClusterError unless the connected cluster can hold the recipe's workers (val runs after training,
    in one worker's resources, so it needs nothing more)."""
    problem = unmet_request(recipe.ray.num_workers, worker_resources(recipe), alive_node_resources())
    if problem:
        raise ClusterError(problem)


def connect(address: str | None, env: Mapping[str, str] | None = None) -> Any:
    """Join the cluster at `address`, or start a local instance bound to 127.0.0.1 when it is None.

    Explicit: ray.init() without an address would join whatever cluster `ray start` last left on this machine.
    """
    local = address is None or address == "local"
    if local:
        # Read by Ray when it is first imported: `effnet` sets it at start (settings.use_stack); this covers
        # callers of the Python API that have not imported ray yet.
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return None
    runtime_env = {"env_vars": dict(env)} if env else None
    with _keep_sigterm_handler():
        if local:
            return init_local(log_to_driver=True, runtime_env=runtime_env)
        return ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)


def connect_layout(layout: DataLayout) -> Any:
    """Join the data directory's Ray cluster (`connect`), its jobs and workers told the data directory's MLflow
    server."""
    return connect(layout.ray_address, env={TRACKING_URI_ENV: layout.tracking_uri})


def init_local(**init_args: Any) -> Any:
    """ray.init of a new local instance of our own: dashboard (and its Jobs API) on 127.0.0.1, its job agent on
    a free port.

    Ray gives every new instance's dashboard agent the same port (52365), and ray.init has no argument for it: a
    second instance on the machine (the stack's head, another local job, a test run) then has no agent, and its
    Jobs API answers nothing. NOTE: private API of Ray 2.60: ray.init builds its node's `RayParams` from
    `ray._private.parameter` at call time, so a subclass with another default is swapped in for the call.
    """
    import ray
    import ray._private.parameter as parameter

    original = parameter.RayParams
    port = _free_port()

    class _ParamsWithFreeAgentPort(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, dashboard_agent_listen_port: int | None = port, **kwargs: Any):
            super().__init__(*args, dashboard_agent_listen_port=dashboard_agent_listen_port, **kwargs)

    parameter.RayParams = _ParamsWithFreeAgentPort  # type: ignore[misc]  # the swap the docstring describes
    try:
        return ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **init_args)
    finally:
        parameter.RayParams = original  # type: ignore[misc]


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """A Ray driver replaces the SIGTERM handler with sys.exit. Where one was installed before (Prefect's, which
    turns the runner's SIGTERM into a cancellation), keep it: under Ray's, a cancelled flow run ends Crashed."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)
