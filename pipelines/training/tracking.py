"""MLflow: one run per logical training job, metrics per epoch, the chosen checkpoint registered with aliases.

Everything points at one tracking URI (the SQLite store under the data directory, or a server), so the driver,
the Ray workers and the Prefect flows see the same runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# mlflow is imported where it is used: it takes ~1.4 s (pandas with it), paid by every process that imports this
# module (each Ray Train worker and controller unpickling the training loop), while only rank 0 logs.

EXPERIMENT = "efficientnet-family"  # every job's run, and the family compared side by side
CANDIDATE, CHAMPION = "candidate", "champion"  # registered-model aliases: the latest version, the best one


class Tags:
    """MLflow tag names, each written once: on a job's run (R), on a registered version (V), or both."""

    VARIANT = "variant"  # R V: the variant's slug, every override in it
    RECIPE = "recipe"  # R V
    DATASET_VERSION = "dataset_version"  # R V: champion is compared within one dataset version only
    JOB_NAME = "job_name"  # R: the Ray Train run (its storage folder)
    JOB_KEY = "job_key"  # R: variant + recipe hash + dataset version; a rerun with the same key resumes
    RESUMED_AT_EPOCH = "resumed_at_epoch"  # R: set when workers restarted from a checkpoint
    RESUMED_AT_BATCH = "resumed_at_batch"  # R: the batch of that epoch they went on from (0: its start)
    FIRST_STEP = "first_step_unix"  # R: when the first training step ended (start-up latency)
    REGISTERED = "registered_version"  # R: "<name>/<version>" once the run's model is registered
    FLOW_RUN = "prefect_flow_run_id"  # R: the Prefect flow run that drove the job (the last, if resumed)
    PARAMS = "params"  # V: parameter count
    GMACS = "gmacs"  # V: multiply-accumulates at the eval resolution
    TRAIN_RESOLUTION = "train_resolution"  # V
    EVAL_RESOLUTION = "eval_resolution"  # V
    MANIFEST_SHA256 = "manifest_sha256"  # V: the exact staged files it was trained and evaluated on
    MINIVAL_TOP1 = "minival_top1"  # V: of the chosen checkpoint
    VAL_TOP1 = "val_top1"  # V: champion moves on it
    EPOCHS_RUN = "epochs_run"  # V
    BEST_EPOCH = "best_epoch"  # V: the chosen checkpoint's epoch
    EARLY_STOPPED_EPOCH = "early_stopped_epoch"  # V: "none" when the schedule ran to its end


def registered_name(variant_slug: str) -> str:
    """`efficientnet_b0` -> `efficientnet-b0`: the registry name of a variant's models."""
    slug = variant_slug.removeprefix("efficientnet_").removeprefix("efficientnet-")
    return f"efficientnet-{slug}".replace("_", "-")


def client(tracking_uri: str) -> MlflowClient:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(c: MlflowClient, artifact_root: str | None = None, name: str = EXPERIMENT) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root)
    except MlflowException:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def start_run(
    c: MlflowClient, exp_id: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
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


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dict(c: MlflowClient, run_id: str, obj: Any, artifact_file: str) -> None:
    c.log_text(run_id, json.dumps(obj, indent=1, sort_keys=True, default=str), artifact_file)




def register_best_checkpoint(
    tracking_uri: str, run_id: str, model: Any, variant_slug: str, input_example: Any,
    preprocessing: Mapping[str, Any], tags: Mapping[str, Any], val_top1: float, dataset_version: str,
    state_dict_path: Path | None = None,
) -> tuple[str, str, bool]:
    """Log the chosen model to the run, register it as `efficientnet-<variant>`, set aliases.

    The version gets alias `candidate`; `champion` moves to it only when its val top-1 beats the current
    champion's on the same dataset version (a champion from another dataset version is not comparable, so
    the first model on a new version becomes champion). Returns (model name, version, became_champion).

    Works against a tracking server as well as a SQLite store: MLflow 3 registers a logged model by its model
    id. A failure removes what this call made (logged model, version, a registered model it created), so a
    retry starts clean; a run whose model is already registered (the process died after registering) is not
    registered twice.
    """
    import mlflow
    import mlflow.pytorch

    c = client(tracking_uri)
    name = registered_name(variant_slug)
    done = c.get_run(run_id).data.tags.get(Tags.REGISTERED)
    if done:
        return _aliases_of(c, *done.split("/", 1))
    made: dict[str, Any] = {}
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", input_example=input_example, serialization_format="pickle",
                metadata={"preprocessing": dict(preprocessing), "variant": variant_slug},
            )
            made["model_id"] = info.model_id
            mlflow.log_dict(dict(preprocessing), "model/preprocessing.json")
            if state_dict_path is not None:
                # A plain state_dict plus the variant name rebuilds the model anywhere `models` is installed.
                mlflow.log_artifact(str(state_dict_path), "checkpoint")
        if _registered_model(c, name) is None:
            c.create_registered_model(name, description=f"EfficientNet {variant_slug}, trained by effnet-family")
            made["registered_model"] = name
        mv = c.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id,
                                    tags={k: str(v) for k, v in tags.items()})
        made["version"] = mv.version
        _wait_ready(c, name, mv.version)
        c.set_registered_model_alias(name, CANDIDATE, mv.version)
        promote = _beats_champion(c, name, val_top1, dataset_version)
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


def _beats_champion(c: MlflowClient, name: str, val_top1: float, dataset_version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        champ = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True  # no champion yet
    if champ.tags.get(Tags.DATASET_VERSION) != dataset_version:
        return True
    return val_top1 > float(champ.tags.get(Tags.VAL_TOP1, "-inf"))


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
