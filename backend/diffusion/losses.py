"""Rectified-flow training loss for the grid model.

x_s = (1 - s) z + s eps, target v = eps - z, mean squared error over the cells that are
not given (for x0-predicting models the error of the clean-frame estimate instead, which is
the velocity error times s). Diffusion times are drawn logit-normal by default
(s = sigmoid(n), n ~ N(0, 1)), which puts more training on middle noise levels than
uniform sampling does and is the common choice for rectified-flow image and video models;
the paper does not name its distribution. Classifier-free-guidance dropout is drawn per
sample here, while training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def sample_diffusion_time(batch: int, distribution: str = "logit_normal",
                          generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu", shift: float = 1.0,
                          terminal_fraction: float = 0.0) -> Tensor:
    """Diffusion times in (0, 1]: [B].

    `shift` > 1 moves the draws towards pure noise with the sampler's time shift
    s -> shift s / (1 + (shift - 1) s); `terminal_fraction` of the draws are exactly 1 (pure
    noise), the only time a one-step sampler ever evaluates - small models sampled with
    one to four steps need that end of the schedule trained most.
    """
    if not shift > 0 or not 0.0 <= terminal_fraction <= 1.0:
        raise ValueError(f"time shift must be > 0 and terminal_fraction in [0, 1], got "
                         f"{shift} and {terminal_fraction}")
    gen_device = generator.device if generator is not None else device
    if distribution == "logit_normal":
        s = torch.sigmoid(torch.randn(batch, generator=generator, device=gen_device))
    elif distribution == "uniform":
        s = torch.rand(batch, generator=generator, device=gen_device)
    else:
        raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, "
                         f"got {distribution!r}")
    s = shift * s / (1.0 + (shift - 1.0) * s)
    if terminal_fraction > 0:
        terminal = torch.rand(batch, generator=generator, device=gen_device) < terminal_fraction
        s = torch.where(terminal, torch.ones_like(s), s)
    return s.to(device)


def masked_cell_mse(prediction: Tensor, target: Tensor, cell_mask: Tensor,
                    pixel_weight: Tensor | None = None) -> Tensor:
    """MSE over the cells where cell_mask is False.

    prediction, target: [B, V, T, C, H, W]; cell_mask: [B, V, T] bool (True = given);
    pixel_weight: [B, V, T, 1, H, W] positive weights of a weighted mean within each cell.
    """
    error = (prediction.float() - target.float()).square()
    if pixel_weight is None:
        per_cell = error.mean(dim=(3, 4, 5))  # [B, V, T]
    else:
        weight = pixel_weight.float().expand_as(error)
        per_cell = (error * weight).sum(dim=(3, 4, 5)) / weight.sum(dim=(3, 4, 5))
    weight = (~cell_mask).float()  # [B, V, T]
    if weight.sum() == 0:
        raise ValueError("cell_mask marks every cell as given: no cell to train on")
    return (per_cell * weight).sum() / weight.sum()


def rectified_flow_loss(model: nn.Module, z: Tensor, cell_mask: Tensor,
                        rays: Tensor | None = None, generator: torch.Generator | None = None,
                        s: Tensor | None = None, context: Tensor | None = None,
                        time_distribution: str = "logit_normal",
                        cfg_dropout: float | None = None, time_shift: float = 1.0,
                        terminal_fraction: float = 0.0, cache: Tensor | None = None,
                        pixel_weight: Tensor | None = None) -> Tensor:
    """Rectified-flow loss of `model` on clean grids z.

    z: [B, V, T, C, H, W] clean frames (also the given frames where cell_mask is True);
    cell_mask: [B, V, T] bool; rays: [B, V, T, 6, H, W]; s: [B] diffusion times, drawn
    from `time_distribution` (with `time_shift` and `terminal_fraction`, see
    `sample_diffusion_time`) when None; context: [B, L, Dc].
    cfg_dropout: probability of the unconditional branch per sample while model.training;
    None reads `model.config.cfg_dropout`. cache: [B, V, T, C + 1, H, W] for cache-conditioned
    models; pixel_weight: [B, V, T, 1, H, W] weights of the error within each cell.
    """
    if z.ndim != 6:
        raise ValueError(f"z must be [B, V, T, C, H, W], got shape {tuple(z.shape)}")
    if cell_mask.dtype != torch.bool or cell_mask.shape != z.shape[:3]:
        raise ValueError(f"cell_mask must be bool of shape {tuple(z.shape[:3])}, got "
                         f"{cell_mask.dtype} {tuple(cell_mask.shape)}")
    B = z.shape[0]
    gen_device = generator.device if generator is not None else z.device
    if s is None:
        s = sample_diffusion_time(B, time_distribution, generator, z.device, time_shift,
                                  terminal_fraction)
    if tuple(s.shape) != (B,):
        raise ValueError(f"s must have shape [{B}], got {tuple(s.shape)}")
    eps = torch.randn(z.shape, generator=generator, device=gen_device,
                      dtype=z.dtype).to(z.device)  # [B, V, T, C, H, W]
    s_grid = s.to(z.dtype).reshape(B, 1, 1, 1, 1, 1)
    x_s = (1 - s_grid) * z + s_grid * eps  # [B, V, T, C, H, W]
    if cfg_dropout is None:
        cfg_dropout = getattr(model, "module", model).config.cfg_dropout
    drop = None
    if model.training and cfg_dropout > 0:
        draw = torch.rand(B, generator=generator, device=gen_device).to(z.device)
        drop = draw < cfg_dropout  # [B]
    extra = {} if cache is None else {"cache": cache}
    prediction = model(x_s, s, z, cell_mask, rays=rays, context=context,
                       drop_conditioning=drop, **extra)
    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps models
    if getattr(config, "prediction", "velocity") == "x0":
        # the model returns (x_s - x0) / max(s, X0_MIN_TIME): undo the division and compare
        # x_s - x0 with x_s - z, which is exactly the error of the clean-frame estimate
        from backend.diffusion.model import X0_MIN_TIME

        weight = s.clamp(min=X0_MIN_TIME).to(prediction.dtype).reshape(B, 1, 1, 1, 1, 1)
        return masked_cell_mse(prediction * weight, x_s - z, cell_mask, pixel_weight)
    return masked_cell_mse(prediction, eps - z, cell_mask, pixel_weight)
