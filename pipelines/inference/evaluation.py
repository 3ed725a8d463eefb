"""`effnet eval`: a trained model (`pipelines.registry.model_ref`) evaluated on a split of a staged dataset
version, with the model's own eval preprocessing (its variant's resolution and crop ratio), through the loader
backend the user picks; top-1, top-5, loss and, on request, each class's top-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.dataset import EVAL_SPLITS, read_manifest
from pipelines.loading import make_loader
from pipelines.registry.model_ref import LoadedModel, ModelError
from pipelines.training.evaluate import evaluate


def evaluate_model(
    loaded: LoadedModel,
    dataset_dir: str | Path,
    split: str = "val",
    backend: str = "wds",
    batch_size: int = 64,
    per_class: bool = False,
    loader_workers: int = 0,
) -> dict[str, Any]:
    """The model's figures on one whole split, as plain data (what `effnet eval` writes as JSON)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVAL_SPLITS)}, not {split!r}")
    manifest = read_manifest(dataset_dir)
    classes = manifest.classes
    if len(classes) != loaded.num_classes:
        raise ModelError(
            f"{loaded.source} has {loaded.num_classes} classes, the dataset {manifest.version} "
            f"{len(classes)}: evaluate it on a version with its classes (or fine-tune it with a new head)"
        )
    spec = loaded.spec
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = make_loader(
        dataset_dir,
        split,
        spec.eval_resolution,
        batch_size,
        backend=backend,
        crop_ratio=spec.crop_ratio,
        num_workers=loader_workers,
    )
    counts = torch.zeros(2, len(classes), dtype=torch.float64, device=device) if per_class else None
    m = evaluate(loaded.model.to(device), batches, device, channels_last=False, amp=False, per_class=counts)
    out: dict[str, Any] = {
        "model": loaded.source,
        "variant": spec.name,
        "dataset": manifest.version,
        "split": split,
        "backend": backend,
        "resolution": spec.eval_resolution,
        "crop_ratio": spec.crop_ratio,
        "samples": int(m["samples"]),
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
    }
    if counts is not None:
        hits, seen = counts.cpu().tolist()
        out["per_class_top1"] = {c: (100 * h / n if n else None) for c, h, n in zip(classes, hits, seen)}
    return out


def log_evaluation(tracking_uri: str, artifact_root: str | None, result: dict[str, Any], run_id: str | None) -> str:
    """The evaluation as an MLflow run of its own (run_kind "eval", tags naming the model and the dataset), its
    figures as `<split>_top1` ..., the whole result as `eval/result.json`; the run's id."""
    from pipelines.registry import tracking
    from pipelines.registry.tracking import Tags

    c = tracking.client(tracking_uri)
    exp = tracking.experiment_id(c, artifact_root)
    split = result["split"]
    tags = {
        Tags.RUN_KIND: "eval",
        "eval.model": result["model"],
        Tags.DATASET_VERSION: result["dataset"],
        Tags.VARIANT: result["variant"],
        **({"eval.source_run": run_id} if run_id else {}),
    }
    eval_run = tracking.start_run(
        c,
        exp,
        f"eval {result['variant']} on {result['dataset']} {split}",
        {k: result[k] for k in ("model", "split", "backend", "resolution", "crop_ratio")},
        tags,
    )
    tracking.log_metrics(c, eval_run, {f"{split}_{k}": result[k] for k in ("top1", "top5", "loss")}, step=0)
    tracking.log_dict(c, eval_run, result, "eval/result.json")
    c.set_terminated(eval_run, "FINISHED")
    return eval_run
