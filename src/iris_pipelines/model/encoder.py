"""The 3-D residual U-Net: encoder and the decoder stages that climb back to full resolution.

Paper supplement: "3D UNet with residual connections, comprising four downsampling stages with a base
channel dimension of 32", trained from scratch. Layout as in MASS ``modules/encoder.py`` and
``decoder.py``: a 3×3×3 stem conv, pre-activation residual blocks, max-pool downsampling; the decoder
upsamples trilinearly, concatenates the skip and runs residual blocks.

The encoder is shared by reference and query. The decoder stages are assembled, interleaved with the
token fusion blocks, by :class:`~iris_pipelines.model.mask_decoder.MaskDecoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import residual_stack
from .config import IrisConfig


class ResidualUNetEncoder(nn.Module):
    """Stem + one residual stack per level; returns the features of every level, full resolution first."""

    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        ch, act, eps = config.channels, config.activation, config.norm_eps
        self.stem = nn.Conv3d(config.in_channels, ch[0], 3, padding=1, bias=False)
        self.levels = nn.ModuleList(
            residual_stack(ch[max(i - 1, 0)], ch[i], config.encoder_blocks[i], act, eps)
            for i in range(len(ch))
        )

    def forward(self, image: Tensor) -> list[Tensor]:
        features = []
        x = self.stem(image)
        for i, level in enumerate(self.levels):
            if i > 0:
                x = F.max_pool3d(x, 2)
            x = level(x)
            features.append(x)
        return features


class UpStage(nn.Module):
    """Trilinear ×2 upsampling, concatenation with the skip, then residual blocks."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, blocks: int, config: IrisConfig
    ):
        super().__init__()
        self.blocks = residual_stack(
            in_channels + skip_channels, out_channels, blocks, config.activation, config.norm_eps
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.blocks(torch.cat([x, skip], dim=1))


def build_up_stages(config: IrisConfig) -> nn.ModuleList:
    """Decoder stages from the bottleneck up: stage i maps level ``stages - i`` to ``stages - i - 1``."""
    ch = config.channels
    return nn.ModuleList(
        UpStage(ch[level + 1], ch[level], ch[level], config.decoder_blocks[i], config)
        for i, level in enumerate(reversed(range(config.stages)))
    )
