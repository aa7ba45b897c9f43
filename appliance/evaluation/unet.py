"""The small segmentation UNet every generator's training set is judged with.

Deliberately plain: four resolution levels, two 3x3 conv + BatchNorm + ReLU per level, transposed
convolutions to upsample (their gradients are deterministic on CUDA, unlike bilinear
interpolation's) and skip concatenation, one logit per pixel. It is the same network, with the same
width, for every generator, so differences in the table come from the training data alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """Input (N, 3, H, W) in [0, 1]; output (N, 1, H, W) logits. H and W divisible by 2**depth."""

    def __init__(self, width: int = 16, depth: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(_block(cin, w))
            cin = w
        self.bottom = _block(widths[-2], widths[-1])
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            self.upsample.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.up.append(_block(2 * widths[i], widths[i]))
        self.head = nn.Conv2d(widths[0], 1, 1)
        # Start from the prior that about 1 % of pixels are defective (as RetinaNet does for
        # focal loss): training then spends its steps on finding defects, not on learning
        # that most of the image is background.
        nn.init.constant_(self.head.bias, -4.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the input so that BatchNorm in the first block sees a balanced signal.
        x = x * 2.0 - 1.0
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            x = block(torch.cat([upsample(x), skip], dim=1))
        # The 1x1 head runs in float32 even under bfloat16 autocast: bfloat16 logits carry only
        # 8 bits of mantissa, which would turn millions of pixel scores into ties.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (DRAEM trains its segmentation head with focal loss, gamma 2).

    Defect pixels are a few percent of an image; the focal term keeps the easy background from
    dominating the gradient.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return ((1.0 - p_true) ** gamma * bce).mean()
