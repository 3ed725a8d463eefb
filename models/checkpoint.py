"""Checkpoint files of this project read back without unpickling, and the model they describe rebuilt.

A checkpoint holds tensors and plain data only, read with `torch.load(weights_only=True)`: a file holding pickled
objects is refused (unpickling runs whatever code the file names). Three layouts are known:
- a registered version's weights (`checkpoint/state_dict.pt` on its run): {"state_dict", "model_args"};
- a training checkpoint (a job's `checkpoint.pt`, a scaling trial's `best.pt`): {"model", "ema", "model_args",
  ...}; its EMA weights when it kept an EMA (what training scored and chose, `scored_weights`);
- a fine-tuning job's starting weights (`<job>.init.pt`, `pipelines.training.warm_start`): a bare state_dict.
`model_args` is the variant's name, its overrides and its classes: enough to rebuild it through this package.
Every checkpoint file of the project is read here (`read_checkpoint`). Depends on torch only (it travels with the
registered MLflow model, `pipelines/registry/served_model.py`).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .efficientnet import build_model
from .overrides import resolve_variant
from .variants import VariantSpec


class ModelError(ValueError):
    """A model reference that names nothing, or a file that is not the checkpoint it claims to be."""


def _reason(exc: BaseException) -> str:
    """The line of an exception's text that says what is wrong (torch puts it after a header line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0]) if lines else type(exc).__name__


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file's contents, tensors and plain data only, its tensors on `device`; ModelError for a file
    that holds pickled objects (not loaded: unpickling runs whatever code the file names) or is no checkpoint."""
    try:
        saved = torch.load(Path(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler names the global (a class, a function) it refused to load; any other
        # unpickling error ("Unsupported operand") is a file that is not a checkpoint at all.
        if "unsupported global" in str(exc).lower():
            raise ModelError(
                f"{path}: not a plain checkpoint: it holds pickled objects, which are never loaded "
                "(only tensors and plain data are)"
            ) from None
        raise ModelError(f"{path}: not a checkpoint file ({_reason(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a checkpoint file ({type(exc).__name__}: {_reason(exc)})") from None
    if not isinstance(saved, dict):
        raise ModelError(f"{path}: not a checkpoint: it holds a {type(saved).__name__}, not a dict of weights")
    return saved


def scored_weights(saved: Mapping[str, Any]) -> Any:
    """The weights training scores on minival and chooses a checkpoint by: the EMA's when it kept an EMA, else the
    model's. `saved` is a training checkpoint's contents, or a training worker's live {"model", "ema"}."""
    ema = saved.get("ema")
    return ema if ema is not None else saved["model"]


def model_from_checkpoint(saved: dict[str, Any], where: str) -> tuple[torch.nn.Module, VariantSpec, int]:
    """The model a checkpoint's contents describe, its weights loaded (eval mode); ModelError saying what is
    missing or does not fit."""
    if "state_dict" in saved:
        weights = saved["state_dict"]
    elif "model" in saved:
        weights = scored_weights(saved)
    else:
        raise ModelError(
            f"{where}: holds no weights ('state_dict', or a training checkpoint's 'model'); keys: "
            f"{', '.join(sorted(map(str, saved))) or 'none'}"
        )
    args = dict(saved.get("model_args") or {})
    if "name" not in args or "num_classes" not in args:
        raise ModelError(f"{where}: holds no model_args (the variant and its classes) to rebuild the model from")
    name, num_classes = args.pop("name"), int(args.pop("num_classes"))
    try:
        spec = resolve_variant(name, **args)
        model = build_model(spec, num_classes)
    except ValueError as exc:
        raise ModelError(f"{where}: its model_args do not describe a model: {exc}") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelError(f"{where}: its weights are not a dict of tensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelError(
            f"{where}: its weights do not fit {spec.name} with {num_classes} classes: {_reason(exc)}"
        ) from None
    return model.eval(), spec, num_classes
