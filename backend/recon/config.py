"""Configuration of the feed-forward 4D reconstruction model, with size presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from backend.checkpoint import config_from_dict, config_to_dict

NUM_DENSE_LAYERS = 4


@dataclass
class ReconConfig:
    """Shapes and options of `ReconModel`.

    `depth` counts aggregator blocks; each block is one frame-attention layer and one
    global-attention layer, each followed by a temporal-attention layer when
    `use_temporal_attention`. `dense_layers` are the 4 block indices the dense head reads.
    `image_size` is (height, width) at training time; any size divisible by `patch_size`
    works at inference.

    Scene scale: predicted depth is `depth_scale * exp(r * tanh(x / r))` with
    r = `depth_log_range`: close to `depth_scale * exp(x)` near x = 0, so an untrained head
    places every pixel at `depth_scale` scene units (the preset rigs orbit at about 3
    units), and bounded to depth_scale * exp(+-r), which keeps early training stable.
    Gaussian scales are `exp(x + scale_bias)` times the pixel footprint (depth / focal):
    the paper's fixed bias of -7 assumes its own scene units, whereas a footprint-relative
    scale gives Gaussians of a fixed size in pixels at any depth, resolution and scene
    scale. The default bias log(0.5) starts each Gaussian at half a pixel (standard
    deviation), so neighbouring pixels' Gaussians overlap without blurring.
    """

    in_channels: int = 3
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    dense_layers: tuple[int, ...] = (0, 1, 2, 3)
    head_features: int = 32
    use_temporal_attention: bool = True
    use_camera_rays: bool = True
    camera_token_replacement: bool = True
    depth_scale: float = 3.0
    depth_log_range: float = 4.0
    scale_bias: float = math.log(0.5)
    opacity_bias: float = -2.0
    head_init_std: float = 1e-3
    image_size: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.dense_layers = tuple(self.dense_layers)
        for name in ("in_channels", "patch_size", "width", "depth", "num_heads",
                     "head_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 (2D position codes)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if len(self.dense_layers) != NUM_DENSE_LAYERS or any(
                not 0 <= i < self.depth for i in self.dense_layers):
            raise ValueError(f"dense_layers must be {NUM_DENSE_LAYERS} block indices in "
                             f"[0, {self.depth}), got {self.dense_layers}")
        if not (self.depth_scale > 0 and self.depth_log_range > 0):
            raise ValueError(f"depth_scale and depth_log_range must be positive, got "
                             f"{self.depth_scale!r}, {self.depth_log_range!r}")
        if not self.head_init_std >= 0:
            raise ValueError(f"head_init_std must be >= 0, got {self.head_init_std!r}")
        if len(self.image_size) != 2 or any(s % self.patch_size for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be (height, width), both "
                             f"divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def tokens_per_frame_extra(self) -> int:
        """Camera token plus register tokens placed before the patch tokens of a frame."""
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReconConfig:
        return config_from_dict(cls, values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ReconConfig:
        """A named size: "tiny" (CPU), "small" (one GPU), "vggt-scale" (VGGT's aggregator)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, ReconConfig] = {
    # 4 views x 16 timesteps of 64x64 frames on a laptop CPU: 69 tokens per frame, ~2.7M
    # parameters.
    "tiny": ReconConfig(patch_size=8, width=128, depth=4, num_heads=4, head_features=32,
                        dense_layers=(0, 1, 2, 3), image_size=(64, 64)),
    # 256x256 frames on one GPU: 261 tokens per frame, ~111M parameters.
    "small": ReconConfig(patch_size=16, width=512, depth=12, num_heads=8, head_features=128,
                         dense_layers=(2, 5, 8, 11), image_size=(256, 256)),
    # VGGT's aggregator shapes (24 frame + 24 global blocks of width 1024, 16 heads, patch 14,
    # DPT reading blocks 4, 11, 17, 23) plus one temporal layer after each of the 48; frames
    # of 350x518 as the paper's timings: ~843M parameters, of which the aggregator 808M
    # (attention blocks 604M, temporal layers 201M; a linear patch embedding stands in for
    # VGGT's DINO encoder). Built on the meta device to count parameters.
    "vggt-scale": ReconConfig(patch_size=14, width=1024, depth=24, num_heads=16,
                              head_features=256, dense_layers=(4, 11, 17, 23),
                              image_size=(350, 518)),
}
