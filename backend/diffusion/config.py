"""Configuration of the 4D video diffusion transformer, with size presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from backend.checkpoint import config_from_dict, config_to_dict
from backend.diffusion.rope import rope_axis_pairs

ATTENTION_KINDS = ("fused", "sequential", "parallel", "full")
PREDICTIONS = ("velocity", "x0")
ATTENTION_IMPLS = ("auto", "flex", "decomposed", "merged", "reference")


@dataclass
class DiffusionConfig:
    """Shapes and options of `VideoDiT`.

    `image_size` is (height, width) of the model input at training time, in the units the
    model sees (pixels, or latents when an autoencoder sits in front). Any size divisible by
    `patch_size` works at inference. `t_max` bounds the number of timesteps: RoPE places
    grid cell (v, t) at temporal position v * t_max + t. `trained_grid` is the (views,
    timesteps) grid the weights were trained on ((0, 0): not recorded); larger grids are
    generated in windows of that size (see `backend.pipeline`). `reference_conditioning`
    gives every cell its reference frames (see `reference_frames`) as extra input (beyond
    the paper; for small models). `prediction` "x0" makes the network estimate the clean
    frames - with reference conditioning as a correction of the nearest reference, so a
    fresh model starts at the copy baseline - and the model still returns the velocity
    (x - x0) / s; its training loss is then the plain x0 error (see `rectified_flow_loss`).
    `cache_conditioning` adds a per-cell input: the given frames of the cell's timestep
    unprojected with depth and rendered into its camera (`backend.diffusion.cache`), colour
    and coverage, so the network corrects a warped guess (as GEN3C / ViewCrafter).
    `conv_channels` > 0 wraps the transformer in a convolutional hourglass with that many
    feature channels (see `ConvHourglass`): convolutions over every per-pixel input at full
    resolution feed the patch tokens and refine the output, the transformer works at the
    patch level; 0 (the default) builds no hourglass.
    """

    in_channels: int = 3
    patch_size: int = 8
    width: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    t_max: int = 16
    max_views: int = 8
    attention: str = "fused"
    attention_impl: str = "auto"
    cross_attention: bool = False
    context_dim: int = 0
    use_cell_conditioning: bool = True
    use_camera_rays: bool = True
    cfg_dropout: float = 0.1
    image_size: tuple[int, int] = (64, 64)
    trained_grid: tuple[int, int] = (0, 0)
    reference_conditioning: bool = False
    prediction: str = "velocity"  # what the network outputs: "velocity" or "x0"
    cache_conditioning: bool = False  # each cell also gets a render of the given frames' 3D cache
    conv_channels: int = 0  # feature channels of the convolutional hourglass; 0 = none

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.trained_grid = tuple(self.trained_grid)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if (len(self.trained_grid) != 2 or any(not isinstance(n, int) or n < 0
                                               for n in self.trained_grid)):
            raise ValueError(f"trained_grid must be (views, timesteps) >= 0, got "
                             f"{self.trained_grid!r}")
        positive = ("in_channels", "patch_size", "width", "depth", "num_heads", "t_max",
                    "max_views")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (not isinstance(self.conv_channels, int) or isinstance(self.conv_channels, bool)
                or self.conv_channels < 0):
            raise ValueError(f"conv_channels must be an int >= 0, got {self.conv_channels!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        rope_axis_pairs(self.head_dim)  # raises unless head_dim suits 3D RoPE
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.cross_attention and self.context_dim <= 0:
            raise ValueError("cross_attention needs a positive context_dim")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout!r}")
        if len(self.image_size) != 2 or any(s % self.patch_size for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be (height, width), both "
                             f"divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiffusionConfig:
        return config_from_dict(cls, values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DiffusionConfig:
        """A named size: "tiny" (CPU demo), "small" (one GPU), "paper" (~11B, text context)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, DiffusionConfig] = {
    # 4 x 8 grids of 64x64 RGB frames on a laptop CPU: 2,048 tokens, ~4M parameters.
    "tiny": DiffusionConfig(in_channels=3, patch_size=8, width=192, depth=6, num_heads=3,
                            mlp_ratio=4.0, t_max=16, max_views=8, image_size=(64, 64)),
    # Pixel-space 128x128 frames on one GPU: 256 tokens per frame, ~130M parameters.
    "small": DiffusionConfig(in_channels=3, patch_size=8, width=768, depth=12, num_heads=12,
                             mlp_ratio=4.0, t_max=16, max_views=8, image_size=(128, 128)),
    # The paper's base model: 32 blocks of width 4096 on 16-channel latents (8x spatial, 4x
    # temporal autoencoder), cross-attention to a 4096-wide text context, ~11.3B parameters.
    "paper": DiffusionConfig(in_channels=16, patch_size=2, width=4096, depth=32, num_heads=32,
                             mlp_ratio=3.5, t_max=16, max_views=8, cross_attention=True,
                             context_dim=4096, use_camera_rays=False, image_size=(72, 128)),
}
