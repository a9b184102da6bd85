"""Sky pixels of the user's frames: what the environment (the learned background) must
explain, so the fit keeps splats off them.

Seen from a ring of cameras at one height, sky-coloured splats anywhere along the rays above
the horizon explain the sky as well as the environment does, and the input views cannot
tell them apart; cameras above the ring see them as a haze over the ground. A pixel is sky
when its ray points above the horizon (a ray that rises never meets the ground under the
rig), its colour is close to the frames' top rows and it has no texture. The fit pushes the
rendered alpha of those pixels towards zero (`FitConfig.sky_alpha_weight`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K
from backend.fit.environment import ray_directions
from backend.fit.init import MIN_TEXTURE, local_spread

SKY_TOLERANCE = 0.15  # mean absolute difference from the sky's colour (a gradient's span)
HORIZON_MARGIN = 2.0  # pixels above the horizon before a ray counts as rising


def sky_masks(images: Tensor, c2w: Tensor, intrinsics: Tensor, up: Tensor, sky: Tensor
              ) -> Tensor:
    """images [N, 3, H, W], c2w [N, 4, 4], intrinsics [N, 6] (at H, W), up [3] (the rig's
    up), sky [3] (the sky's colour) -> [N, H, W] bool, true on sky pixels."""
    N, _, H, W = images.shape
    if N == 0:
        return torch.zeros(0, H, W, dtype=torch.bool, device=images.device)
    Ks = intrinsics_to_K(intrinsics)
    directions = ray_directions(c2w_to_viewmat(c2w), Ks, W, H)  # [N, H, W, 3]
    margin = torch.sin(HORIZON_MARGIN / Ks[:, 1, 1]).clamp(max=math.sin(0.2))
    rising = directions @ up.to(directions) > margin[:, None, None]
    coloured = (images - sky.to(images)[None, :, None, None]).abs().mean(dim=1) < SKY_TOLERANCE
    smooth = local_spread(images) < MIN_TEXTURE
    return rising & coloured & smooth


def half_mask(mask: Tensor, h: int, w: int) -> Tensor:
    """[N, H, W] bool -> [N, h, w] bool: sky where most of the pixel's area is."""
    return F.interpolate(mask[:, None].float(), size=(h, w), mode="area")[:, 0] > 0.5
