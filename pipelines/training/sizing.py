"""How many images each worker's device holds at once, and how many micro-batches make the recipe's batch.

The recipe's `data.batch_size` (per worker, per optimizer step) sets the global batch and so the learning rate;
it does not have to fit in a device at once. `memory_model` estimates a variant's training memory at its
largest training resolution: what does not grow with the batch (weights, gradients, optimizer slots, the EMA)
and what each image adds (the activations autograd keeps for the backward pass, counted by running the forward
pass on the meta device: no memory allocated, no arithmetic done, about a second even for B7 at 600 px).
`plan_batches` then picks the largest micro-batch that divides the recipe's batch and fits the recipe's
per-worker budget (`ray.device_memory_gb`) with headroom for what the model leaves out (cuDNN workspaces, the
backward pass's transient gradients, allocator fragmentation), and accumulates gradients over
`batch_size / micro_batch` micro-batches per step, so the step is the recipe's whatever the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks

import models
from models.summary import count_params, meta_model
from pipelines.training.recipe import Recipe
from pipelines.training.schedules import epoch_settings

GIB = 2**30


# The share of the budget planned for; the rest is left for what the activation count leaves out. 0.8 is the usual
# rule of thumb for PyTorch's caching allocator: a GPU's measured peak per image is what should refine it.
HEADROOM = 0.8


# Optimizer state per parameter, in parameter-sized slots: RMSProp's square average and momentum, SGD's momentum,
# AdamW's two moments.
OPTIMIZER_SLOTS = {"rmsprop": 2, "sgd": 1, "adamw": 2}


class SizingError(ValueError):
    """A variant that cannot train even one image per worker in the recipe's memory budget."""


@dataclass(frozen=True)
class MemoryModel:
    """Training memory of one worker: `fixed_bytes + per_image_bytes * micro_batch`."""

    fixed_bytes: int  # weights, gradients, optimizer slots and EMA (fp32), and batch-independent activations
    per_image_bytes: int  # activations kept for backward, per image, at the training resolution

    def bytes_at(self, micro_batch: int) -> int:
        return self.fixed_bytes + self.per_image_bytes * micro_batch


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # per worker and optimizer step: the recipe's
    micro_batch: int  # images per forward and backward pass
    accumulation: int  # micro-batches per optimizer step: batch_size = micro_batch * accumulation
    estimated_gb: float | None  # the memory model at micro_batch (None: not sized, no budget given)

    def as_params(self) -> dict[str, str]:
        """The resolved sizes as MLflow params."""
        return {
            "sizing.micro_batch": str(self.micro_batch),
            "sizing.accumulation": str(self.accumulation),
            "sizing.estimated_gb_per_worker": "none" if self.estimated_gb is None else f"{self.estimated_gb:.2f}",
        }


def saved_activation_bytes(model: torch.nn.Module, batch: int, resolution: int, dtype: torch.dtype) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward pass of `model` (built on the meta
    device), each storage counted once."""
    x = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()  # the storage's own address: views of one tensor share it
        return t

    with saved_tensors_hooks(keep, lambda t: t):
        out = model.train()(x)
    del out
    return sum(storages.values())


def memory_model(
    spec: models.VariantSpec, num_classes: int, resolution: int, amp: bool, optimizer: str, ema: bool
) -> MemoryModel:
    """The variant's training memory at `resolution`. Under bf16 autocast the saved activations are bf16, so the
    count runs in bf16; weights, gradients, optimizer state and EMA stay fp32."""
    dtype = torch.bfloat16 if amp else torch.float32
    model = meta_model(spec, num_classes)
    params = count_params(model)
    # torch's stubs omit Module.to's memory_format keyword (documented, and what runs).
    model = model.to(dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]
    one, two = (saved_activation_bytes(model, b, resolution, dtype) for b in (1, 2))
    per_image = two - one
    states = 2 + OPTIMIZER_SLOTS[optimizer] + (1 if ema else 0)  # weights, gradients, optimizer slots, EMA
    return MemoryModel(fixed_bytes=4 * params * states + (one - per_image), per_image_bytes=per_image)


def plan_batches(
    batch_size: int, model: MemoryModel | None, budget_gb: float | None, what: str, micro_batch: int | None = None
) -> BatchPlan:
    """The largest micro-batch that divides `batch_size` and fits `budget_gb` (with HEADROOM), or the one given.

    Without a budget (or a model) the batch is taken whole. `what` names the variant and resolution in errors.
    """
    if micro_batch is not None:
        if batch_size % micro_batch:
            raise SizingError(
                f"{what}: data.micro_batch_size {micro_batch} does not divide data.batch_size {batch_size}"
            )
        return _plan(batch_size, micro_batch, model)
    if budget_gb is None or model is None:
        return _plan(batch_size, batch_size, model)
    usable = HEADROOM * budget_gb * GIB
    fits = math.floor((usable - model.fixed_bytes) / model.per_image_bytes)
    if fits < 1:
        raise SizingError(
            f"{what} needs {model.bytes_at(1) / GIB:.1f} GB for one image per worker ({model.fixed_bytes / GIB:.1f} "
            f"GB of weights and optimizer state, {model.per_image_bytes / GIB:.2f} GB of activations per image); "
            f"the recipe allows {budget_gb:g} GB (ray.device_memory_gb), {HEADROOM:.0%} of it planned for"
        )
    micro = max(d for d in range(1, min(fits, batch_size) + 1) if batch_size % d == 0)
    return _plan(batch_size, micro, model)


def _plan(batch_size: int, micro_batch: int, model: MemoryModel | None) -> BatchPlan:
    estimated = None if model is None else round(model.bytes_at(micro_batch) / GIB, 3)
    return BatchPlan(batch_size, micro_batch, batch_size // micro_batch, estimated)


def size_job(recipe: Recipe, spec: models.VariantSpec, num_classes: int) -> BatchPlan:
    """The job's micro-batch and accumulation, sized at its largest training resolution (progressive learning's
    last stage); SizingError when not one image fits."""
    resolution = max(epoch_settings(e, recipe, spec).image_size for e in range(recipe.schedule.epochs))
    budget = recipe.ray.device_memory_gb
    model = None
    if budget is not None and recipe.data.micro_batch_size is None:
        model = memory_model(
            spec,
            num_classes,
            resolution,
            amp=recipe.runtime.amp and recipe.ray.use_gpu,
            optimizer=recipe.optim.optimizer,
            ema=recipe.regularization.ema_decay is not None,
        )
    return plan_batches(
        recipe.data.batch_size, model, budget, f"{spec.name} at {resolution} px", recipe.data.micro_batch_size
    )
