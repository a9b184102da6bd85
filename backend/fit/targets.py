"""What the fitting stage fits: groups of cells of the views x timesteps grid, each group at
one resolution with a weight per cell (the user's frames at full resolution with weight 1,
generated frames at the model's resolution with less)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, scale_intrinsics


@dataclass
class FitTarget:
    """Frames of one resolution: images [V, T, 3, H, W] in [0, 1]; c2w [V, T, 4, 4] (the
    normalised rig); intrinsics [V, T, 6] (rescaled to H, W here); weights [V, T] (0: the
    cell is not fitted)."""

    images: Tensor
    c2w: Tensor
    intrinsics: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 5 or self.images.shape[2] != 3:
            raise ValueError(f"FitTarget.images must be [V, T, 3, H, W], got "
                             f"{list(self.images.shape)}")
        V, T, _, H, W = self.images.shape
        for name, shape in (("c2w", (V, T, 4, 4)), ("intrinsics", (V, T, 6)),
                            ("weights", (V, T))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"FitTarget.{name} must be {list(shape)}, got "
                                 f"{list(getattr(self, name).shape)}")
        if (self.weights < 0).any() or not torch.isfinite(self.weights).all():
            raise ValueError("FitTarget.weights must be finite and >= 0")
        self.images = self.images.float()
        self.c2w = self.c2w.float()
        self.intrinsics = scale_intrinsics(self.intrinsics.float(), W, H)
        self.weights = self.weights.float()
        self._half: Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:  # (H, W)
        return tuple(self.images.shape[-2:])

    def cells(self, t: int) -> list[int]:
        """The views fitted at timestep t."""
        return [int(v) for v in torch.nonzero(self.weights[:, t] > 0).flatten()]

    def cameras(self, views: list[int], t: int, half: bool = False
                ) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """(images [C, 3, h, w], viewmats [C, 4, 4], Ks [C, 3, 3], w, h) of views at t, at
        full or half resolution."""
        H, W = self.size
        images = self.images[views, t]
        intr = self.intrinsics[views, t]
        if half and min(H, W) >= 16:
            h, w = H // 2, W // 2
            images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True,
                                   align_corners=False)
            intr = scale_intrinsics(intr, w, h)
        else:
            h, w = H, W
        return images, c2w_to_viewmat(self.c2w[views, t]), intrinsics_to_K(intr), w, h

    def to(self, device: torch.device | str) -> FitTarget:
        return FitTarget(self.images.to(device), self.c2w.to(device),
                         self.intrinsics.to(device), self.weights.to(device))


def timestep_weight(targets: list[FitTarget], t: int) -> float:
    """How much of timestep t is observed: its cells' weights times their pixel counts."""
    return sum(float(x.weights[:, t].sum()) * x.size[0] * x.size[1] for x in targets)
