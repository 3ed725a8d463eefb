"""The product as users run it, on the real servers: `make up` (`infra/local-stack.sh start`: Prefect
server, MLflow server, Ray head, the `effnet` process work pool and its worker, the deployments deployed to it),
staging through the stack, `prefect deployment run train-family/demo` through the Prefect client, run by the
pool's worker, registered models checked on the MLflow server, the MLflow and Prefect UIs in a headless browser,
a nightly with nothing new, bad input failing the run at once, the scheduler
creating runs, a cancelled run, then `make down` while a run trains: no process left (the worker's flow runs, which
have sessions of their own, included), nothing listening outside loopback, and the data directory usable
without it.

The tests run in file order and share one stack (module fixture); the last one stops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from helpers import browse
from mlflow.tracking import MlflowClient

from pipelines.registry.tracking import EXPERIMENT, Tags
from pipelines.settings import PROJECT_ROOT, RAY_LOOPBACK_ENV, DataLayout

STACK = PROJECT_ROOT / "infra" / "local-stack.sh"
EFFNET = PROJECT_ROOT / ".venv" / "bin" / "effnet"
SERVICES = ("prefect", "mlflow", "ray", "worker")
WORK_POOL = "effnet"
EPOCHS = 2
# How the demo source is staged through the stack (`effnet stage`), and so what the nightly's staging repeats.
STAGED = {"tiers": [64, 96], "minival": 0.25, "max_bad_fraction": 0.1, "shard_size": 32}
FAMILY_RUN: dict[str, Any] = {}  # the deployment run's flow run and MLflow runs, for the UI test after it
# One member that would train for long: what cancel and stop interrupt.
LONG_RUN = {"variants": ["phi=-9"], "overrides": {"schedule": {"epochs": 200, "patience": None}}}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Stack:
    def __init__(self, root: Path):
        self.root = root
        ports = dict(zip(("PREFECT", "MLFLOW", "RAY", "RAY_DASHBOARD", "RAY_CLIENT", "RAY_AGENT"), _free_ports(6)))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}  # the user's shell, not the test's servers
        self.env.update({f"EFFNET_{k}_PORT": str(v) for k, v in ports.items()})
        self.env.update(EFFNET_DATA_DIR=str(root),
                        # The scheduler's loop (60 s by default) shortened so that a test sees it run.
                        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
        self.prefect_api = f"http://127.0.0.1:{ports['PREFECT']}/api"
        self.mlflow_uri = f"http://127.0.0.1:{ports['MLFLOW']}"

    def script(self, action: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(STACK), action], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def make(self, target: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`make up` / `make status` / `make down`, as the README has users run them (setup is a no-op here)."""
        return subprocess.run(["make", "-s", "-C", str(PROJECT_ROOT), target], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def effnet(self, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(EFFNET), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)

    def service_pids(self) -> set[int]:
        """Every process of the stack: each service and all its descendants."""
        pids: set[int] = set()
        for name in SERVICES:
            pidfile = self.root / "run" / f"{name}.pid"
            if not pidfile.exists():
                continue
            try:
                proc = psutil.Process(int(pidfile.read_text()))
                pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return pids

    def prefect(self, fn: Any) -> Any:
        """Run `fn(client)` against the stack's Prefect server."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def go():
            with temporary_settings({PREFECT_API_URL: self.prefect_api}):
                async with get_client() as client:
                    return await fn(client)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack") / "data")
    started = s.make("up")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield s
    finally:
        s.script("stop")


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _wait_final(stack: Stack, flow_run_id: Any, timeout: float) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = stack.prefect(lambda c: c.read_flow_run(flow_run_id))
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished within {timeout} s (state {run.state})")


def _run_deployment(stack: Stack, name: str, parameters: dict) -> Any:
    async def create(client):
        deployment = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    return stack.prefect(create)


def _wait_state(stack: Stack, flow_run_id: Any, state: str, timeout: float) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = stack.prefect(lambda c: c.read_flow_run(flow_run_id))
        if run.state is not None and run.state.type.value == state:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not {state} within {timeout} s (state {run.state})")


def _artifacts_of(flow_run_id: Any) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))


def _of_run(flow_run_id: Any) -> Any:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))


def _mlflow_runs_of(stack: Stack, flow_run_id: Any, kind: str | None = None) -> list:
    """The MLflow runs a flow run made: its members' jobs, or (kind "family") the family's parent run."""
    c = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = [] if exp is None else c.search_runs([exp.experiment_id],
                                                filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    return [r for r in runs if r.data.tags.get("run_kind") == kind]


def test_start_is_honest_and_binds_loopback_only(stack: Stack):
    status = stack.make("status")
    assert status.returncode == 0, status.stdout
    for name in SERVICES:
        assert f"{name}: running" in status.stdout, status.stdout
    assert f"deployments: on work pool {WORK_POOL}" in status.stdout, status.stdout
    again = stack.make("up")  # a second start says what runs and changes nothing
    assert again.returncode == 0, again.stderr
    assert all(f"{name}: already running" in again.stdout for name in SERVICES), again.stdout
    assert f"deployments: already on work pool {WORK_POOL}" in again.stdout, again.stdout

    # Every deployment of the one list is on the pool, its code in this checkout (no image, nothing pushed).
    from flows.deployments import DEPLOYMENTS, entrypoint
    from flows.train_family import train_family

    async def deployments(client):
        return [await client.read_deployment_by_name(spec.full_name) for spec in DEPLOYMENTS]

    for d in stack.prefect(deployments):
        assert d.work_pool_name == WORK_POOL, (d.name, d.work_pool_name)
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}]
    demo = next(d for d in stack.prefect(deployments) if d.name == "demo")
    assert demo.entrypoint == entrypoint(train_family) == "flows/train_family.py:train_family"
    settings = json.loads((stack.root / "stack.json").read_text())
    assert settings["mlflow_tracking_uri"] == stack.mlflow_uri and settings["prefect_api_url"] == stack.prefect_api

    listeners = _listeners(stack.service_pids())
    assert len(listeners) >= 6, listeners  # Prefect, MLflow, Ray's GCS, raylet, dashboard, agents
    outside = [entry for entry in listeners if not _loopback(entry[0])]
    assert not outside, f"listening beyond loopback: {outside}"


def test_deployment_run_trains_and_registers_on_the_servers(stack: Stack):
    archives = stack.root / "demo-imagenet"
    made = stack.effnet("demo-data", str(archives), "--classes", "4", "--train-per-class", "16",
                        "--val-per-class", "4")
    assert made.returncode == 0, made.stderr
    staged = stack.effnet("stage", "--source", str(archives), "--out", str(stack.root / "datasets"),
                          "--tiers", *map(str, STAGED["tiers"]), "--minival", str(STAGED["minival"]),
                          "--max-bad-fraction", str(STAGED["max_bad_fraction"]),
                          "--shard-size", str(STAGED["shard_size"]), "--no-progress")
    assert staged.returncode == 0, staged.stderr[-3000:]
    # Staged through the stack's Prefect server, not a temporary one.
    flows = stack.prefect(lambda c: c.read_flows())
    assert "stage-imagenet" in {f.name for f in flows}

    t0 = time.time()
    flow_run = _run_deployment(stack, "train-family/demo", {"overrides": {"schedule": {"epochs": EPOCHS}}})
    finished = _wait_final(stack, flow_run.id, timeout=900)
    assert finished.state.is_completed(), f"{finished.state.type}: {finished.state.message}"
    assert finished.work_pool_name == WORK_POOL and finished.infrastructure_pid, finished  # the worker ran it

    c = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    runs = _mlflow_runs_of(stack, flow_run.id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # Nested under the family's run on the server, which holds the comparison.
    [parent] = _mlflow_runs_of(stack, flow_run.id, kind="family")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "comparison")} >= {"comparison/comparison.png"}
    for run in runs:
        name = "efficientnet-" + run.data.tags["variant"].removeprefix("efficientnet_").replace("_", "-")
        versions = c.search_model_versions(f"name='{name}'")
        assert len(versions) == 1, versions
        mv = versions[0]
        assert mv.run_id == run.info.run_id and mv.status == "READY"
        assert set(c.get_model_version(name, mv.version).aliases) == {"candidate", "champion"}
        assert c.get_model_version_by_alias(name, "champion").version == mv.version
        # Registered from the run's logged model (MLflow 3: source models:/<model id>), which the server holds.
        assert mv.source.startswith("models:/m-"), mv.source
        assert c.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == run.info.run_id
    first_step = min(float(r.data.tags["first_step_unix"]) for r in runs)
    flow_start = finished.start_time.timestamp()
    job_start = min(r.info.start_time / 1000 for r in runs)  # the Ray job's driver created its MLflow run
    print(f"\nprefect deployment run -> first training step: {first_step - t0:.1f} s (flow run started "
          f"{flow_start - t0:.1f} s, a driver's MLflow run {job_start - t0:.1f} s)")
    spans = sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in runs)
    overlap = spans[0][1] - spans[1][0]
    print("members " + ", ".join(f"{a - t0:.0f}-{b - t0:.0f} s" for a, b in spans)
          + (f": overlapping {overlap:.0f} s" if overlap > 0 else ": one after the other"))

    # One progress line per epoch per variant in the Prefect run's log.
    logs = stack.prefect(lambda c: c.read_logs(_of_run(flow_run.id)))
    lines = [log.message for log in logs]
    for variant in ("efficientnet_b0_phi-9", "efficientnet_b0_phi-7"):
        for epoch in range(1, EPOCHS + 1):
            assert sum(line.startswith(f"{variant} epoch {epoch}/{EPOCHS}") for line in lines) == 1, lines
    FAMILY_RUN["flow_run_id"], FAMILY_RUN["parent"] = flow_run.id, parent
    FAMILY_RUN["members"] = [r.info.run_name for r in runs]


def test_the_uis_show_the_family(stack: Stack):
    """What a user opens after the run, in a real browser: the MLflow UI's family run with its nested runs and
    the comparison plot, and the Prefect UI's summary artifact of the flow run (screenshots under ui/)."""
    if not FAMILY_RUN:
        pytest.skip("needs the deployment run of test_deployment_run_trains_and_registers_on_the_servers")
    shots = stack.root.parent / "ui"
    shots.mkdir(exist_ok=True)
    parent = FAMILY_RUN["parent"]
    run_page = f"{stack.mlflow_uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    dom = browse(run_page, shots / "mlflow-family-run.png")
    assert parent.info.run_name in dom and "Child runs" in dom, dom[-3000:]
    assert all(name in dom for name in FAMILY_RUN["members"]), (FAMILY_RUN["members"], dom[-3000:])
    dom = browse(f"{run_page}/artifacts/comparison/comparison.png", shots / "mlflow-comparison.png")
    assert "comparison/comparison.png" in dom and "<img" in dom, dom[-3000:]

    artifacts = stack.prefect(lambda c: c.read_artifacts(artifact_filter=_artifacts_of(FAMILY_RUN["flow_run_id"])))
    [summary] = [a for a in artifacts if a.key == "family-summary"]
    prefect_ui = stack.prefect_api.removesuffix("/api")
    dom = browse(f"{prefect_ui}/artifacts/artifact/{summary.id}", shots / "prefect-family-summary.png")
    assert "family-summary" in dom and all(f">{v}<" in dom for v in ("efficientnet_b0_phi-9",
                                                                      "efficientnet_b0_phi-7")), dom[-3000:]
    print("\nscreenshots: " + ", ".join(str(p) for p in sorted(shots.glob("*.png"))))


def test_a_nightly_with_nothing_new_says_so(stack: Stack):
    """`nightly/demo` on the source the family was just trained from: staged already (the same parameters), every
    member has a version on it: the run ends Completed saying there is nothing to do, having trained nothing."""
    flow_run = _run_deployment(stack, "nightly/demo", {"source": str(stack.root / "demo-imagenet"),
                                                       "staging": STAGED})
    finished = _wait_final(stack, flow_run.id, timeout=300)
    assert finished.state.is_completed() and "nothing to do" in (finished.state.message or ""), finished.state
    assert finished.work_pool_name == WORK_POOL
    assert not _mlflow_runs_of(stack, flow_run.id, kind="family")


def test_a_scaling_search_runs_on_the_stack(stack: Stack):
    """`search-scaling/default` on the pool, two grid points for time: its trials run as Ray Tune trials on the
    stack's Ray head, each a nested run on the MLflow server, and the winner is stored in the data directory."""
    flow_run = _run_deployment(stack, "search-scaling/default", {
        "alphas": [1.1, 1.2], "betas": [1.1], "gammas": [1.2], "epochs": 2, "grace_period": 1,
        "set_name": "stack-search"})
    finished = _wait_final(stack, flow_run.id, timeout=300)
    assert finished.state.is_completed(), finished.state
    (parent,) = _mlflow_runs_of(stack, flow_run.id, kind="scaling-search")
    assert parent.info.status == "FINISHED" and parent.data.tags["coefficients.name"] == "stack-search"
    stored = json.loads((stack.root / "coefficients" / "stack-search.json").read_text())
    assert stored["source"]["search_run"] == parent.info.run_id
    assert (stored["alpha"], stored["beta"], stored["gamma"]) in {(1.1, 1.1, 1.2), (1.2, 1.1, 1.2)}
    c = MlflowClient(tracking_uri=stack.mlflow_uri)
    trials = c.search_runs([parent.info.experiment_id], filter_string=f"tags.{Tags.PARENT_RUN} = "
                                                                      f"'{parent.info.run_id}'")
    assert len(trials) == 2 and all(c.get_metric_history(t.info.run_id, "minival_top1") for t in trials)


def test_bad_input_fails_the_run_at_once_or_is_refused(stack: Stack):
    # An unknown variant: the worker's run fails before anything trains, the reason in one line.
    flow_run = _run_deployment(stack, "train-family/demo", {"variants": ["phi=-9", "efficientnet_b99"]})
    finished = _wait_final(stack, flow_run.id, timeout=180)
    assert finished.state.is_failed(), finished.state
    message = finished.state.message or ""
    assert "unknown model 'efficientnet_b99'" in message and "\n" not in message, message
    assert not _mlflow_runs_of(stack, flow_run.id) and not _mlflow_runs_of(stack, flow_run.id, "family")  # nothing
    # The run's log says why in one line, and holds no traceback (the engine's re-raise of it is not logged).
    # Its process sends its last lines as it exits, the engine's report of the exception among them.
    logs: list[str] = []
    deadline = time.time() + 30
    while not any("Finished in state Failed" in line for line in logs) and time.time() < deadline:
        time.sleep(2)
        logs = [log.message for log in stack.prefect(lambda c: c.read_logs(_of_run(flow_run.id)))]
    assert logs.count(message) == 1, logs
    assert not [line for line in logs if "Traceback" in line or "unexpected exception" in line], logs

    # A wrongly typed parameter (a string for the list of variants): the server's schema refuses the run, as the
    # UI's form does.
    from prefect.exceptions import PrefectHTTPStatusError

    with pytest.raises(PrefectHTTPStatusError, match="variants"):
        _run_deployment(stack, "train-family/demo", {"variants": "phi=-9"})


def test_scheduler_creates_runs(stack: Stack):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.train_family import train_family

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}):
        deployment_id = train_family.to_deployment(
            name="every-minute", parameters={"variants": ["phi=-9"], "recipe": "demo"},
            schedule=CronSchedule(cron="* * * * *", timezone="UTC"), paused=True,
        ).apply()

    async def unpause(client):
        await client.resume_deployment(deployment_id)  # on no work pool: no worker runs what it schedules

    stack.prefect(unpause)
    scheduled: list = []
    deadline = time.time() + 120
    while not scheduled and time.time() < deadline:
        scheduled = stack.prefect(lambda c: c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED])))))
        time.sleep(3)
    stack.prefect(lambda c: c.delete_deployment(deployment_id))
    assert scheduled, "the Prefect server's scheduler created no run for a deployment due every minute"
    # The next one is due within the minute (the scheduler also plans runs further ahead).
    assert min(r.expected_start_time.timestamp() for r in scheduled) - time.time() < 90

    async def nightly(client):
        d = await client.read_deployment_by_name("nightly/default")
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))

    upcoming = stack.prefect(nightly)
    assert upcoming and all(r.expected_start_time.hour == 2 for r in upcoming), upcoming


def _marker_for(root: Path, run_id: str) -> dict:
    for path in (root / "ray" / "jobs").glob("*.json"):
        marker = json.loads(path.read_text())
        if marker["run_id"] == run_id:
            return marker
    raise AssertionError(f"no job marker for run {run_id}")


def _idle(ray_status: str) -> bool:
    """`ray status` of a cluster with nothing in use, no autoscaler request and no pending demand."""
    return (" 0.0/" in ray_status and "From request_resources:\n (none)" in ray_status
            and "(no resource demands)" in ray_status)


def test_cancelled_run_is_killed_everywhere(stack: Stack):
    from prefect.states import Cancelling

    t0 = time.time()
    flow_run = _run_deployment(stack, "train-family/demo", LONG_RUN)
    c = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    run = None
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = _mlflow_runs_of(stack, flow_run.id)
        if runs and c.get_metric_history(runs[0].info.run_id, "train_loss"):
            run = runs[0]
            break
        time.sleep(2)
    assert run is not None, "training did not start"
    first_step = float(c.get_run(run.info.run_id).data.tags["first_step_unix"])
    print(f"\nprefect deployment run -> first training step (second run): {first_step - t0:.1f} s")

    stack.prefect(lambda client: client.set_flow_run_state(flow_run.id, Cancelling(), force=True))
    finished = _wait_final(stack, flow_run.id, timeout=180)
    # Cancelled; or Crashed when the flow's process did not acknowledge the worker's cancel intent within
    # Prefect's 1 s (a loaded machine): the worker then terminates it the crash way. The job's own record
    # below is the same either way.
    assert finished.state.is_cancelled() or finished.state.is_crashed(), finished.state
    # The worker sets Cancelled as it signals the flow's process; the job records itself a moment later.
    deadline = time.time() + 30
    while c.get_run(run.info.run_id).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(1)
    assert c.get_run(run.info.run_id).info.status == "KILLED"
    assert _marker_for(stack.root, run.info.run_id)["status"] == "killed"

    # The cluster gets its resources back and keeps no resource request of the job.
    env = {**stack.env, "RAY_AUTH_MODE": "token", RAY_LOOPBACK_ENV: "0"}  # as the stack's own clients have it
    address = json.loads((stack.root / "stack.json").read_text())["ray_address"]
    deadline, status = time.time() + 60, ""
    while time.time() < deadline:
        status = subprocess.run([str(PROJECT_ROOT / ".venv/bin/ray"), "status", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60).stdout
        if " 0.0/" in status and "(no resource demands)" in status:
            break
        time.sleep(3)
    assert " 0.0/" in status and "(no resource demands)" in status, status


def test_stop_leaves_nothing_and_the_data_dir_works_without_the_stack(stack: Stack):
    # A run in flight: the worker starts it in a session of its own, which stop must reach too.
    flow_run = _wait_state(stack, _run_deployment(stack, "train-family/demo", LONG_RUN).id, "RUNNING", timeout=180)
    pids, run_pid = stack.service_pids(), int(flow_run.infrastructure_pid)
    assert run_pid in pids, (run_pid, pids)
    assert os.getsid(run_pid) != os.getsid(int((stack.root / "run" / "worker.pid").read_text()))
    outside = [entry for entry in _listeners(pids) if not _loopback(entry[0])]
    assert not outside, f"listening beyond loopback while a run trains: {outside}"
    stopped = stack.make("down")
    assert stopped.returncode == 0, stopped.stderr
    gone = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)[1]
    assert not gone, f"still alive after stop: {[(p.pid, p.name()) for p in gone]}"
    assert not (stack.root / "stack.json").exists()
    status = stack.make("status")
    assert status.returncode != 0 and all(f"{n}: stopped" in status.stdout for n in SERVICES), status.stdout

    # Without the stack: the same data directory, the SQLite store and a local Ray (one epoch of one variant).
    env = {k: v for k, v in stack.env.items() if not k.startswith("EFFNET_") or k == "EFFNET_DATA_DIR"}
    version = (stack.root / "datasets" / "LATEST").read_text().strip()
    trained = stack.effnet("train", "--variant", "phi=-9", "--recipe", "demo", "--epochs", "1",
                           "--data", str(stack.root / "datasets" / version), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads(trained.stdout)
    # The store the data directory holds (this process's MLFLOW_TRACKING_URI may name another test's store).
    local = f"sqlite:///{DataLayout(stack.root).mlflow_db}"
    c = MlflowClient(tracking_uri=local, registry_uri=local)
    # The stack's version 1 and this one, in the one registry.
    assert result["version"] == "2"
    assert c.get_model_version("efficientnet-b0-phi-9", "2").run_id == result["run_id"]
    assert c.get_model_version("efficientnet-b0-phi-9", "1").run_id != result["run_id"]
