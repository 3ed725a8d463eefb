"""A model's top-1, top-5 and loss on a split, as training measures them: minival in the loop (`evaluate`, on every
rank, summed across ranks), val of a job's chosen checkpoint and the champion decision's minival in a Ray task on
the cluster (`evaluate_on_cluster` -> `evaluate_split`), and `effnet eval` (`pipelines.inference.evaluation`).
Every path reads through the loader backend the recipe (or the user) names, as training does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from models import VariantSpec
from pipelines.loading import make_loader
from pipelines.loading.transforms import normalize
from pipelines.training.recipe import Recipe


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    channels_last: bool,
    amp: bool,
    per_class: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sums (loss, top-1, top-5, count) over this rank's batches, then across ranks; returns means. `per_class`
    (2 x classes, on `device`), when given, gathers each class's top-1 hits (row 0) and images (row 1)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in batches:
        x = normalize(images.to(device, non_blocking=True), channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits1 = top5[:, 0] == y
        if per_class is not None:
            per_class[0].index_add_(0, y, hits1.to(per_class.dtype))
            per_class[1].index_add_(0, y, torch.ones_like(y, dtype=per_class.dtype))
        # Summed on the device: no host sync per batch (the GPU's queue stays full); read back once at the end.
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                hits1.sum().double(),
                (top5 == y[:, None]).any(dim=1).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no samples: is the split empty?")
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "samples": n}


def evaluate_split(
    model: torch.nn.Module, dataset_dir: str, split: str, resolution: int, crop_ratio: float, recipe: Recipe
) -> dict[str, float]:
    """Evaluate a model on a whole split in one process (on a GPU when there is one), through the loader backend
    the recipe names (`data.backend`), as training and minival do."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if recipe.runtime.channels_last:
        # torch's stubs omit Module.to's memory_format keyword (documented, and what runs).
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    batches = make_loader(
        dataset_dir,
        split,
        resolution,
        recipe.data.eval_batch_size or recipe.data.batch_size,
        backend=recipe.data.backend,
        seed=recipe.seed,
        crop_ratio=crop_ratio,
        num_workers=recipe.data.loader_workers,
    )
    amp = recipe.runtime.amp and device.type == "cuda"
    return evaluate(model, batches, device, recipe.runtime.channels_last, amp=amp)


def evaluate_on_cluster(
    model: torch.nn.Module, dataset_dir: Path, split: str, spec: VariantSpec, recipe: Recipe
) -> dict[str, float]:
    """One split, whole, at the model's own eval resolution and crop, in a Ray task with one worker's resources
    (a GPU on a GPU cluster, where the driver may have none)."""
    import ray

    task = ray.remote(evaluate_split).options(
        num_cpus=recipe.ray.cpus_per_worker, num_gpus=1 if recipe.ray.use_gpu else 0
    )
    return ray.get(task.remote(model, str(dataset_dir), split, spec.eval_resolution, spec.crop_ratio, recipe))
