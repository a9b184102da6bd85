"""Euler sampler for the rectified-flow grid model, with classifier-free guidance.

The grid path is x_s = (1 - s) z + s eps; the model predicts v = eps - z, so one Euler step
from s to s' < s is x_{s'} = x_s - (s - s') v. Given cells are held on their own path
(1 - s) z + s eps with a fixed eps at every step and set to the given frames at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class SamplingCancelled(Exception):
    """Raised by `EulerSampler.sample` when `should_cancel()` returns True."""


@dataclass
class EulerSampler:
    """Euler integration of the flow from noise (s = 1) to data (s = 0).

    steps: number of model evaluations (doubled batch when guidance != 1).
    guidance: classifier-free guidance scale g; v = v_uncond + g (v_cond - v_uncond).
    shift: time-shift of the schedule, s -> shift s / (1 + (shift - 1) s); values above 1
    spend more steps at high noise, which helps larger frames (1 = uniform steps).
    """

    steps: int = 40
    guidance: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift!r}")

    def schedule(self, device: torch.device | str = "cpu") -> Tensor:
        """Diffusion times from 1 down to 0: [steps + 1]."""
        s = torch.linspace(1.0, 0.0, self.steps + 1, device=device, dtype=torch.float64)
        s = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        return s.float()

    def _velocity(self, model: nn.Module, x: Tensor, s: Tensor, cond_frames: Tensor,
                  cell_mask: Tensor, rays: Tensor | None, context: Tensor | None,
                  cache: Tensor | None = None) -> Tensor:
        """Guided velocity. x, cond_frames: [B, V, T, C, H, W]; s: [B]; cell_mask: [B, V, T]."""
        extra = {} if cache is None else {"cache": cache}
        if self.guidance == 1.0:
            return model(x, s, cond_frames, cell_mask, rays=rays, context=context, **extra)
        B = x.shape[0]

        def twice(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.cat([t, t], dim=0)

        drop = torch.arange(2 * B, device=x.device) >= B  # [2B]: second half unconditional
        if cache is not None:
            extra = {"cache": twice(cache)}
        both = model(twice(x), twice(s), twice(cond_frames), twice(cell_mask),
                     rays=twice(rays), context=twice(context), drop_conditioning=drop, **extra)
        cond, uncond = both[:B], both[B:]  # each [B, V, T, C, H, W]
        return uncond + self.guidance * (cond - uncond)

    @torch.no_grad()
    def sample(self, model: nn.Module, cond_frames: Tensor, cell_mask: Tensor,
               rays: Tensor | None = None, context: Tensor | None = None,
               generator: torch.Generator | None = None,
               progress: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None,
               cache: Tensor | None = None) -> Tensor:
        """Fill the grid. cond_frames: [B, V, T, C, H, W] (read only where cell_mask is
        True); cell_mask: [B, V, T] bool; rays: [B, V, T, 6, H, W]; context: [B, L, Dc];
        cache: [B, V, T, C + 1, H, W] for cache-conditioned models.

        progress(step, steps) is called after every step (step counts from 1);
        should_cancel() is checked before every step. Returns [B, V, T, C, H, W] with
        given cells exactly equal to cond_frames.
        """
        if cond_frames.ndim != 6:
            raise ValueError(f"cond_frames must be [B, V, T, C, H, W], got "
                             f"{tuple(cond_frames.shape)}")
        if cell_mask.dtype != torch.bool or cell_mask.shape != cond_frames.shape[:3]:
            raise ValueError(f"cell_mask must be bool of shape {tuple(cond_frames.shape[:3])}, "
                             f"got {cell_mask.dtype} {tuple(cell_mask.shape)}")
        device, B = cond_frames.device, cond_frames.shape[0]
        noise_device = generator.device if generator is not None else device
        eps = torch.randn(cond_frames.shape, generator=generator, device=noise_device,
                          dtype=cond_frames.dtype).to(device)  # [B, V, T, C, H, W]
        given = cell_mask[..., None, None, None]  # [B, V, T, 1, 1, 1]
        times = self.schedule(device)
        x = eps
        for step in range(self.steps):
            if should_cancel is not None and should_cancel():
                raise SamplingCancelled(f"sampling cancelled before step {step + 1}")
            s, s_next = times[step], times[step + 1]
            x = torch.where(given, (1 - s) * cond_frames + s * eps, x)
            velocity = self._velocity(model, x, s.expand(B), cond_frames, cell_mask, rays,
                                      context, cache)
            x = x - (s - s_next) * velocity
            if progress is not None:
                progress(step + 1, self.steps)
        return torch.where(given, cond_frames, x)
