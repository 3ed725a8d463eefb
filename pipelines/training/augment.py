"""Batch augmentations applied on the device, identically whatever loader produced the batch.

Loaders deliver RandomResizedCrop + flip as uint8 NCHW; everything else happens here on the whole batch:
RandAugment (magnitude set per progressive stage), the AutoAugment ImageNet policy (`augment.policy:
autoaugment`; the `v1` recipe turns it on, as the V1 paper trains), and mixup/cutmix (alpha set per stage) on the
normalised floats with soft targets.

Magnitudes follow the TF reference: level in [0, 10] maps linearly onto each op's range (a magnitude above
10 (V2-L's final RandAugment magnitude is 20-25) extrapolates past the nominal maximum, as automl does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0
FILL = 128.0  # grey, as the TF reference fills uncovered pixels after geometric ops


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """a + factor * (b - a), per sample; factor > 1 extrapolates (as PIL's ImageEnhance does)."""
    return (a + factor.view(-1, 1, 1, 1) * (b - a)).clamp(0, 255)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    g = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return g.unsqueeze(1).expand_as(x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-sample 2x3 affine maps (in normalised coordinates), filling with grey."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = out[:, :3], out[:, 3:]
    return img + (1 - mask) * FILL


def _signs(n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=g, device=device) < 0.5, -1.0, 1.0)


def _enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


# Each op: (batch float [n,3,h,w] in 0..255, level, generator) -> batch.
def identity(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return x


def auto_contrast(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


def equalize(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    """Histogram equalisation per image and channel, vectorised with one bincount over the batch."""
    n, c, h, w = x.shape
    v = x.round().clamp(0, 255).long().view(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device).view(-1, 1) * 256
    hist = torch.bincount((v + offsets).view(-1), minlength=n * c * 256).view(n * c, 256).float()
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    denom = (h * w - cdf_min).clamp(min=1)
    lut = ((cdf - cdf_min) / denom * 255).clamp(0, 255)
    flat = (h * w - cdf_min) <= 0  # a constant channel stays as it is
    out = torch.gather(lut, 1, v)
    out = torch.where(flat, v.float(), out)
    return out.view(n, c, h, w)


def rotate(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    angle = _signs(len(x), g, x.device) * math.radians(level / MAX_LEVEL * 30)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def shear_x(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    s = _signs(len(x), g, x.device) * level / MAX_LEVEL * 0.3
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    theta = torch.stack([torch.stack([one, s, zero], 1), torch.stack([zero, one, zero], 1)], 1)
    return _affine(x, theta)


def shear_y(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    s = _signs(len(x), g, x.device) * level / MAX_LEVEL * 0.3
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    theta = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([s, one, zero], 1)], 1)
    return _affine(x, theta)


def translate_x(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    # TF translates up to 100 px at 224 px: a fraction 100/224 of the width, as 2x that in [-1, 1] coordinates.
    t = _signs(len(x), g, x.device) * level / MAX_LEVEL * (100 / 224) * 2
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    theta = torch.stack([torch.stack([one, zero, t], 1), torch.stack([zero, one, zero], 1)], 1)
    return _affine(x, theta)


def translate_y(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    t = _signs(len(x), g, x.device) * level / MAX_LEVEL * (100 / 224) * 2
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    theta = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, one, t], 1)], 1)
    return _affine(x, theta)


def solarize(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    threshold = 256 - level / MAX_LEVEL * 256
    return torch.where(x >= threshold, 255 - x, x)


def posterize(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    bits = max(1, 8 - int(level / MAX_LEVEL * 4))
    shift = 8 - bits
    return ((x.round().clamp(0, 255).long() >> shift) << shift).float()


def color(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    f = torch.full((len(x),), _enhance_factor(level), device=x.device)
    return _blend(_grayscale(x), x, f)


def contrast(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    f = torch.full((len(x),), _enhance_factor(level), device=x.device)
    return _blend(mean, x, f)


def brightness(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    f = torch.full((len(x),), _enhance_factor(level), device=x.device)
    return _blend(torch.zeros_like(x), x, f)


def sharpness(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    blurred = F.conv2d(x, kernel.expand(3, 1, 3, 3), padding=1, groups=3)
    blurred[:, :, [0, -1], :] = x[:, :, [0, -1], :]  # PIL leaves the border untouched
    blurred[:, :, :, [0, -1]] = x[:, :, :, [0, -1]]
    f = torch.full((len(x),), _enhance_factor(level), device=x.device)
    return _blend(blurred, x, f)


Op = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
RANDAUGMENT_OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Posterize": posterize,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
}


def rand_augment(
    images: torch.Tensor, magnitude: float, num_ops: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandAugment on a uint8 NCHW batch: each image gets `num_ops` ops drawn uniformly, at `magnitude`."""
    if magnitude <= 0 or num_ops <= 0:
        return images
    g = generator or torch.Generator(device=images.device).manual_seed(0)
    x = images.float()
    names = list(RANDAUGMENT_OPS)
    for _ in range(num_ops):
        choice = torch.randint(len(names), (len(x),), generator=g, device=x.device)
        for k, name in enumerate(names):
            idx = (choice == k).nonzero(as_tuple=True)[0]
            if len(idx):
                x[idx] = RANDAUGMENT_OPS[name](x[idx], magnitude, g)
    return x.round().clamp(0, 255).to(torch.uint8)


# The AutoAugment ImageNet policy (Cubuk et al. 2019, Table 9 / the TF reference "v0"): 25 sub-policies of
# two (op, probability, level) steps; one sub-policy is drawn per image.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


def invert(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return 255 - x


def solarize_add(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    added = (x + level / MAX_LEVEL * 110).clamp(0, 255)
    return torch.where(x < 128, added, x)


AUTOAUGMENT_OPS: dict[str, Op] = {**RANDAUGMENT_OPS, "Invert": invert, "SolarizeAdd": solarize_add}


def auto_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The AutoAugment ImageNet policy on a uint8 NCHW batch."""
    g = generator or torch.Generator(device=images.device).manual_seed(0)
    x = images.float()
    policy = torch.randint(len(IMAGENET_POLICY), (len(x),), generator=g, device=x.device)
    for p, steps in enumerate(IMAGENET_POLICY):
        for name, prob, level in steps:
            apply = (policy == p) & (torch.rand(len(x), generator=g, device=x.device) < prob)
            idx = apply.nonzero(as_tuple=True)[0]
            if len(idx):
                x[idx] = AUTOAUGMENT_OPS[name](x[idx], float(level), g)
    return x.round().clamp(0, 255).to(torch.uint8)


def random_translate(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of a batch (N, C, H, W, any dtype) shifted by whole pixels, drawn uniformly from
    [-fraction x side, +fraction x side] on each axis; the border it uncovers is 0 (black for uint8). A
    whole-pixel shift moves pixels without resampling them: what padding by k and a random crop back to the
    size gives (the CIFAR-style translation)."""
    n, _, h, w = images.shape
    max_y, max_x = round(fraction * h), round(fraction * w)
    if n == 0 or max_y == max_x == 0:
        return images
    device = images.device
    dy = torch.randint(-max_y, max_y + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(-max_x, max_x + 1, (n, 1), generator=generator, device=device)
    padded = F.pad(images, (max_x, max_x, max_y, max_y))
    # Output pixel (y, x) of image i is padded pixel (y + max_y - dy_i, x + max_x - dx_i).
    rows = torch.arange(h, device=device) + max_y - dy  # N x H
    cols = torch.arange(w, device=device) + max_x - dx  # N x W
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def mix_batch(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    label_smoothing: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one per batch, chosen evenly when both are on) with smoothed soft targets.

    Returns (mixed images, targets [n, num_classes]); with both alphas at 0 the images are unchanged and the
    targets are the smoothed one-hot labels.
    """
    g = generator or torch.Generator(device=x.device).manual_seed(0)
    off = label_smoothing / num_classes
    targets = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + off
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return x, targets
    if use_mixup and use_cutmix:
        use_mixup = bool(torch.rand(1, generator=g, device=x.device).item() < 0.5)
    alpha = mixup_alpha if use_mixup else cutmix_alpha
    lam = _beta(alpha, g)
    perm = torch.randperm(len(x), generator=g, device=x.device)
    if use_mixup:
        mixed = x * lam + x[perm] * (1 - lam)
    else:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=g, device=x.device))
        cx = int(torch.randint(w, (1,), generator=g, device=x.device))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    return mixed, targets * lam + targets[perm] * (1 - lam)


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) from the generator's stream (two gammas via their ratio), so draws are seeded."""
    # Joehnk's rejection method: exact for any alpha > 0 and driven only by uniform draws from `g`.
    while True:
        u = torch.rand(2, generator=g, device=g.device).tolist()
        x, y = u[0] ** (1 / alpha), u[1] ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)
