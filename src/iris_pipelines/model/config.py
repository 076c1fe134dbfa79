"""One dataclass that shows the whole Iris network.

Every size that shapes the network lives here, so a JSON dump of an :class:`IrisConfig` next to the
safetensors weights is enough to rebuild the model without pickle (DESIGN.md, "Model artifacts").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_Config = TypeVar("_Config")

_ACTIVATIONS = ("leaky_relu", "relu")
_PAD_MODES = ("replicate", "constant")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-safe dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }


def config_from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
    """Build a dataclass config from a dict; an unknown key is an error, so a typo never goes unseen."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)


# The transformer parts of the CPU-sized presets: one block each, narrow heads and MLPs.
_SMALL_TRANSFORMER: dict[str, Any] = {"head_dim": 16, "mlp_ratio": 2.0, "task_blocks": 1, "fusion_blocks": 1}


@dataclass(frozen=True)
class IrisConfig:
    """Sizes of the Iris network (Gao et al., CVPR 2025, arXiv 2503.19359).

    The paper fixes only the encoder's shape (residual 3-D U-Net, 4 downsampling stages, base width 32),
    m = 10 query tokens and a total of 69.4 M parameters. Everything else follows the authors' MASS
    release of Iris (Stanford-AIMI/MASS ``models/iris.py``), scaled down to land near the paper's count,
    because MASS's own configuration has ~120 M parameters (reference notes §1.4).

    The default (= :meth:`paper`) keeps MASS's depths (2 residual blocks per level, 2 task-encoder
    blocks, 2 fusion blocks per fused scale) but narrows the bottleneck from 512 to 384 channels
    (12 heads of 32), uses one task encoder at the 1/16 scale (the paper's single T per class; MASS has
    one per scale), fuses at 1/16 and 1/8 (MASS also at 1/4) and drops MASS's 128³ positional
    embeddings, which would tie the model to one input size. That gives 66.1 M parameters against the
    paper's 69.4 M (``count_parameters(Iris(IrisConfig.paper()))``); MASS's own configuration has ~120 M.

    Attributes:
        in_channels: image channels (1: CT, MR or PET alone).
        channels: feature width per resolution level, full resolution first; ``len - 1`` downsampling
            stages. The last entry is the embedding width C of the task tokens.
        encoder_blocks: pre-activation residual blocks per level, full resolution (after the stem
            conv) first.
        decoder_blocks: residual blocks per U-Net decoder stage, the one that produces the 1/8 scale
            first and the full-resolution one last.
        activation: ``"leaky_relu"`` (nnU-Net) or ``"relu"`` (MASS).
        norm_eps: InstanceNorm3d epsilon.
        layer_norm_eps: LayerNorm epsilon of the attention blocks.
        num_query_tokens: m, learned query tokens per class; T has m + 1 tokens (paper §4.3: m = 10).
        head_dim: attention head width; heads = width / head_dim (MASS: 32).
        mlp_ratio: hidden width of the attention FFNs relative to the token width (MASS: 4).
        task_blocks: self/cross/self attention blocks in the task encoder (MASS: 2).
        context_kernel_size: kernel of the conv that mixes the pixel-shuffled features with the mask.
            The paper says 1×1×1; MASS uses 3×3×3.
        fusion_scales: decoder scales where tokens and query voxels exchange information, coarsest
            first: 1 = bottleneck only, 2 = bottleneck and 1/8 (MASS: 3).
        fusion_blocks: bidirectional attention blocks per fused scale (MASS: 2).
        pad_mode: how images whose size is not a multiple of 2**stages are padded before the
            network (``"replicate"`` avoids an artificial edge; masks are always zero-padded).
        memory_bank_size: classes held in the EMA task-embedding memory bank (supplement, "Context
            Ensemble for Training Classes"); 0 disables it.
        foreground_queries: start each class's m query tokens from the learned queries plus its
            foreground token T_f, instead of the learned queries alone. Trained on the phantoms, the
            learned-only queries came out the same for every class (spread across classes 0.02 % of
            their norm against 26 % for T_f), so 10 of a class's 11 tokens carried no class at all.
        classifier_foreground: also feed the pre-fusion T_f of each class to the dynamic classifier, so
            the per-class weights keep the class identity that the shared fusion blocks wash out.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256, 384)
    encoder_blocks: tuple[int, ...] = (1, 2, 2, 2, 2)
    decoder_blocks: tuple[int, ...] = (2, 2, 2, 2)
    activation: str = "leaky_relu"
    norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    num_query_tokens: int = 10
    head_dim: int = 32
    mlp_ratio: float = 4.0
    task_blocks: int = 2
    context_kernel_size: int = 1
    fusion_scales: int = 2
    fusion_blocks: int = 2
    pad_mode: str = "replicate"
    memory_bank_size: int = 0
    foreground_queries: bool = False
    classifier_foreground: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON or YAML become tuples so the config stays hashable and immutable.
        for name in ("channels", "encoder_blocks", "decoder_blocks"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if len(self.channels) < 2:
            problems.append(f"channels needs at least 2 levels, got {self.channels}")
        if len(self.encoder_blocks) != len(self.channels):
            problems.append(
                f"encoder_blocks {self.encoder_blocks} needs one entry per level of {self.channels}"
            )
        if len(self.decoder_blocks) != len(self.channels) - 1:
            problems.append(f"decoder_blocks {self.decoder_blocks} needs one entry per stage ({self.stages})")
        if any(b < 1 for b in self.encoder_blocks + self.decoder_blocks):
            problems.append("every level needs at least one residual block")
        if not 1 <= self.fusion_scales <= len(self.channels) - 1:
            problems.append(
                f"fusion_scales must be in [1, {len(self.channels) - 1}], got {self.fusion_scales}"
            )
        for width in self.fused_channels:
            if width % self.head_dim:
                problems.append(f"fused width {width} is not a multiple of head_dim {self.head_dim}")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.pad_mode not in _PAD_MODES:
            problems.append(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")
        if self.context_kernel_size % 2 != 1:
            problems.append(f"context_kernel_size must be odd, got {self.context_kernel_size}")
        if self.num_query_tokens < 1:
            problems.append(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
        if self.memory_bank_size < 0:
            problems.append(f"memory_bank_size must be >= 0, got {self.memory_bank_size}")
        if problems:
            raise ValueError("invalid IrisConfig: " + "; ".join(problems))

    @property
    def stages(self) -> int:
        """Number of downsampling stages."""
        return len(self.channels) - 1

    @property
    def size_divisor(self) -> int:
        """Input sizes are padded to a multiple of this (the bottleneck stride)."""
        return 2**self.stages

    @property
    def embed_dim(self) -> int:
        """Width C of the task tokens (the bottleneck width)."""
        return self.channels[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens per class in T: the foreground token plus m query tokens."""
        return self.num_query_tokens + 1

    @property
    def fused_channels(self) -> tuple[int, ...]:
        """Widths of the fused decoder scales, bottleneck first."""
        return tuple(reversed(self.channels))[: self.fusion_scales]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IrisConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        return config_from_dict(cls, data)

    @classmethod
    def paper(cls, **overrides: Any) -> IrisConfig:
        """The configuration for paper-scale runs (128³ crops, 66.1 M parameters)."""
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides: Any) -> IrisConfig:
        """The network of the CPU recipe (conf/base: 32³ crops of the phantoms at 6 mm), 0.46 M parameters.

        (0.47 M with ``foreground_queries`` and ``classifier_foreground``, which conf/base turns on.)

        Two downsampling stages instead of four, so a 32³ crop keeps the paper's 8³ bottleneck
        (128³ / 16). With four stages the bottleneck of a 32³ crop is 2³: instance norm over 8 voxels
        erases the features there, and tokens meet the query only in 48 mm cells. Trained with the base
        recipe for 1000 steps, four stages reached one-shot Dice 0.09 on the phantoms' training datasets,
        two stages 0.46 (paste: 0.30). Full resolution keeps 16 channels: with 8 it was 0.21.
        """
        return cls(
            **{
                "channels": (16, 16, 64),
                "encoder_blocks": (1, 1, 1),
                "decoder_blocks": (1, 1),
                **_SMALL_TRANSFORMER,
                **overrides,
            }
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> IrisConfig:
        """A CPU-sized network of the paper's topology, for tests (1.8 M parameters).

        Same topology as :meth:`paper` (4 stages, two fused scales, m = 10), narrower and shallower. Over a
        quarter of its weights are the task encoder's C ↔ r³ = 4096 projections, whose size is set by the
        1/16 scale, not by the width.
        """
        return cls(
            **{
                "channels": (8, 16, 32, 64, 64),
                "encoder_blocks": (1, 1, 1, 1, 1),
                "decoder_blocks": (1, 1, 1, 1),
                **_SMALL_TRANSFORMER,
                **overrides,
            }
        )
