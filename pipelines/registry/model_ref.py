"""A trained model as a user names it, loaded without unpickling.

A reference is `models:/NAME@ALIAS` or `models:/NAME/VERSION` (a registered version), `runs:/RUN_ID` (the model
a training run registered), or a checkpoint file. Every one comes down to a file of tensors and plain data
(`models.checkpoint`: refused when it holds pickled objects), and the model is rebuilt through `models` from
the arguments the file carries. Its eval preprocessing (resolution, crop ratio) follows from its variant
(`LoadedModel.spec`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import VariantSpec
from models.checkpoint import ModelError, model_from_checkpoint, read_checkpoint
from pipelines.registry.tracking import PREPROCESSING_ARTIFACT, STATE_DICT_ARTIFACT, Tags

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
_RUN_URI = re.compile(r"^runs:/(?P<run>[0-9a-f]{32})/?$")


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on the CPU
    spec: VariantSpec  # its variant: eval resolution and crop ratio
    num_classes: int
    source: str  # what was loaded: models:/NAME/VERSION (an alias resolved), runs:/ID, or the file
    run_id: str | None  # the training run it came from, when known
    model_args: dict[str, Any] = field(default_factory=dict)  # the variant's name, its overrides, its classes


class NoWeights(ModelError):
    """A run (or registered version) without plain weights to rebuild the model from."""


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` -> (NAME, VERSION, None); `models:/NAME@ALIAS` -> (NAME, None, ALIAS)."""
    m = _MODEL_URI.match(uri)
    if m is None:
        raise ModelError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def load_file(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"{path}: no such checkpoint file (or give models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID)"
        )
    saved = read_checkpoint(path)
    model, spec, num_classes = model_from_checkpoint(saved, str(path))
    return LoadedModel(model, spec, num_classes, str(path), None, dict(saved["model_args"]))


def run_weights(c: Any, run_id: str, where: str) -> tuple[torch.nn.Module, VariantSpec, int, dict[str, Any]]:
    """The plain weights a training run registered (`checkpoint/state_dict.pt`), rebuilt; and its model_args."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, STATE_DICT_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing artifact or run)
            raise NoWeights(
                f"{where}: run {run_id} holds no {STATE_DICT_ARTIFACT} (is it a run that registered a model?)"
            ) from None
        saved = read_checkpoint(path)
        return (*model_from_checkpoint(saved, f"{where} ({STATE_DICT_ARTIFACT})"), dict(saved["model_args"]))


def registered_model_args(c: Any, version: Any) -> dict[str, Any]:
    """The arguments that rebuild a registered version's model (its variant, overrides, classes), read from its
    run's plain weights without building the model; NoWeights when the run holds none."""
    where = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(version.run_id, STATE_DICT_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing artifact or run)
            raise NoWeights(f"{where}: run {version.run_id} holds no {STATE_DICT_ARTIFACT}") from None
        saved = read_checkpoint(path)
    if not isinstance(saved.get("model_args"), dict):
        raise ModelError(f"{where} ({STATE_DICT_ARTIFACT}): no model_args to rebuild the model from")
    return dict(saved["model_args"])


def registered_classes(c: Any, version: Any) -> tuple[str, ...] | None:
    """The class ids a registered version was trained on, in the order of its classifier's rows (its staged
    version's `manifest.classes`, recorded with its preprocessing); None when it records none (registered some
    other way)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(version.run_id, PREPROCESSING_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing artifact or run)
            return None
        classes = json.loads(Path(path).read_text()).get("classes")
    return tuple(str(k) for k in classes) if isinstance(classes, list) else None


def registered_version(c: Any, ref: str) -> Any:
    """The registered version `models:/NAME/VERSION` or `models:/NAME@ALIAS` names now; ModelError if none."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(ref)
    try:
        return c.get_model_version(name, version) if version else c.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version else f"alias {alias!r}"
        raise ModelError(f"{ref}: the registry has no {what} of model {name!r}") from None


def load_model(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """The model `ref` names (a registered version, a run, or a checkpoint file), rebuilt without unpickling."""
    if not ref.startswith(("models:/", "runs:/")):
        return load_file(ref)
    if tracking_uri is None:
        raise ModelError(f"{ref}: no MLflow tracking URI to look it up in")
    from pipelines.registry import tracking

    c = tracking.client(tracking_uri)
    if ref.startswith("models:/"):
        mv = registered_version(c, ref)
        source = f"models:/{mv.name}/{mv.version}"
        model, spec, num_classes, args = run_weights(c, mv.run_id, source)
        return LoadedModel(model, spec, num_classes, source, mv.run_id, args)
    m = _RUN_URI.match(ref)
    if m is None:
        raise ModelError(f"{ref}: expected runs:/RUN_ID (32 hex digits)")
    model, spec, num_classes, args = run_weights(c, m["run"], ref)
    return LoadedModel(model, spec, num_classes, ref, m["run"], args)


def load_registered_weights(c: Any, version: Any) -> tuple[torch.nn.Module, VariantSpec] | None:
    """A registered version's model (eval mode) and its VariantSpec, rebuilt from its run's plain weights; None
    when the run holds none (registered some other way)."""
    try:
        model, spec, _, _ = run_weights(c, version.run_id, f"models:/{version.name}/{version.version}")
    except NoWeights:
        return None
    return model, spec


def registered_val_top1(c: Any, loaded: LoadedModel) -> float | None:
    """The val top-1 recorded when the loaded model's version was registered (None for a file or a run)."""
    if not loaded.source.startswith("models:/"):
        return None
    mv = registered_version(c, loaded.source)
    value = mv.tags.get(Tags.VAL_TOP1)
    return float(value) if value is not None else None
