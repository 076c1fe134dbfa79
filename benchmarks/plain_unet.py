"""The nnU-Net reference network for the training benchmark: PlainConvUNet as nnU-Net 3d_fullres builds it.

This mirrors ``dynamic_network_architectures.architectures.unet.PlainConvUNet`` (the package nnU-Net v2
builds its networks with), which is not installed on the GPU machine, for the 3d_fullres plan at 128³:
6 stages of widths [32, 64, 128, 256, 320, 320], strides [1, 2, 2, 2, 2, 2], kernel 3 everywhere,
2 × (Conv3d(bias) → InstanceNorm3d(affine, eps 1e-5) → LeakyReLU(0.01)) per encoder and decoder stage,
downsampling by the first (strided) conv of a stage, upsampling by a transposed conv with kernel = stride,
skip concatenation, and a 1×1×1 segmentation head. Deep supervision (nnU-Net's extra 1×1×1 heads on the
four coarser decoder outputs) is left out: it adds well under 0.1 % of the FLOPs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NNUNET_3D_FULLRES_FEATURES = (32, 64, 128, 256, 320, 320)
NNUNET_3D_FULLRES_STRIDES = (1, 2, 2, 2, 2, 2)


class ConvNormAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True),
            nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class StackedConvBlocks(nn.Sequential):
    """``n`` ConvNormAct; the first one carries the stride (dynamic_network_architectures layout)."""

    def __init__(self, n: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            *(
                ConvNormAct(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                for i in range(n)
            )
        )


class PlainConvUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        features: tuple[int, ...] = NNUNET_3D_FULLRES_FEATURES,
        strides: tuple[int, ...] = NNUNET_3D_FULLRES_STRIDES,
        convs_per_stage: int = 2,
    ) -> None:
        super().__init__()
        if len(features) != len(strides):
            raise ValueError("features and strides need one entry per stage")
        self.encoder = nn.ModuleList()
        width = in_channels
        for out, stride in zip(features, strides, strict=True):
            self.encoder.append(StackedConvBlocks(convs_per_stage, width, out, stride))
            width = out
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(features) - 1, 0, -1):
            below, skip, stride = features[level], features[level - 1], strides[level]
            self.upsample.append(nn.ConvTranspose3d(below, skip, stride, stride=stride, bias=True))
            self.decoder.append(StackedConvBlocks(convs_per_stage, 2 * skip, skip))
        self.head = nn.Conv3d(features[0], num_classes, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, stage in zip(self.upsample, self.decoder, strict=True):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
