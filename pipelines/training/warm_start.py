"""A job that starts from a registered model's weights (the recipe's `init` section): fine-tuning a champion on a
new dataset version, or on other classes with a new head.

The driver does it once, before any worker starts: it resolves the version (an alias is read then, and the
version it pointed at is what the job records), rebuilds the source's weights without unpickling, fits them to
the job's model (`fitted_state`) and writes the result beside the job's marker. Every worker loads that file;
a resumed job reuses it, so its attempts all start from the same weights even if the alias has moved since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import models
from models.checkpoint import read_checkpoint
from pipelines.atomic import atomic_path
from pipelines.registry.model_ref import ModelError, load_registered_weights, registered_version
from pipelines.registry.tracking import STATE_DICT_ARTIFACT
from pipelines.training.recipe import InitConfig

CLASSIFIER = "classifier."  # the state_dict prefix of the head `head: reset` rebuilds


def resolve_version(c: Any, uri: str) -> Any:
    """The registered version a `models:/` URI names now; ValueError naming what is missing."""
    try:
        return registered_version(c, uri)
    except ModelError as exc:
        raise ValueError(f"init.from {exc}") from None


def fitted_state(source: dict[str, torch.Tensor], target: torch.nn.Module, head: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors as a whole state_dict of `target`: every tensor the same name and shape, except the
    classifier, which `head: reset` takes from `target` (freshly initialised). ValueError saying what differs."""
    own = target.state_dict()
    if head == "reset":
        source = {k: v for k, v in source.items() if not k.startswith(CLASSIFIER)}
        source.update({k: v for k, v in own.items() if k.startswith(CLASSIFIER)})
    missing = sorted(own.keys() - source.keys())
    unexpected = sorted(source.keys() - own.keys())
    shapes = [k for k in sorted(own.keys() & source.keys()) if own[k].shape != source[k].shape]
    if shapes and all(k.startswith(CLASSIFIER) for k in shapes) and not (missing or unexpected):
        raise ValueError(
            f"its classifier has {source[CLASSIFIER + 'weight'].shape[0]} classes, the dataset "
            f"{own[CLASSIFIER + 'weight'].shape[0]}: set init.head: reset to train a new one"
        )
    if missing or unexpected or shapes:
        first = (shapes or missing or unexpected)[0]
        raise ValueError(
            f"its weights do not fit the job's variant ({len(shapes)} tensor(s) of other shapes, "
            f"{len(missing)} missing, {len(unexpected)} unexpected; first: {first})"
        )
    return {k: source[k] for k in own}


def write_init_weights(c: Any, init: InitConfig, spec: Any, num_classes: int, seed: int, dest: Path) -> str:
    """The job's starting weights written to `dest` (kept when already there: a resumed job); returns the lineage,
    `models:/NAME/VERSION` of the source. ValueError naming the problem (no such version, no plain weights, a
    model that does not fit)."""
    mv = resolve_version(c, init.from_)
    lineage = f"models:/{mv.name}/{mv.version}"
    if dest.exists():
        return lineage
    loaded = load_registered_weights(c, mv)
    if loaded is None:
        raise ValueError(f"init.from {init.from_}: version {mv.version} holds no {STATE_DICT_ARTIFACT} to start from")
    torch.manual_seed(seed)  # a reset head is the same on every attempt
    target = models.build_model(spec, num_classes)
    try:
        state = fitted_state(loaded[0].state_dict(), target, init.head)
    except ValueError as exc:
        raise ValueError(f"init.from {init.from_} (v{mv.version}, {loaded[1].name}) for {spec.name}: {exc}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return lineage


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """A worker's model set to the job's starting weights (tensors only: read without unpickling)."""
    model.load_state_dict(read_checkpoint(path))
