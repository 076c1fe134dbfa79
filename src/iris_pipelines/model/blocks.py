"""Small building blocks: convolutional residual blocks, 3-D pixel shuffle, pre-norm attention layers.

Composite blocks (the task-query block, the bidirectional fusion block) are assembled from these in the
files that use them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def make_activation(name: str) -> nn.Module:
    """The convolutional activation: LeakyReLU(0.01) as nnU-Net, or ReLU as MASS."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def norm_act(channels: int, activation: str, eps: float) -> nn.Sequential:
    """InstanceNorm → activation, the pre-activation of a residual block.

    Instance norm because batches are small (a few 128³ crops per GPU) and intensities differ between
    modalities and scanners; nnU-Net and MASS both use it.
    """
    return nn.Sequential(nn.InstanceNorm3d(channels, eps=eps, affine=True), make_activation(activation))


class ResidualBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): (IN → act → Conv3³) × 2 plus a shortcut.

    The shortcut is the identity, or a bias-free 1×1×1 projection when the width changes (MASS uses a
    3×3×3 conv there; the 1×1×1 projection is the standard ResNet choice and ~27× cheaper).
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str, eps: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            norm_act(in_channels, activation, eps),
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            norm_act(out_channels, activation, eps),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


def residual_stack(
    in_channels: int, out_channels: int, blocks: int, activation: str, eps: float
) -> nn.Sequential:
    """``blocks`` residual blocks; the first one changes the width."""
    return nn.Sequential(
        *(
            ResidualBlock(in_channels if i == 0 else out_channels, out_channels, activation, eps)
            for i in range(blocks)
        )
    )


class PointwiseConv3d(nn.Conv3d):
    """A 1×1×1 convolution computed as a matrix product over the channel axis.

    Same parameters (and state-dict keys) as ``nn.Conv3d(in, out, 1)``. Why: on CPU, oneDNN takes 211 ms
    for the forward and backward pass of a 1 → 1-channel 1×1×1 convolution over 32 masks of 32³ (the
    task encoder's mask path at batch 4 × 8 classes), against 8 ms for this product, a sixth of a CPU
    training step. Wider 1×1×1 convolutions are as fast or faster as ``nn.Conv3d``, so only the
    one-channel mask path uses this.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(B, C·r³, D, H, W) → (B, C, D·r, H·r, W·r): the 3-D analogue of ``torch.nn.PixelShuffle``.

    Channel index c·r³ + i·r² + j·r + k goes to sub-voxel offset (i, j, k), matching torch's 2-D
    channel order. torch has no 3-D version, so it is a reshape and a permute.
    """
    b, c, d, h, w = x.shape
    r = factor
    if c % r**3:
        raise ValueError(f"pixel_shuffle_3d: {c} channels are not divisible by {r}³")
    x = x.reshape(b, c // r**3, r, r, r, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // r**3, d * r, h * r, w * r)


def pixel_unshuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(B, C, D·r, H·r, W·r) → (B, C·r³, D, H, W); the inverse of :func:`pixel_shuffle_3d`."""
    b, c, d, h, w = x.shape
    r = factor
    if d % r or h % r or w % r:
        raise ValueError(f"pixel_unshuffle_3d: spatial size {(d, h, w)} is not divisible by {r}")
    x = x.reshape(b, c, d // r, r, h // r, r, w // r, r)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r**3, d // r, h // r, w // r)


class Attention(nn.Module):
    """Multi-head attention on (B, L, C) tokens through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None, cross-attention otherwise. SDPA picks the flash or
    memory-efficient kernel on GPU, which keeps voxel→token attention at 16³ voxels cheap.
    ``key_mask`` (B, L_context) bool, True where a key may be attended to, leaves out padding tokens;
    every row needs at least one True.
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.heads = dim // head_dim
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = (
            self.kv(context)
            .reshape(b, context.shape[1], 2, self.heads, c // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SelfAttentionLayer(nn.Module):
    """Pre-norm residual self-attention: x + Attn(LN(x))."""

    def __init__(self, dim: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, head_dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return x + self.attn(self.norm(x), key_mask=key_mask)


class CrossAttentionLayer(nn.Module):
    """Pre-norm residual cross-attention with separate norms for queries and keys (MASS DualPreNorm)."""

    def __init__(self, dim: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, head_dim)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return x + self.attn(self.norm_q(x), self.norm_kv(context), key_mask)


class FeedForwardLayer(nn.Module):
    """Pre-norm residual MLP: x + Linear(GELU(Linear(LN(x))))."""

    def __init__(self, dim: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def flatten_voxels(x: Tensor) -> Tensor:
    """(B, C, D, H, W) → (B, D·H·W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def unflatten_voxels(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`flatten_voxels` with the spatial shape of ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for Linear layers (MASS's init for attention and heads)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = [
    "Attention",
    "CrossAttentionLayer",
    "FeedForwardLayer",
    "PointwiseConv3d",
    "ResidualBlock",
    "SelfAttentionLayer",
    "flatten_voxels",
    "init_linear_xavier",
    "make_activation",
    "norm_act",
    "pixel_shuffle_3d",
    "pixel_unshuffle_3d",
    "residual_stack",
    "unflatten_voxels",
]
