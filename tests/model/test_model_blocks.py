"""Building blocks: 3-D pixel shuffle, the residual block and the pointwise convolution."""

from __future__ import annotations

import torch

from iris_pipelines.model.blocks import PointwiseConv3d, ResidualBlock, pixel_shuffle_3d, pixel_unshuffle_3d


def test_pixel_shuffle_3d_layout_and_inverse() -> None:
    r = 2
    x = torch.randn(2, 3 * r**3, 4, 5, 3)
    shuffled = pixel_shuffle_3d(x, r)
    assert shuffled.shape == (2, 3, 8, 10, 6)
    # Channel c·r³ + i·r² + j·r + k lands at sub-voxel offset (i, j, k), as torch's 2-D PixelShuffle.
    c, i, j, k, z, y, w = 1, 1, 0, 1, 2, 3, 1
    assert shuffled[0, c, z * r + i, y * r + j, w * r + k] == x[0, c * r**3 + i * r**2 + j * r + k, z, y, w]
    assert torch.equal(pixel_unshuffle_3d(shuffled, r), x)


def test_pixel_shuffle_3d_matches_2d_on_a_flat_depth_axis() -> None:
    """With the depth factor folded away, the H×W layout must equal torch's 2-D PixelShuffle."""
    x = torch.randn(1, 4 * 8, 1, 3, 3)
    shuffled = pixel_shuffle_3d(x, 2)[:, :, 0]  # depth offset 0 only
    reference = torch.nn.functional.pixel_shuffle(x.view(1, 4, 2, 4, 3, 3)[:, :, 0].reshape(1, 16, 3, 3), 2)
    assert torch.equal(shuffled, reference)


def test_residual_block_projects_when_width_changes() -> None:
    block = ResidualBlock(4, 8, "leaky_relu", 1e-5)
    out = block(torch.randn(2, 4, 6, 6, 6))
    assert out.shape == (2, 8, 6, 6, 6)
    assert isinstance(block.shortcut, torch.nn.Conv3d)
    assert isinstance(ResidualBlock(8, 8, "relu", 1e-5).shortcut, torch.nn.Identity)


def test_pointwise_conv_equals_a_1x1x1_convolution_with_its_weights() -> None:
    """Same output and gradients as nn.Conv3d(kernel 1), and checkpoints load into either."""
    torch.manual_seed(0)
    pointwise, conv = PointwiseConv3d(3, 5), torch.nn.Conv3d(3, 5, 1)
    conv.load_state_dict(pointwise.state_dict())
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    out_pointwise, out_conv = pointwise(x), conv(x)
    torch.testing.assert_close(out_pointwise, out_conv, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_conv)
    (g_pointwise,) = torch.autograd.grad(out_pointwise, pointwise.weight, grad)
    (g_conv,) = torch.autograd.grad(out_conv, conv.weight, grad)
    torch.testing.assert_close(g_pointwise, g_conv, rtol=1e-5, atol=1e-5)
