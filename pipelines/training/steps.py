"""The pieces of one training step, each a small function of its inputs: the optimizer (weight decay by rank), BN
momentum, the EMA update, a batch made ready on the device (normalised, augmented, mixed), gradients accumulated over
micro-batches, and the per-epoch and per-step seeding that makes a resumed epoch draw what an uninterrupted one
would. `loop` puts them together.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.loading.transforms import normalize
from pipelines.seeds import Stream, mix_seed
from pipelines.training import augment
from pipelines.training.recipe import Recipe
from pipelines.training.schedules import EpochSettings


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only: BN scales/shifts and biases (ndim < 2) are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = recipe.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "rmsprop":
        # TF adds eps inside the square root and PyTorch outside; with eps=1e-3 the two differ only for tiny
        # second moments, which is where eps matters least. `alpha` is TF's `decay`.
        return torch.optim.RMSprop(groups, lr=0.0, alpha=o.rmsprop_decay, eps=o.eps, momentum=o.momentum)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=0.0, eps=1e-8)


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


@torch.no_grad()
def average_bn_statistics(*modules: torch.nn.Module) -> None:
    """Every rank's BN running means and variances replaced by their mean over the ranks (nothing on one rank).

    Under DDP each rank's running statistics take in its own last batches, so ranks that score their shares of
    minival with their own statistics score a model no rank holds: the figure early stopping keeps was not the
    checkpoint's (measured: 45.0 against 53.75 when the saved checkpoint was scored alone). Averaged, every rank
    holds the statistics of more batches, and rank 0's checkpoint holds what was scored."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    stats = [
        buffer
        for module in modules
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for buffer in (m.running_mean, m.running_var)
        if buffer is not None
    ]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    torch.distributed.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(stats, [p.view_as(s) for p, s in zip(flat.split([s.numel() for s in stats]), stats)])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Weights: ema = decay * ema + (1 - decay) * model. Buffers (BN running statistics) are copied, not averaged
    (the TF reference averages them too): they are a running average already, and the EMA weights are scored
    with the statistics the model has now."""
    # One fused kernel per group of tensors (torch._foreach_*), not one per parameter: B0 has ~300 tensors, and
    # on a GPU the per-tensor launches of a Python loop leave it idle for longer than B0's step takes.
    ema_params: list[torch.Tensor] = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)


def prepare_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    settings: EpochSettings,
    num_classes: int,
    channels_last: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch on the device -> augmented, normalised input and soft targets (smoothing, mixup/cutmix)."""
    if recipe.augment.translate:
        images = augment.random_translate(images, recipe.augment.translate, generator)
    if recipe.augment.policy == "randaugment":
        images = augment.rand_augment(images, settings.randaug_magnitude, recipe.augment.randaug_ops, generator)
    elif recipe.augment.policy == "autoaugment":
        images = augment.auto_augment(images, generator)
    x = normalize(images, channels_last)
    return augment.mix_batch(
        x,
        labels,
        num_classes,
        settings.mixup_alpha,
        settings.cutmix_alpha,
        recipe.regularization.label_smoothing,
        generator,
    )


def accumulate_gradients(
    net: torch.nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: Recipe,
    settings: EpochSettings,
    num_classes: int,
    device: torch.device,
    amp: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """Forward and backward over one step's micro-batches, each loss divided by their number, so the gradients
    add up to those of their concatenation (equal micro-batches; batch norm normalises each micro-batch on its
    own, as it does each GPU's share). Under DDP only the last backward all-reduces (`no_sync` before it).
    Returns (the summed per-image loss on the device, the images)."""
    batches = list(micro_batches)
    loss_sum, images = torch.zeros((), dtype=torch.float64, device=device), 0
    no_sync = getattr(getattr(net, "_orig_mod", net), "no_sync", None)  # DDP's, under torch.compile too
    for k, (uint8_images, labels) in enumerate(batches):
        x, targets = prepare_batch(
            uint8_images.to(device, non_blocking=True),
            labels.to(device, non_blocking=True),
            recipe,
            settings,
            num_classes,
            recipe.runtime.channels_last,
            generator,
        )
        with no_sync() if no_sync is not None and k < len(batches) - 1 else nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), targets)
            (loss / len(batches)).backward()
        loss_sum += loss.detach().double() * len(labels)
        images += len(labels)
    return loss_sum, images


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Python's, numpy's and torch's global generators from (seed, epoch, rank): a resumed epoch draws what an
    uninterrupted one would."""
    s = mix_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def seed_step(seed: int, epoch: int, batch: int, rank: int, augment_generator: torch.Generator) -> None:
    """torch's global generators (dropout, stochastic depth; CPU and CUDA) and the batch augmentations' generator
    for one step, from (seed, epoch, batch, rank): a step draws the same whatever ran before it in the process
    (a mid-epoch resume, a DataLoader drawing its workers' base seed)."""
    torch.manual_seed(mix_seed(seed, Stream.STEP, epoch, batch, rank))
    augment_generator.manual_seed(mix_seed(seed, Stream.AUGMENT, epoch, batch, rank))
