"""Building blocks of the EfficientNet families: conv-BN-SiLU, squeeze-excitation, drop-path, MBConv,
Fused-MBConv. Shapes in comments are (batch, channels, height, width)."""

from __future__ import annotations

import torch
from torch import nn

# The reference code is TensorFlow: BN epsilon 1e-3 and moving-average decay 0.99. PyTorch's momentum
# is the weight of the *new* batch statistic, so decay 0.99 is momentum 0.01.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class ConvBNAct(nn.Sequential):
    """kxk conv (no bias: BN follows) -> BatchNorm -> SiLU (or no activation for projections)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        # Symmetric padding (k-1)/2: same output size as TF "SAME" for the odd kernels used here.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.SiLU(inplace=True) if activation else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    """Channel gating: global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid -> scale the input."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * torch.sigmoid(scale)


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a residual branch for a random subset of samples (each
    with probability `rate`) and scale the survivors by 1 / (1 - rate), so eval needs no rescaling.

    `rate` is a plain attribute so it can be changed on a built model.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


def _squeeze_width(in_channels: int, se_ratio: float) -> int:
    # Squeeze width is a fraction of the block's *input* width (not the expanded width).
    return max(1, int(in_channels * se_ratio))


class _ResidualBlock(nn.Module):
    """Shared tail: `body(x)`, plus the input (through drop-path) when shapes allow a residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_path_rate: float) -> None:
        super().__init__()
        self.has_residual = stride == 1 and in_channels == out_channels
        # Only residual blocks can be dropped; the others keep an inert DropPath so every block has
        # one and rates can be set by block index.
        self.drop_path = DropPath(drop_path_rate if self.has_residual else 0.0)
        self.body: nn.Sequential

    def set_drop_path_rate(self, rate: float) -> None:
        self.drop_path.rate = float(rate) if self.has_residual else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.has_residual:
            out = x + self.drop_path(out)
        return out


class MBConv(_ResidualBlock):
    """Inverted residual: 1x1 expand -> kxk depthwise (stride) -> SE -> 1x1 project (linear)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        se_ratio: float,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, drop_path_rate)
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden))
        if se_ratio > 0:
            layers.append(SqueezeExcite(hidden, _squeeze_width(in_channels, se_ratio)))
        layers.append(ConvBNAct(hidden, out_channels, 1, activation=False))
        self.body = nn.Sequential(*layers)


class FusedMBConv(_ResidualBlock):
    """V2's early-stage block: the 1x1 expand and kxk depthwise of MBConv fused into one kxk conv,
    then a 1x1 projection. With expand 1 it is a single kxk conv-BN-SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        se_ratio: float,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, drop_path_rate)
        layers: list[nn.Module] = []
        if expand == 1:
            layers.append(ConvBNAct(in_channels, out_channels, kernel, stride))
            if se_ratio > 0:
                layers.append(SqueezeExcite(out_channels, _squeeze_width(in_channels, se_ratio)))
        else:
            hidden = in_channels * expand
            layers.append(ConvBNAct(in_channels, hidden, kernel, stride))
            if se_ratio > 0:
                layers.append(SqueezeExcite(hidden, _squeeze_width(in_channels, se_ratio)))
            layers.append(ConvBNAct(hidden, out_channels, 1, activation=False))
        self.body = nn.Sequential(*layers)


# The concrete classes, not `type[_ResidualBlock]`: the builder calls them with the blocks' own signature.
BLOCKS: dict[str, type[MBConv] | type[FusedMBConv]] = {"mbconv": MBConv, "fused_mbconv": FusedMBConv}
