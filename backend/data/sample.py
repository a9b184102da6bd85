"""One training sample: a views x timesteps grid of frames with its cameras."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from backend.gaussians import Gaussians

SAMPLE_KINDS = ("dynamic", "static", "homography", "folder")
SCENE_FAMILIES = ("dome", "open", "user")


@dataclass
class Sample:
    """A V x T grid and its rig.

    `depth` is z-depth along each camera's optical axis (the renderer's expected depth
    divided by alpha); it is 0 where nothing was hit (alpha below the generator's
    `empty_alpha`). With a backdrop, every pixel hits something; in open scenes (`family`
    "open") the sky is hit by nothing, and `gaussians` hold the objects only (the ground
    plane and sky are drawn per pixel; `scene_info` says where the ground is). `depth` and
    `alpha` are None for user data that has none. When `geometry_valid` is False
    (2D-transformed samples) the depth, cameras and Gaussians do not describe the frames:
    reconstruction training skips such samples.
    """

    frames: Tensor  # [V, T, 3, H, W] float32 RGB in [0, 1]
    c2w: Tensor  # [V, T, 4, 4] float32, OpenCV camera-to-world
    intrinsics: Tensor  # [V, T, 6] float32 (fx, fy, cx, cy, width, height)
    depth: Tensor | None = None  # [V, T, 1, H, W] float32 z-depth, 0 where empty
    alpha: Tensor | None = None  # [V, T, 1, H, W] float32 coverage in [0, 1]
    gaussians: list[Gaussians] | None = None  # one per timestep, world frame
    kind: str = "dynamic"  # one of SAMPLE_KINDS
    rig_kind: str = ""
    geometry_valid: bool = True
    views_reversed: bool = False
    index: int = -1
    near_far: tuple[float, float] | None = None
    family: str = "dome"  # one of SCENE_FAMILIES: procedural dome, procedural open, user data
    scene_info: dict | None = None  # open scenes: ground height and extent, light, scale

    def __post_init__(self) -> None:
        if self.frames.ndim != 5 or self.frames.shape[2] != 3:
            raise ValueError(f"Sample.frames: expected [V, T, 3, H, W], "
                             f"got {list(self.frames.shape)}")
        v, t, _, h, w = self.frames.shape
        expected = {"c2w": (v, t, 4, 4), "intrinsics": (v, t, 6),
                    "depth": (v, t, 1, h, w), "alpha": (v, t, 1, h, w)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Sample.{name}: expected shape {list(shape)}, "
                                 f"got {list(value.shape)}")
        if self.gaussians is not None and len(self.gaussians) != t:
            raise ValueError(f"Sample.gaussians: expected {t} timesteps, "
                             f"got {len(self.gaussians)}")
        if self.family not in SCENE_FAMILIES:
            raise ValueError(f"Sample.family: expected one of {SCENE_FAMILIES}, "
                             f"got {self.family!r}")
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(f"Sample.kind: expected one of {SAMPLE_KINDS}, got {self.kind!r}")

    @property
    def num_views(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.frames.shape[1])

    def to_tensors(self) -> dict[str, Tensor]:
        """Fixed-shape tensors only, ready for `torch.utils.data.default_collate`.

        Missing depth and alpha become zeros, with `has_depth` False.
        """
        v, t, _, h, w = self.frames.shape
        zeros = torch.zeros(v, t, 1, h, w)
        return {
            "frames": self.frames,
            "depth": zeros if self.depth is None else self.depth,
            "alpha": zeros if self.alpha is None else self.alpha,
            "c2w": self.c2w,
            "intrinsics": self.intrinsics,
            "geometry_valid": torch.tensor(self.geometry_valid),
            "has_depth": torch.tensor(self.depth is not None),
            "index": torch.tensor(self.index, dtype=torch.int64),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The grid and rig as numpy arrays (no Gaussians), e.g. to save with safetensors."""
        arrays = {"frames": self.frames, "c2w": self.c2w, "intrinsics": self.intrinsics}
        if self.depth is not None:
            arrays["depth"] = self.depth
        if self.alpha is not None:
            arrays["alpha"] = self.alpha
        return {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}


def stack_timesteps(rendered: list[tuple[Tensor, Tensor, Tensor]], gaussians: list[Gaussians],
                    num_steps: int) -> tuple[Tensor, Tensor, Tensor, list[Gaussians]]:
    """Per-timestep renders (frames [V, 3, H, W], depth and alpha [V, 1, H, W]) stacked on
    a timestep axis: [V, T, ...]. One render (a still sample) is copied to every T."""
    frames, depth, alpha = (torch.stack(parts, dim=1) for parts in zip(*rendered, strict=True))
    if len(rendered) == 1 and num_steps > 1:
        frames, depth, alpha = (x.expand(-1, num_steps, -1, -1, -1).contiguous()
                                for x in (frames, depth, alpha))
        gaussians = gaussians * num_steps
    return frames, depth, alpha, gaussians
