"""Mask decoding module: query features + task embeddings of all K classes → K logit maps in one pass.

Paper §3.2: the K task embeddings are concatenated and exchange information with the query features by
bidirectional cross-attention, F'_q, T' = CrossAttn(F_q, T); the masks come from D(F'_q, T') in a single
forward pass. The layer layout is MASS's (``modules/fusion.py``): fusion blocks at the coarse decoder
scales, interleaved with the U-Net decoder stages, and a dynamic per-class classifier
(``HierarchyPriorClassifier``) dotted with the full-resolution decoder features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import (
    CrossAttentionLayer,
    FeedForwardLayer,
    SelfAttentionLayer,
    flatten_voxels,
    init_linear_xavier,
    norm_act,
    unflatten_voxels,
)
from .config import IrisConfig
from .encoder import build_up_stages


class BidirectionalFusionBlock(nn.Module):
    """tokens ← voxels (cross-attn + FFN); voxels ← tokens (cross-attn + FFN); tokens self-attn + FFN.

    The self-attention runs over all K·(m+1) tokens, so classes see each other (MASS
    ``MultiPriorAttentionBlock``). Nothing marks a token's class slot, so permuting the classes permutes
    the output. ``token_mask`` (B, K·(m+1)) hides the tokens of padding class slots from the voxels and
    the other tokens, so a class's mask does not depend on how many empty slots pad its episode.
    """

    def __init__(self, dim: int, config: IrisConfig) -> None:
        super().__init__()
        head_dim, eps, ratio = config.head_dim, config.layer_norm_eps, config.mlp_ratio
        self.tokens_from_voxels = CrossAttentionLayer(dim, head_dim, eps)
        self.token_ffn_1 = FeedForwardLayer(dim, ratio, eps)
        self.voxels_from_tokens = CrossAttentionLayer(dim, head_dim, eps)
        self.voxel_ffn = FeedForwardLayer(dim, ratio, eps)
        self.token_self_attn = SelfAttentionLayer(dim, head_dim, eps)
        self.token_ffn_2 = FeedForwardLayer(dim, ratio, eps)

    def forward(
        self, voxels: Tensor, tokens: Tensor, token_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        tokens = self.token_ffn_1(self.tokens_from_voxels(tokens, voxels))
        voxels = self.voxel_ffn(self.voxels_from_tokens(voxels, tokens, token_mask))
        tokens = self.token_ffn_2(self.token_self_attn(tokens, token_mask))
        return voxels, tokens


class FusionStage(nn.Module):
    """Fusion blocks at one decoder scale on a (B, C, d, h, w) feature map and (B, N, C) tokens."""

    def __init__(self, dim: int, config: IrisConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BidirectionalFusionBlock(dim, config) for _ in range(config.fusion_blocks)
        )

    def forward(self, x: Tensor, tokens: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        voxels = flatten_voxels(x)
        for block in self.blocks:
            voxels, tokens = block(voxels, tokens, token_mask)
        return unflatten_voxels(voxels, x), tokens


class DynamicClassifier(nn.Module):
    """Per-class 1×1×1 classifier weights generated from the updated tokens (MASS HierarchyPriorClassifier).

    One token per class and fused scale (the first, i.e. the foreground slot; with
    ``IrisConfig.classifier_foreground`` also the class's pre-fusion T_f, first) is concatenated, normalised
    and mapped by MLP(Σc → Σc → c₀) and MLP(c₀ → c₀ → c₀) to c₀ weights; logits are their dot product with
    the c₀-channel full-resolution decoder features, so all K classes cost one einsum.
    """

    def __init__(self, token_dim: int, feature_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(token_dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, token_dim),
            nn.GELU(),
            nn.Linear(token_dim, feature_dim),
            nn.Linear(feature_dim, feature_dim),
            nn.GELU(),
            nn.Linear(feature_dim, feature_dim),
        )
        self.mlp.apply(init_linear_xavier)

    def forward(self, class_tokens: Tensor, features: Tensor) -> Tensor:
        weights = self.mlp(self.norm(class_tokens))  # (B, K, c0)
        return torch.einsum("bkc,bcdhw->bkdhw", weights, features)


class MaskDecoder(nn.Module):
    """U-Net decoder path with token fusion at the ``fusion_scales`` coarsest scales, plus the mask head.

    Fusion at scale i happens before decoder stage i (bottleneck before up1, 1/8 after up1, as MASS).
    Tokens move to the next, narrower scale through a linear projection, so a single T per class (the
    paper's) drives every fused scale instead of MASS's separate task embedding per scale.
    """

    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        widths = config.fused_channels
        self.num_tokens = config.num_tokens
        self.up_stages = build_up_stages(config)
        self.fusion = nn.ModuleList(FusionStage(width, config) for width in widths)
        self.token_projections = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(wide, eps=config.layer_norm_eps), nn.Linear(wide, narrow))
            for wide, narrow in zip(widths[:-1], widths[1:], strict=True)
        )
        self.fusion.apply(init_linear_xavier)
        self.token_projections.apply(init_linear_xavier)
        self.final = norm_act(config.channels[0], config.activation, config.norm_eps)
        self.classifier_foreground = config.classifier_foreground
        token_dim = sum(widths) + (config.embed_dim if config.classifier_foreground else 0)
        self.classifier = DynamicClassifier(token_dim, config.channels[0], config.layer_norm_eps)

    def forward(
        self, features: list[Tensor], task_embedding: Tensor, class_mask: Tensor | None = None
    ) -> Tensor:
        """Encoder features (full resolution first) and T (B, K, m+1, C) → logits (B, K, D, H, W).

        ``class_mask`` (B, K) bool marks the real class slots of padded episodes; None means all are real.
        """
        b, k = task_embedding.shape[:2]
        tokens = task_embedding.flatten(1, 2)
        token_mask = None if class_mask is None else class_mask.repeat_interleave(self.num_tokens, dim=1)
        class_tokens = [task_embedding[:, :, 0]] if self.classifier_foreground else []
        x = features[-1]
        for i, stage in enumerate(self.up_stages):
            if i < len(self.fusion):
                if i > 0:
                    tokens = self.token_projections[i - 1](tokens)
                x, tokens = self.fusion[i](x, tokens, token_mask)
                class_tokens.append(tokens.reshape(b, k, self.num_tokens, -1)[:, :, 0])
            x = stage(x, features[-2 - i])
        return self.classifier(torch.cat(class_tokens, dim=-1), self.final(x))
