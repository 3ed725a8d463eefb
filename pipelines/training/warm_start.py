"""A job that starts from a registered model's weights (the recipe's `init` section): fine-tuning a champion on a
new dataset version, or on other classes with a new head (`head: reset`), or on classes it partly knows with a new
head whose rows of the shared class ids are the source's (`head: match`: ImageNet-21k -> ILSVRC2012).

The driver does it once, before any worker starts: it resolves the version (an alias is read then, and the
version it pointed at is what the job records), rebuilds the source's weights without unpickling, fits them to
the job's model (`fitted_state`) and writes the result beside the job's marker. Every worker loads that file;
a resumed job reuses it, so its attempts all start from the same weights even if the alias has moved since.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import models
from models.checkpoint import read_checkpoint
from pipelines.atomic import atomic_path
from pipelines.registry.model_ref import ModelError, load_registered_weights, registered_classes, registered_version
from pipelines.registry.tracking import PREPROCESSING_ARTIFACT, STATE_DICT_ARTIFACT, Tags
from pipelines.training.recipe import InitConfig

CLASSIFIER = "classifier."  # the state_dict prefix of the head `head: reset` rebuilds
WEIGHT, BIAS = CLASSIFIER + "weight", CLASSIFIER + "bias"  # its rows: one per class


def resolve_version(c: Any, uri: str) -> Any:
    """The registered version a `models:/` URI names now; ValueError naming what is missing."""
    try:
        return registered_version(c, uri)
    except ModelError as exc:
        raise ValueError(f"init.from {exc}") from None


def matched_rows(source_classes: Sequence[str], target_classes: Sequence[str]) -> dict[int, int]:
    """Target class index -> source class index, for every target class id the source has too (ILSVRC2012's 1k
    WNIDs in ImageNet-21k's); the target classes it lacks are not in it. ValueError when no class id is shared."""
    at = {cls: i for i, cls in enumerate(source_classes)}
    rows = {t: at[cls] for t, cls in enumerate(target_classes) if cls in at}
    if not rows:
        raise ValueError(
            f"head: match finds no class id shared by the source's {len(source_classes)} classes and the dataset's "
            f"{len(target_classes)} (e.g. {', '.join(list(source_classes)[:2])} / "
            f"{', '.join(list(target_classes)[:2])}): use head: reset"
        )
    return rows


def matched_head(
    source: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor], rows: Mapping[int, int]
) -> dict[str, torch.Tensor]:
    """The classifier's weight and bias: `fresh`'s (the target's own, freshly initialised), with row t replaced by
    `source`'s row rows[t] for each matched class. ValueError when the features the rows weigh differ."""
    weight, bias = fresh[WEIGHT].clone(), fresh[BIAS].clone()
    if source[WEIGHT].shape[1:] != weight.shape[1:]:
        raise ValueError(
            f"its classifier weighs {source[WEIGHT].shape[1]} features, the job's variant {weight.shape[1]}: "
            "not the same variant"
        )
    if max(rows.values(), default=-1) >= source[WEIGHT].shape[0]:
        raise ValueError(f"its classifier has {source[WEIGHT].shape[0]} rows, fewer than the classes it records")
    target_rows, source_rows = torch.tensor(list(rows)), torch.tensor(list(rows.values()))
    weight[target_rows] = source[WEIGHT][source_rows].to(weight.dtype)
    bias[target_rows] = source[BIAS][source_rows].to(bias.dtype)
    return {WEIGHT: weight, BIAS: bias}


def fitted_state(
    source: dict[str, torch.Tensor], target: torch.nn.Module, head: str, rows: Mapping[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """`source`'s tensors as a whole state_dict of `target`: every tensor the same name and shape, except the
    classifier, which `head: reset` takes from `target` (freshly initialised) and `head: match` too, with the rows
    of the matched classes (`rows`, from `matched_rows`) taken from `source`. ValueError saying what differs."""
    own = target.state_dict()
    if head in ("reset", "match"):
        new_head = {k: v for k, v in own.items() if k.startswith(CLASSIFIER)}
        if head == "match":
            if rows is None:
                raise ValueError("head: match needs the rows of the shared classes (matched_rows)")
            new_head.update(matched_head(source, own, rows))
        source = {k: v for k, v in source.items() if not k.startswith(CLASSIFIER)}
        source.update(new_head)
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


def head_rows(c: Any, mv: Any, target_classes: Sequence[str]) -> dict[int, int]:
    """`matched_rows` of a registered version's recorded classes and the dataset's; ValueError when it records
    none."""
    source_classes = registered_classes(c, mv)
    if source_classes is None:
        raise ValueError(
            f"version {mv.version} records no class ids ({PREPROCESSING_ARTIFACT}'s classes), which head: match "
            "needs: use head: reset"
        )
    return matched_rows(source_classes, target_classes)


def write_init_weights(
    c: Any, init: InitConfig, spec: Any, classes: Sequence[str], seed: int, dest: Path
) -> dict[str, str]:
    """The job's starting weights written to `dest` (kept when already there: a resumed job), for a dataset of
    `classes` (its manifest's: a label is an index into them); returns the lineage tags: `init_from`,
    `models:/NAME/VERSION` of the source, and `init_head`. ValueError naming the problem (no such version, no
    plain weights, a model that does not fit, no class id shared with `head: match`)."""
    mv = resolve_version(c, init.from_)
    lineage = f"models:/{mv.name}/{mv.version}"
    where = f"init.from {init.from_} (v{mv.version}"
    try:
        rows = head_rows(c, mv, classes) if init.head == "match" else None
    except ValueError as exc:
        raise ValueError(f"{where}): {exc}") from None
    tags = {Tags.INIT_FROM: lineage, Tags.INIT_HEAD: init.head}
    if rows is not None:
        tags[Tags.INIT_HEAD] = f"match: {len(rows)} of {len(classes)} classes from the source's rows"
    if dest.exists():
        return tags
    loaded = load_registered_weights(c, mv)
    if loaded is None:
        raise ValueError(f"init.from {init.from_}: version {mv.version} holds no {STATE_DICT_ARTIFACT} to start from")
    torch.manual_seed(seed)  # a new head is the same on every attempt
    target = models.build_model(spec, len(classes))
    try:
        state = fitted_state(loaded[0].state_dict(), target, init.head, rows)
    except ValueError as exc:
        raise ValueError(f"{where}, {loaded[1].name}) for {spec.name}: {exc}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return tags


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """A worker's model set to the job's starting weights (tensors only: read without unpickling)."""
    model.load_state_dict(read_checkpoint(path))
