"""MLflow: one run per logical training job, metrics per epoch, the chosen checkpoint registered with aliases.

Everything points at one tracking URI (the SQLite store under the data directory, or a server), so the driver,
the Ray workers and the Prefect flows see the same runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings import TRACKING_URI_ENV

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# mlflow is imported where it is used: it takes ~1.4 s (pandas with it), paid by every process that imports this
# module (each Ray Train worker and controller unpickling the training loop), while only rank 0 logs.

EXPERIMENT = "efficientnet-family"  # every job's run, and the family compared side by side
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow's UI (not by its Python API)
CANDIDATE, CHAMPION = "candidate", "champion"  # registered-model aliases: the latest version, the best one
# Where a registered version's run keeps its plain weights: a state_dict and the arguments that rebuild the model
# through `models`, read back without unpickling (`pipelines.registry.model_ref`).
STATE_DICT_ARTIFACT = "checkpoint/state_dict.pt"
# Where a registered version's run keeps its eval preprocessing, with the class ids of its training data in the
# order of the classifier's rows (`classes`: the staged version's `manifest.classes`), read by `model_ref`.
PREPROCESSING_ARTIFACT = "model/preprocessing.json"
# Where `mlflow ui` serves a local store when asked to (`--port 5000`, as the README says): the links to a run when
# the tracking URI is a file or a database rather than a server.
LOCAL_UI = "http://127.0.0.1:5000"


class Tags:
    """MLflow tag names, each written once: on a job's run (R), on a registered version (V), or both."""

    VARIANT = "variant"  # R V: the variant's slug, every override in it
    RECIPE = "recipe"  # R V
    DATASET_VERSION = "dataset_version"  # R V
    JOB_NAME = "job_name"  # R: the Ray Train run (its storage folder)
    JOB_KEY = "job_key"  # R: variant + recipe hash + dataset version; a rerun with the same key resumes
    RESUMED_AT_EPOCH = "resumed_at_epoch"  # R: set when workers restarted from a checkpoint
    RESUMED_AT_BATCH = "resumed_at_batch"  # R: the batch of that epoch they went on from (0: its start)
    FIRST_STEP = "first_step_unix"  # R: when the first training step ended (start-up latency)
    REGISTERED = "registered_version"  # R: "<name>/<version>" once the run's model is registered
    FLOW_RUN = "prefect_flow_run_id"  # R: the Prefect flow run that drove the job (the last, if resumed)
    RUN_KIND = "run_kind"  # R: "family" / "transfer" on a flow's parent run (its members' runs nested under it)
    PARENT_RUN = "mlflow.parentRunId"  # R: MLflow's own tag, which nests a member's run under the family's
    PARAMS = "params"  # V: parameter count
    GMACS = "gmacs"  # V: multiply-accumulates at the eval resolution
    TRAIN_RESOLUTION = "train_resolution"  # V
    EVAL_RESOLUTION = "eval_resolution"  # V
    MANIFEST_SHA256 = "manifest_sha256"  # V: the exact staged files it was trained and evaluated on
    MINIVAL_TOP1 = "minival_top1"  # V: of the chosen checkpoint, as training measured it
    VAL_TOP1 = "val_top1"  # V: reported, never used to choose (neither a checkpoint nor the champion)
    # V: the promotion, decided on the candidate's dataset version's minival, where the champion is evaluated too
    PROMOTION_TOP1 = "promotion_minival_top1"  # the candidate's top-1 there
    CHAMPION_TOP1 = "champion_minival_top1"  # the champion's top-1 there ("none": no champion to compare with)
    CHAMPION_BEFORE = "champion_before"  # the champion's version then ("none")
    PROMOTION = "promotion"  # the decision and why, one line
    PHI = "phi"  # V: the compound-scaling exponent a member was built with (phi members only)
    COEFFICIENTS = "coefficients"  # V: the coefficient set's name ("paper", a search's, "explicit")
    SCALING = "scaling"  # V: "alpha=A beta=B gamma=G", the set's numbers
    INIT_FROM = "init_from"  # R V: models:/NAME/VERSION a fine-tuned job started from (recipe `init`)
    INIT_HEAD = "init_head"  # R V: how its classifier started: keep, reset, or "match: K of N classes from ..."
    EPOCHS_RUN = "epochs_run"  # R V (R: a scaling experiment's trial)
    SEARCH_KEY = "search_key"  # R: a scaling experiment's key, on its parent run and its trials' runs
    TRIAL = "trial"  # R: a trial's label in its experiment ("alpha=1.2 beta=1.1 gamma=1.15", "width x2")
    STOPPED_BY = "stopped_by"  # R: "scheduler" when ASHA stopped the trial early, else "none"
    BEST_EPOCH = "best_epoch"  # V: the chosen checkpoint's epoch
    EARLY_STOPPED_EPOCH = "early_stopped_epoch"  # V: "none" when the schedule ran to its end


def registered_name(variant_slug: str) -> str:
    """`efficientnet_b0` -> `efficientnet-b0`: the registry name of a variant's models."""
    slug = variant_slug.removeprefix("efficientnet_").removeprefix("efficientnet-")
    return f"efficientnet-{slug}".replace("_", "-")


def client(tracking_uri: str) -> MlflowClient:
    import mlflow
    from mlflow.tracking import MlflowClient

    # MLflow's fluent API (log_model) follows the process's URI; set_tracking_uri also exports it as
    # MLFLOW_TRACKING_URI, which a DataLayout reads as the user's shared server: a second data directory in
    # the same process (a benchmark's arms, a test session) then logged into the first one's store.
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if before is None:
        os.environ.pop(TRACKING_URI_ENV, None)
    else:
        os.environ[TRACKING_URI_ENV] = before
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(c: MlflowClient, artifact_root: str | None = None, name: str = EXPERIMENT) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # The kind makes MLflow 3's UI open the experiment in its model-training view (runs, metrics, compare)
        # rather than the GenAI one (traces, evaluation runs) it guesses for an experiment without one.
        return c.create_experiment(
            name, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
        )
    except MlflowException:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:  # not created by another: this create failed for its own reason
            raise
        return exp.experiment_id


def start_run(c: MlflowClient, exp_id: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Create the run of a new training job and log its flattened, resolved config as params."""
    from mlflow.entities import Param

    run = c.create_run(exp_id, run_name=run_name, tags=dict(tags))
    flat = flatten(params)
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i : i + 100]])
    return run.info.run_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_or_start_run(
    c: MlflowClient,
    exp_id: str,
    identity: Mapping[str, str],
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    new_tags: Mapping[str, str] | None = None,
) -> str:
    """The run whose tags hold all of `identity`, found again (a retry or a rerun goes on in it: set RUNNING, `tags`
    set on it again), else a new run with `params`, tagged `identity`, `tags` and `new_tags`. The one way a family,
    a search or a trial finds its run again; a training job finds its own by its marker file (`job._open_job`)."""
    where = " and ".join(f"tags.{k} = '{v}'" for k, v in identity.items())
    found = c.search_runs([exp_id], filter_string=where, max_results=1)
    if not found:
        return start_run(c, exp_id, run_name, params, {**(new_tags or {}), **(tags or {}), **identity})
    run_id = found[0].info.run_id
    c.update_run(run_id, status="RUNNING")
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)
    return run_id


FAMILY_KIND = "family"
TRANSFER_KIND = "transfer"


def open_family_run(c: MlflowClient, exp_id: str, flow_run_id: str, run_name: str, params: Mapping[str, Any]) -> str:
    """The parent run of one family flow run: its members' runs are nested under it (the tag `PARENT_RUN`), and
    it holds the family's comparison. A retry of the same flow run finds it again rather than make a second."""
    return open_parent_run(c, exp_id, flow_run_id, FAMILY_KIND, run_name, params)


def open_parent_run(
    c: MlflowClient, exp_id: str, flow_run_id: str, kind: str, run_name: str, params: Mapping[str, Any]
) -> str:
    """The parent run of one flow run of a `kind` (family, transfer), found again by a retry of the same flow run:
    the runs of the jobs it starts are nested under it (the tag `PARENT_RUN`)."""
    return find_or_start_run(c, exp_id, {Tags.FLOW_RUN: flow_run_id, Tags.RUN_KIND: kind}, run_name, params)


def run_url(tracking_uri: str, exp_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run: on the tracking server itself, or where `mlflow ui` serves a local store."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def close_family_run(c: MlflowClient, run_id: str, rows: list[dict[str, Any]], title: str, status: str) -> None:
    """Log the family's comparison (PNG, HTML, CSV under `comparison/`) to its parent run and end the run."""
    from pipelines.registry.compare import write_comparison

    with tempfile.TemporaryDirectory() as tmp:
        for path in write_comparison(rows, Path(tmp), title):
            c.log_artifact(run_id, str(path), "comparison")
    c.set_terminated(run_id, status)


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dict(c: MlflowClient, run_id: str, obj: Any, artifact_file: str) -> None:
    c.log_text(run_id, json.dumps(obj, indent=1, sort_keys=True, default=str), artifact_file)


def log_served_model(
    weights_file: Path, input_example: Any, preprocessing: Mapping[str, Any], variant_slug: str
) -> Any:
    """The active run's MLflow model: a pyfunc whose code is `served_model.py` (logged as source, models-from-code),
    the weights file an artifact of it, the `models` package beside it; nothing in it is pickled. Its ModelInfo."""
    import mlflow
    import numpy
    import torch

    from pipelines.registry import served_model
    from pipelines.settings import PROJECT_ROOT

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=served_model.__file__,
        artifacts={served_model.WEIGHTS: str(weights_file)},
        code_paths=[str(PROJECT_ROOT / "models")],
        input_example=input_example,
        metadata={"preprocessing": dict(preprocessing), "variant": variant_slug},
        # Given, not inferred: inferring loads the model in a subprocess to see what it imports.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}",
            f"mlflow=={mlflow.__version__}",
        ],
    )


def register_best_checkpoint(
    tracking_uri: str,
    run_id: str,
    variant_slug: str,
    input_example: Any,
    preprocessing: Mapping[str, Any],
    tags: Mapping[str, Any],
    promote: bool,
    weights: Mapping[str, Any],
    name: str | None = None,
) -> tuple[str, str, bool]:
    """Log the chosen model to the run, register it as `name` (default `efficientnet-<variant>`), set aliases.

    The version gets alias `candidate`, and `champion` when `promote` (decided by the caller on minival, see
    `pipelines.registry.promotion`). Returns (model name, version, became_champion).

    Works against a tracking server as well as a SQLite store: MLflow 3 registers a logged model by its model
    id. A failure removes what this call made (logged model, version, a registered model it created), so a
    retry starts clean; a run whose model is already registered (the process died after registering) is not
    registered twice.
    """
    import mlflow
    import torch

    c = client(tracking_uri)
    name = name or registered_name(variant_slug)
    done = c.get_run(run_id).data.tags.get(Tags.REGISTERED)
    if done:
        return _aliases_of(c, *done.split("/", 1))
    made: dict[str, Any] = {}
    try:
        with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
            # Tensors and plain data ({"state_dict", "model_args"}): the run's copy is what promotion and
            # fine-tuning read; the MLflow model carries its own and rebuilds the model from it through `models`.
            path = Path(tmp) / Path(STATE_DICT_ARTIFACT).name
            torch.save(dict(weights), path)
            mlflow.log_artifact(str(path), str(Path(STATE_DICT_ARTIFACT).parent))
            info = log_served_model(path, input_example, preprocessing, variant_slug)
            made["model_id"] = info.model_id
            mlflow.log_dict(dict(preprocessing), PREPROCESSING_ARTIFACT)
        if _registered_model(c, name) is None:
            c.create_registered_model(name, description=f"EfficientNet {variant_slug}, trained by effnet-family")
            made["registered_model"] = name
        mv = c.create_model_version(
            name, info.model_uri, run_id=run_id, model_id=info.model_id, tags={k: str(v) for k, v in tags.items()}
        )
        made["version"] = mv.version
        _wait_ready(c, name, mv.version)
        c.set_registered_model_alias(name, CANDIDATE, mv.version)
        if promote:
            c.set_registered_model_alias(name, CHAMPION, mv.version)
        c.set_tag(run_id, Tags.REGISTERED, f"{name}/{mv.version}")
    except BaseException:
        _undo_registration(c, name, made)
        raise
    return name, str(mv.version), promote


def _registered_model(c: MlflowClient, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException:
        return None


def champion_version(c: MlflowClient, name: str) -> Any:
    """The registered model's version with alias `champion`, or None (no such model, or no champion yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _aliases_of(c: MlflowClient, name: str, version: str) -> tuple[str, str, bool]:
    mv = c.get_model_version(name, version)
    return name, str(version), CHAMPION in (mv.aliases or [])


def _undo_registration(c: MlflowClient, name: str, made: Mapping[str, Any]) -> None:
    """Best effort, newest first: what is left after a failure here is at most what the failure itself left."""
    steps = []
    if "version" in made:
        steps.append(lambda: c.delete_model_version(name, made["version"]))
    if "registered_model" in made:
        steps.append(lambda: c.delete_registered_model(name))
    if "model_id" in made:
        steps.append(lambda: c.delete_logged_model(made["model_id"]))
    for step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 (the original error is the one to report)
            pass


def _wait_ready(c: MlflowClient, name: str, version: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if c.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.2)
