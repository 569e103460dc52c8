"""Wide residual networks, as used in adversarial training.

Paper: Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146.
The variant here is the PyTorch one of TRADES (yaodongyu/TRADES), GAIRAT ("Wide_ResNet_Madry")
and MMA (BorealisAI/mma_training): pre-activation basic blocks, 1x1 conv shortcut where the shape
changes, widths 16 -> 16k, 32k, 64k, a final BN + ReLU, global average pooling, no dropout.

Two depth conventions exist for the same family; `blocks_per_stage` picks the right one:
- Zagoruyko's: depth = 6n + 4 (counting the three 1x1 shortcut convs), e.g. WRN-28-4 (n=4),
  WRN-34-10 (n=5, TRADES), WRN-16-8 (n=2).
- Madry's: depth = 6n + 2 (not counting them), e.g. WRN-32-10 of GAIRAT (n=5).
So WRN-32-10 and WRN-34-10 are the same network (46.16M parameters for 10 classes).

Parameter counts for 10 classes, 3 input channels: WRN-28-4 5,849,050; WRN-34-10 and WRN-32-10
46,160,474; WRN-16-8 10,961,370.

This is the bare network: it expects *normalised* input. Use
`mixlab.models.build_model("wrn-28-4", ...)`, which puts the `Normalize` layer in front.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def blocks_per_stage(depth: int) -> int:
    """Number of basic blocks per stage for a WRN of the given depth (see the module docstring).

    >>> blocks_per_stage(28), blocks_per_stage(32), blocks_per_stage(34)
    (4, 5, 5)
    """
    if depth >= 10 and (depth - 4) % 6 == 0:
        return (depth - 4) // 6
    if depth >= 8 and (depth - 2) % 6 == 0:
        return (depth - 2) // 6
    raise ValueError(
        f"WideResNet depth {depth} is not 6n+4 (e.g. 16, 22, 28, 34) or 6n+2 (e.g. 32, Madry's "
        f"convention); pick one of those."
    )


class BasicBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv, twice; identity shortcut, or a 1x1 conv on the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in TRADES/MMA: a projection shortcut reads the activated tensor, an identity
        # shortcut the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images.

    Args:
        depth: 6n+4 or 6n+2 (see `blocks_per_stage`).
        widen_factor: width multiplier k; stage widths are 16k, 32k, 64k.
        num_classes: number of output logits.
        in_channels: 3 for colour images, 1 for greyscale.
        drop_rate: dropout between the two convs of a block (0 in all the papers used here).

    Input: (N, in_channels, H, W) normalised images; H = W = 32 in the papers (pooling is
    adaptive, so 28x28 works too). Output: (N, num_classes) logits.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3, drop_rate: float = 0.0):
        super().__init__()
        n = blocks_per_stage(depth)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(n, widths[0], widths[1], stride=1, drop_rate=drop_rate)
        self.block2 = self._stage(n, widths[1], widths[2], stride=2, drop_rate=drop_rate)
        self.block3 = self._stage(n, widths[2], widths[3], stride=2, drop_rate=drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

        # The reference code's initialisation: He-normal with fan_out for convs, BN at (1, 0),
        # zero linear bias (the linear weight keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        # Equals the reference avg_pool2d(out, 8) on 32x32 inputs; also works on 28x28.
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))
