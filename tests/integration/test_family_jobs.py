"""`train-family` runs each variant as a Ray job of its own (the Jobs API) on the session's cluster (the variants
side by side, their MLflow parent run and comparison: `helpers.check_family_run`, on the nightly's first night);
a job stopped mid-training is resubmitted by the task's retry and resumes its checkpoints; a variant whose Ray job
fails for good leaves the others be and fails the run, naming it (both in one family run); a second caller for a
job that still runs waits on it rather than start another driver."""

from __future__ import annotations

import threading
import time

from helpers import flow_run_logs, jobs_client, ray_jobs
from mlflow.tracking import MlflowClient

from flows.train_family import FamilyFailed, train_family
from pipelines.registry.tracking import EXPERIMENT, Tags
from pipelines.training import submit
from pipelines.training.family import plan_family
from pipelines.training.job import TrainResult, job_key_for

# Each job needs 1 Ray worker x 1 CPU: two fit the session's 2-CPU cluster at once.
EPOCHS = 3
OVERRIDES = {"ray": {"num_workers": 1}, "schedule": {"epochs": EPOCHS, "patience": None}}
PAIR = ["phi=-9", "phi=-8"]
# A member whose Ray job fails on every try: its starting weights name a version the registry does not have. The
# flow's checks let it through (`init.from` is read when the job starts, by the Ray job's driver), so the failure is
# a real one: a driver's error, a FAILED Ray job, a retry, the same again.
DOOMED = "phi=-7"
DOOMED_OVERRIDES = {DOOMED: {"init": {"from": "models:/no-such-model/1"}}}


def _family(staged_dataset, layout, variants=PAIR, overrides=OVERRIDES, **kwargs):
    return train_family(variants, recipe="demo", dataset_dir=str(staged_dataset), data_dir=str(layout.root),
                        overrides=overrides, return_state=True, **kwargs)


def _keys(staged_dataset, layout, variants=PAIR, overrides=OVERRIDES, member_overrides=None) -> dict[str, str]:
    _, jobs = plan_family(variants, "demo", str(staged_dataset), str(layout.root), overrides, member_overrides)
    return {variant: job_key_for(recipe, staged_dataset) for variant, recipe in jobs}


def _runs_of(layout, key: str) -> list:
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.{Tags.JOB_KEY} = '{key}'") if exp else []


def _stop_once_resumable(layout, client, key: str, done: threading.Event, stopped: list) -> None:
    """Stop the key's running Ray job once an epoch is logged and Ray Train's snapshot lists its checkpoint (the
    file a relaunched driver resumes from; rank 0 logs the epoch as soon as the checkpoint is persisted, a moment
    before Ray Train records it there)."""
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    while not done.is_set():
        runs = _runs_of(layout, key)
        if runs and (layout.ray_storage / runs[0].data.tags[Tags.JOB_NAME] / "checkpoint_manager_snapshot.json"
                     ).exists() and c.get_metric_history(runs[0].info.run_id, "train_loss"):
            for job in ray_jobs(client, submit.KEY_FIELD, key):
                if job.status == "RUNNING":
                    client.stop_job(job.submission_id)
                    stopped.append(job.submission_id)
                    return
        time.sleep(0.2)


def test_a_stopped_job_resumes_and_a_failed_one_fails_the_run(staged_dataset, data_layout_tmp, prefect_server,
                                                              ray_cluster):
    """One family run of three: phi=-8's Ray job is stopped once it has a checkpoint, and the task's retry
    resubmits it to resume; DOOMED's fails in its driver on both tries; phi=-9 trains. The run ends Failed, naming
    DOOMED alone, with the other two trained and registered."""
    epochs = 6  # room to stop it after its first epoch and before its last
    overrides = {**OVERRIDES, "schedule": {"epochs": epochs, "patience": None}}
    key = _keys(staged_dataset, data_layout_tmp, overrides=overrides)["phi=-8"]
    doomed_key = _keys(staged_dataset, data_layout_tmp, [DOOMED], overrides, DOOMED_OVERRIDES)[DOOMED]
    client = jobs_client(ray_cluster)
    done, stopped = threading.Event(), []
    stopper = threading.Thread(target=_stop_once_resumable,
                               args=(data_layout_tmp, client, key, done, stopped), daemon=True)
    stopper.start()
    try:
        state = _family(staged_dataset, data_layout_tmp, [*PAIR, DOOMED], overrides=overrides, retries=1,
                        retry_delay_seconds=1, member_overrides=DOOMED_OVERRIDES)
    finally:
        done.set()
        stopper.join(timeout=10)
    assert stopped, "the job was not stopped: it finished before its first epoch was seen?"
    flow_run_id = str(state.state_details.flow_run_id)

    # The failed member: a FAILED Ray job, then the retry's, also FAILED; the run Failed, naming it and why.
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, FamilyFailed)
    rows = {r["variant"]: r for r in error.rows}
    assert [(r["variant"], r["status"]) for r in error.rows] == [
        ("efficientnet_b0_phi-9", "trained"), ("efficientnet_b0_phi-8", "trained"), (DOOMED, "failed")]
    doomed_jobs = [(j.submission_id, j.status) for j in ray_jobs(client, submit.KEY_FIELD, doomed_key)]
    assert sorted(doomed_jobs) == [(submit.submission_id(doomed_key, flow_run_id, n), "FAILED") for n in (1, 2)]
    reason = rows[DOOMED]["reason"]  # the second try's Ray job, and its driver's error line
    assert reason.startswith(f"Ray job {submit.submission_id(doomed_key, flow_run_id, 2)} failed: "), reason
    assert "init.from models:/no-such-model/1" in reason and "\n" not in reason, reason
    assert state.message == f"1 of 3 variant(s) failed: {DOOMED} ({reason})"
    logs = flow_run_logs(state.state_details.flow_run_id)
    table = next(line for line in logs if "val top-1" in line and "status" in line).strip().splitlines()
    assert [line.split()[0] for line in table[1:]] == ["efficientnet_b0_phi-9", "efficientnet_b0_phi-8", DOOMED]
    assert table[1].endswith("trained") and table[2].endswith("trained")
    assert table[3].split()[1] == "-" and table[3].endswith("failed: " + reason)

    # The others trained to the end and were registered, the stopped one resumed in its own MLflow run.
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)
    for row in rows.values():
        if row["status"] == "trained":
            assert c.get_model_version(row["registered_model"], row["version"]).run_id == row["run_id"]
    assert not rows["efficientnet_b0_phi-9"]["resumed"]
    resumed = rows["efficientnet_b0_phi-8"]
    assert resumed["resumed"] and resumed["epochs_run"] == epochs
    jobs = [j for j in ray_jobs(client, submit.KEY_FIELD, key) if j.metadata[submit.FLOW_RUN_FIELD] == flow_run_id]
    assert sorted((j.submission_id, j.status) for j in jobs) == [
        (stopped[0], "STOPPED"), (stopped[0].removesuffix("__1") + "__2", "SUCCEEDED")], jobs
    runs = _runs_of(data_layout_tmp, key)
    assert [r.info.run_id for r in runs] == [resumed["run_id"]]  # the same MLflow run, appended to
    assert 0 < int(runs[0].data.tags[Tags.RESUMED_AT_EPOCH]) < epochs
    for metric in ("train_loss", "minival_top1"):
        steps = sorted(m.step for m in c.get_metric_history(resumed["run_id"], metric))
        assert steps == list(range(epochs)), f"{metric}: not one point per epoch: {steps}"


def test_a_second_caller_reattaches_to_the_running_job(staged_dataset, data_layout_tmp, ray_cluster):
    _, [(_, recipe)] = plan_family(["phi=-9"], "demo", str(staged_dataset), str(data_layout_tmp.root), OVERRIDES)
    key = job_key_for(recipe, staged_dataset)
    client = jobs_client(ray_cluster)
    results: dict[str, TrainResult] = {}
    said: dict[str, list[str]] = {"first": [], "retry": [], "rerun": []}

    def train(name: str, flow_run_id: str) -> None:
        results[name] = submit.train_on_cluster(recipe, staged_dataset, data_layout_tmp, flow_run_id,
                                                emit=said[name].append, poll_s=0.5)

    first = threading.Thread(target=train, args=("first", "flow-run-a"), daemon=True)
    first.start()
    deadline = time.time() + 300
    while not any(j.status == "RUNNING" for j in ray_jobs(client, submit.KEY_FIELD, key)):
        assert first.is_alive() and time.time() < deadline, said["first"][-20:]
        time.sleep(0.5)
    # A Prefect retry of the same flow run, and a rerun of the flow, while the job runs.
    others = [threading.Thread(target=train, args=args, daemon=True)
              for args in (("retry", "flow-run-a"), ("rerun", "flow-run-b"))]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(timeout=600)
    assert set(results) == {"first", "retry", "rerun"}, said
    assert len({r.run_id for r in results.values()}) == 1
    # The session's cluster keeps the Ray jobs of earlier tests, of the same key too: only these callers' count.
    jobs = [j for j in ray_jobs(client, submit.KEY_FIELD, key)
            if j.metadata[submit.FLOW_RUN_FIELD] in ("flow-run-a", "flow-run-b")]
    assert [(j.submission_id, j.status) for j in jobs] == [(submit.submission_id(key, "flow-run-a", 1), "SUCCEEDED")]
    for name in ("retry", "rerun"):
        assert any(line.startswith("reattaching to Ray job") for line in said[name]), said[name]
    assert len(_runs_of(data_layout_tmp, key)) == 1


def test_negative_retries_are_bad_input(staged_dataset, data_layout_tmp, prefect_server):
    state = _family(staged_dataset, data_layout_tmp, retries=-1)
    assert state.is_failed() and "retries (-1)" in state.message and "\n" not in state.message


_SECOND_INSTANCE = """
import sys, time
from pipelines.training import cluster
from ray.job_submission import JobStatus, JobSubmissionClient
ctx = cluster.init_local(num_cpus=1)
client = JobSubmissionClient(f"http://{ctx.dashboard_url}")
for _ in range(60):  # the agent registers a few seconds after ray.init returns
    try:
        sid = client.submit_job(entrypoint="python -c 'print(6 * 7)'")
        break
    except RuntimeError:
        time.sleep(1)
while client.get_job_status(sid) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    time.sleep(0.5)
print(client.get_job_status(sid))
print(client.get_job_logs(sid))
"""


def test_a_second_local_instance_has_a_jobs_api_of_its_own(ray_cluster):
    """Another Ray instance on the machine (here: the session's; a port held like Ray's default agent port, as a
    stack's head holds it) does not take the job agent of a new local instance."""
    import socket
    import subprocess
    import sys

    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 52365))
        held.listen()
    except OSError:
        pass  # already held by another instance: the case itself
    try:
        done = subprocess.run([sys.executable, "-c", _SECOND_INSTANCE], capture_output=True, text=True, timeout=180)
    finally:
        held.close()
    assert done.returncode == 0, done.stderr[-2000:]
    status, *log = done.stdout.split("\n", 1)
    assert (status, "42" in "".join(log)) == ("SUCCEEDED", True), done.stdout
