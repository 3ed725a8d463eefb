"""Training jobs as Ray jobs: each job's driver (`effnet train`) runs on the cluster through the Ray Jobs API, so
it outlives the process that submitted it, and several jobs train side by side as far as the cluster's resources
allow (Ray schedules their workers; a job that does not fit yet waits).

A job is found again by its key (`job_key_for`: variant, recipe hash, dataset version), which each Ray job carries
in its metadata. `train_on_cluster` reattaches to a pending or running job of the key rather than start a second
driver, takes the result of one that succeeded for the same flow run, and otherwise submits the next attempt
(`submission_id`); inside it, `run_training` resumes the key's unfinished job from its checkpoints. The driver
writes its TrainResult to a file under the data directory (`result_path`, on the storage every node shares),
read back once the Ray job has succeeded. While it waits, the job's log lines go to the caller as they come.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipelines.atomic import atomic_write_bytes
from pipelines.registry import tracking
from pipelines.registry.tracking import Tags
from pipelines.settings import DATA_DIR_ENV, RAY_AUTH_ENV, RAY_LOOPBACK_ENV, TRACKING_URI_ENV, DataLayout
from pipelines.training import cluster
from pipelines.training.job import TrainResult, job_key_for
from pipelines.training.recipe import Recipe, load_recipe

# The Ray job's metadata keys: the same names as the MLflow run's tags.
KEY_FIELD, FLOW_RUN_FIELD = Tags.JOB_KEY, Tags.FLOW_RUN
# What a cancelled job's driver gets between SIGTERM and SIGKILL (Ray's default: 3 s): time for `run_training` to
# record its run killed and withdraw its workers (it waits up to 25 s for Ray Train's controller).
STOP_GRACE_S = 60
# A new cluster's job agent registers a few seconds after ray.init returns; one that never does failed to start.
AGENT_WAIT_S = 60
POLL_S = 2.0
UNREACHABLE_S = 120
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray's terminal colours around its workers' log prefixes
_new_store = threading.Lock()


class JobFailed(RuntimeError):
    """A Ray training job that ended FAILED or STOPPED, succeeded without a result, or could not be followed."""


def submission_id(key: str, flow_run_id: str, attempt: int) -> str:
    """The Ray job id of one attempt at a job for one flow run: the same inputs always name the same Ray job, so
    two callers that race to submit it collide (Ray refuses the second) instead of starting two drivers."""
    return f"{key}__{flow_run_id}__{attempt}"


def next_attempt(taken: Iterable[str], key: str, flow_run_id: str) -> int:
    """The first attempt number whose submission id no Ray job has yet."""
    taken, attempt = set(taken), 1
    while submission_id(key, flow_run_id, attempt) in taken:
        attempt += 1
    return attempt


def submissions_dir(layout: DataLayout, key: str) -> Path:
    return layout.ray_storage / "submissions" / key


def result_path(layout: DataLayout, key: str, sid: str) -> Path:
    """Where the driver of Ray job `sid` writes its TrainResult: one file per attempt, never an older one's."""
    return submissions_dir(layout, key) / f"{sid}.result.json"


def write_recipe(layout: DataLayout, key: str, recipe: Recipe) -> Path:
    """The resolved recipe as the YAML file the driver loads. The key holds the recipe's hash, so one file per key;
    it must load back as the same recipe, or the driver would train (and resume) another job."""
    path = submissions_dir(layout, key) / "recipe.yaml"
    atomic_write_bytes(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).encode())
    if load_recipe(path) != recipe:
        raise ValueError(f"{path}: the recipe does not load back as written")
    return path


def job_environment(layout: DataLayout) -> dict[str, str]:
    """The variables the driver needs (the runtime_env's env_vars, which its Ray workers get too)."""
    env = {
        TRACKING_URI_ENV: layout.tracking_uri,
        DATA_DIR_ENV: str(layout.root),
        # The driver's ray.init names MLFLOW_TRACKING_URI again (cluster.connect); Ray refuses a variable set by
        # both the job and its driver unless told that the driver's wins (here they are the same).
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
    }
    for name in (RAY_LOOPBACK_ENV, RAY_AUTH_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def entrypoint(
    layout: DataLayout,
    recipe_file: Path,
    dataset_dir: Path,
    result_file: Path,
    gcs_address: str,
    flow_run_id: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    # The cluster's address is given, not left to Ray's job supervisor: it names the cluster started last on the
    # head's machine (/tmp/ray/ray_current_cluster), which is another one where two clusters share a machine.
    all_tags = {Tags.FLOW_RUN: flow_run_id, **(tags or {})}
    return shlex.join(
        [
            sys.executable,
            "-m",
            "pipelines.training.driver",
            "--data-dir",
            str(layout.root),
            "--recipe",
            str(recipe_file),
            "--data",
            str(dataset_dir),
            "--ray-address",
            gcs_address,
            *(arg for k, v in all_tags.items() for arg in ("--tag", f"{k}={v}")),
            "--result-file",
            str(result_file),
        ]
    )


def jobs_api(layout: DataLayout) -> tuple[Any, str]:
    """(a Jobs API client, the GCS address) of the cluster this process is connected to (joined or started here
    first, as `run_training` does). Its dashboard is the one place its address comes from: the cluster's own
    record, for the stack's head and a local instance alike."""
    import ray
    from ray.job_submission import JobSubmissionClient

    cluster.connect_layout(layout)
    url = ray._private.worker.global_worker.node.address_info.get("webui_url")
    if not url:
        raise cluster.ClusterError(
            "the Ray cluster runs no dashboard, whose Jobs API runs the training jobs; "
            "start its head with --include-dashboard=true"
        )
    url = url if "://" in url else f"http://{url}"
    return JobSubmissionClient(url), ray.get_runtime_context().gcs_address


def prepare_tracking(layout: DataLayout) -> None:
    """Create the MLflow store and experiment before the first driver opens them: drivers that start together on
    a new SQLite store each create its tables, and all but one fail (`table ... already exists`). The lock does
    the same for callers in this process (the flow's task threads)."""
    with _new_store:
        tracking.experiment_id(tracking.client(layout.tracking_uri), layout.artifact_root)


def jobs_of(client: Any, key: str) -> list[Any]:
    """The Ray jobs submitted for one job key, oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(KEY_FIELD) == key]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def _is_active(job: Any) -> bool:
    return not job.status.is_terminal()


def train_on_cluster(
    recipe: Recipe,
    dataset_dir: str | Path,
    layout: DataLayout,
    flow_run_id: str,
    emit: Callable[[str], None] = print,
    poll_s: float = POLL_S,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Run one training job as a Ray job, wait for it to end, and return its result.

    A pending or running Ray job of the same key is waited on instead of a new one (a retry, or a rerun of the
    flow, while it still runs); one that succeeded for this flow run gives its result again. Raises JobFailed
    (one line: the Ray job, how it ended, the driver's last log line) when the job fails or is stopped.
    """
    dataset_dir = Path(dataset_dir).resolve()
    key = job_key_for(recipe, dataset_dir)
    client, gcs_address = jobs_api(layout)
    jobs = jobs_of(client, key)
    sid = next((j.submission_id for j in jobs if _is_active(j)), None)
    if sid is not None:
        emit(f"reattaching to Ray job {sid}, which is already training job {key}")
    else:
        done = [
            j.submission_id
            for j in jobs
            if j.status == "SUCCEEDED"
            and j.metadata.get(FLOW_RUN_FIELD) == flow_run_id
            and result_path(layout, key, j.submission_id).exists()
        ]
        if done:
            emit(f"Ray job {done[-1]} has already trained job {key} for this flow run")
            return read_result(result_path(layout, key, done[-1]))
        prepare_tracking(layout)
        sid = _submit(
            client,
            layout,
            key,
            recipe,
            dataset_dir,
            gcs_address,
            flow_run_id,
            next_attempt((j.submission_id for j in jobs), key, flow_run_id),
            emit,
            tags,
        )
    info, logs = wait_for_job(client, sid, emit, poll_s)
    if info.status != "SUCCEEDED":
        raise JobFailed(failure_reason(info, logs))
    path = result_path(layout, key, sid)
    if not path.exists():
        raise JobFailed(f"Ray job {sid} succeeded but left no result at {path}")
    return read_result(path)


def _submit(
    client: Any,
    layout: DataLayout,
    key: str,
    recipe: Recipe,
    dataset_dir: Path,
    gcs_address: str,
    flow_run_id: str,
    attempt: int,
    emit: Callable[[str], None],
    tags: Mapping[str, str] | None,
) -> str:
    sid = submission_id(key, flow_run_id, attempt)
    command = entrypoint(
        layout,
        write_recipe(layout, key, recipe),
        dataset_dir,
        result_path(layout, key, sid),
        gcs_address,
        flow_run_id,
        tags,
    )
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=command,
                submission_id=sid,
                metadata={KEY_FIELD: key, FLOW_RUN_FIELD: flow_run_id},
                runtime_env={"env_vars": job_environment(layout)},
            )
            emit(f"submitted Ray job {sid} (attempt {attempt})")
            return sid
        except RuntimeError as exc:
            if "already exists" in str(exc):
                emit(f"Ray job {sid} was submitted by another caller at the same time: waiting on it")
                return sid
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise cluster.ClusterError(
                    f"the Ray cluster's job agent did not answer within {AGENT_WAIT_S} s (see the head's "
                    "dashboard_agent.log: its port may be held by another Ray instance on the machine)"
                ) from None
            time.sleep(1)


def wait_for_job(client: Any, sid: str, emit: Callable[[str], None], poll_s: float = POLL_S) -> tuple[Any, str]:
    """(the job's final JobDetails, its whole log) once it has ended; each new log line goes to `emit` as the job
    writes it. A dashboard that stops answering (a restart, a loaded head) is waited for up to UNREACHABLE_S."""
    shown, answered = 0, time.monotonic()
    while True:
        try:
            info = client.get_job_info(sid)  # before the logs: a job that has ended has written all of them
            logs = client.get_job_logs(sid)
        except Exception as exc:  # noqa: BLE001 (the job runs on without its dashboard; asked again below)
            if time.monotonic() - answered > UNREACHABLE_S:
                raise JobFailed(
                    f"Ray job {sid}: the cluster's dashboard has not answered for {UNREACHABLE_S} s "
                    f"({type(exc).__name__}); a retry reattaches to the job if it still runs"
                ) from None
            time.sleep(poll_s)
            continue
        answered = time.monotonic()
        ended = info.status.is_terminal()
        shown = forward_lines(logs, shown, emit, partial=ended)
        if ended:
            return info, logs
        time.sleep(poll_s)


def forward_lines(text: str, shown: int, emit: Callable[[str], None], partial: bool = False) -> int:
    """Emit the lines of `text` past offset `shown` (the last one only once it is whole, or if `partial`);
    returns the offset reached."""
    end = len(text) if partial else text.rfind("\n") + 1
    for line in _COLOUR.sub("", text[shown:end]).splitlines():
        if line.strip():
            emit(line)
    return max(shown, end)


def failure_reason(info: Any, logs: str) -> str:
    """One line: which Ray job, how it ended, and why (for a failure, the driver's own last line: its error)."""
    message = (info.message or "").strip().splitlines()
    own = [ln.strip() for ln in _COLOUR.sub("", logs).splitlines() if ln.strip() and not _from_ray_actor(ln)]
    why = own[-1] if info.status == "FAILED" and own else message[0] if message else "no log"
    return f"Ray job {info.submission_id} {str(info.status.value).lower()}: {why}"


def _from_ray_actor(line: str) -> bool:
    # Ray forwards its actors' and tasks' output to the driver's log as "(TrainController pid=1234) ...".
    return line.lstrip().startswith("(")


def read_result(path: Path) -> TrainResult:
    return TrainResult(**json.loads(path.read_text()))


def stop_jobs(layout: DataLayout, keys: Iterable[str]) -> list[str]:
    """Stop every pending or running Ray job of these keys (a cancelled flow run's); their drivers record their
    runs killed. Returns the submission ids stopped."""
    client, _ = jobs_api(layout)
    keys = set(keys)
    stopped = [
        j.submission_id for j in client.list_jobs() if (j.metadata or {}).get(KEY_FIELD) in keys and _is_active(j)
    ]
    for sid in stopped:
        client.stop_job(sid)
    return stopped
