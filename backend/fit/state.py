"""The Gaussians being fitted: one set with identities, shared appearance, and a position
and rotation per timestep.

Index i is the same Gaussian at every timestep (its identity): colour, opacity and scales
are shared; means and rotations are per timestep. Density control adds and removes
Gaussians on every timestep at once, so identities stay aligned.

A 3D smoothing filter (Mip-Splatting, Yu et al. 2024) bounds how thin a Gaussian can be:
each one is convolved with an isotropic Gaussian of variance `filter_var` (world units^2,
set from the finest pixel footprint any input camera has at the Gaussian, not trained), its
opacity scaled so its integral is kept. A splat then never gets thinner than the input
pixels resolve, so renders at a higher resolution than the fit's show no speckle. The
filter is baked into the exported scales and opacities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat
from backend.gaussians import SH_C0, Gaussians

SCALE_FLOOR = 1e-7


def inverse_sigmoid(x: Tensor) -> Tensor:
    x = x.clamp(1e-6, 1 - 1e-6)
    return torch.log(x / (1 - x))


class FitGaussians:
    """Trainable tensors (leaves with requires_grad) of N Gaussians over T timesteps."""

    def __init__(self, means: Tensor, quats: Tensor, log_scales: Tensor,
                 opacity_logits: Tensor, sh0: Tensor, num_steps: int = 1):
        # means [N, 3], quats [N, 4], log_scales [N, 3], opacity_logits [N], sh0 [N, 3]
        self.means = [means.detach().clone().requires_grad_() for _ in range(num_steps)]
        self.quats = [quats.detach().clone().requires_grad_() for _ in range(num_steps)]
        self.log_scales = log_scales.detach().clone().requires_grad_()
        self.opacity_logits = opacity_logits.detach().clone().requires_grad_()
        self.sh0 = sh0.detach().clone().requires_grad_()
        self.filter_var = torch.zeros(means.shape[0], device=means.device)  # [N], not trained
        # [N] bool: held on the ground plane (seeded there, or split or cloned from such)
        self.ground = torch.zeros(means.shape[0], dtype=torch.bool, device=means.device)

    @classmethod
    def from_points(cls, means: Tensor, colors: Tensor, sizes: Tensor, opacity: float,
                    num_steps: int = 1) -> FitGaussians:
        """Round Gaussians at `means` [N, 3] with `colors` [N, 3], `sizes` [N] (sigma) and
        one opacity, the same at each of `num_steps` timesteps."""
        n, device = len(means), means.device
        quats = torch.zeros(n, 4, device=device)
        quats[:, 0] = 1
        log_scales = torch.log(sizes.clamp(min=SCALE_FLOOR))[:, None].expand(n, 3)
        return cls(means.float(), quats, log_scales.float(),
                   inverse_sigmoid(torch.full((n,), opacity, device=device)),
                   ((colors.float() - 0.5) / SH_C0), num_steps)

    def __len__(self) -> int:
        return self.log_scales.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.means)

    def appearance(self) -> list[Tensor]:
        return [self.log_scales, self.opacity_logits, self.sh0]

    def activated(self, t: int) -> dict[str, Tensor]:
        """rasterize() arguments of timestep t (the 3D filter applied)."""
        scales, opacities = self.filtered()
        return {"means": self.means[t], "quats": self.quats[t], "scales": scales,
                "opacities": opacities, "colors": (0.5 + SH_C0 * self.sh0).clamp(min=0.0)}

    def filtered(self) -> tuple[Tensor, Tensor]:
        """Scales [N, 3] and opacities [N] with the 3D filter: variances s^2 + filter_var,
        opacity x sqrt(prod s^2 / prod (s^2 + filter_var)) (the same integral)."""
        variances = torch.exp(2 * self.log_scales)
        opacities = torch.sigmoid(self.opacity_logits)
        if not bool((self.filter_var > 0).any()):
            return variances.sqrt(), opacities
        widened = variances + self.filter_var[:, None]
        keep = torch.exp(0.5 * (torch.log(variances) - torch.log(widened)).sum(dim=-1))
        return widened.sqrt(), opacities * keep

    def set_filter(self, c2w: list[Tensor], intrinsics: list[Tensor],
                   variance_px: float) -> None:
        """The 3D filter from the input cameras: `c2w` [C_t, 4, 4] and `intrinsics`
        [C_t, 6] the fitted cameras of each timestep t (weightless cells left out by the
        caller). A Gaussian's filter variance is `variance_px` pixels^2 at the finest
        footprint (z / f) of the cameras that see it in their frame; Gaussians no camera
        sees take the coarsest footprint of those seen."""
        with torch.no_grad():
            n = len(self)
            finest = torch.full((n,), float("inf"), device=self.log_scales.device)
            for t, m in enumerate(self.means):
                if c2w[t].numel() == 0:
                    continue
                w2c = c2w_to_viewmat(c2w[t])  # [C, 4, 4]
                cam = m.detach() @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
                z = cam[..., 2]  # [C, N]
                fx, fy, cx, cy, width, height = (intrinsics[t][:, k, None] for k in range(6))
                x = fx * cam[..., 0] / z.clamp(min=1e-9) + cx
                y = fy * cam[..., 1] / z.clamp(min=1e-9) + cy
                inside = ((z > 1e-6) & (x >= -0.15 * width) & (x <= 1.15 * width)
                          & (y >= -0.15 * height) & (y <= 1.15 * height))
                footprint = (z / torch.minimum(fx, fy)).masked_fill(~inside, float("inf"))
                finest = torch.minimum(finest, footprint.amin(dim=0))
            seen = torch.isfinite(finest)
            if not bool(seen.any()):
                self.filter_var = torch.zeros_like(finest)
                return
            finest = torch.where(seen, finest, finest[seen].max())
            self.filter_var = variance_px * finest ** 2

    def select(self, keep: Tensor) -> None:
        """Keep Gaussians where `keep` [N] is true (or the indices it lists), at every step."""
        def take(x: Tensor) -> Tensor:
            return x.detach()[keep].clone().requires_grad_()
        self.means = [take(m) for m in self.means]
        self.quats = [take(q) for q in self.quats]
        self.log_scales, self.opacity_logits, self.sh0 = (
            take(self.log_scales), take(self.opacity_logits), take(self.sh0))
        self.filter_var = self.filter_var[keep]
        self.ground = self.ground[keep]

    def append(self, means: list[Tensor], quats: list[Tensor], log_scales: Tensor,
               opacity_logits: Tensor, sh0: Tensor, filter_var: Tensor,
               ground: Tensor | None = None) -> None:
        """Add Gaussians (per-timestep means and quats, shared appearance, their filter,
        whether they are held on the ground)."""
        def cat(a: Tensor, b: Tensor) -> Tensor:
            return torch.cat([a.detach(), b.detach()]).requires_grad_()
        self.means = [cat(a, b) for a, b in zip(self.means, means, strict=True)]
        self.quats = [cat(a, b) for a, b in zip(self.quats, quats, strict=True)]
        self.log_scales = cat(self.log_scales, log_scales)
        self.opacity_logits = cat(self.opacity_logits, opacity_logits)
        self.sh0 = cat(self.sh0, sh0)
        self.filter_var = torch.cat([self.filter_var, filter_var.detach()])
        if ground is None:
            ground = torch.zeros(len(filter_var), dtype=torch.bool, device=filter_var.device)
        self.ground = torch.cat([self.ground, ground])

    def hold_on_plane(self, normal: Tensor, offset: Tensor, opacity: float = 0.0,
                      follow: bool = False) -> Tensor:
        """Ground Gaussians back onto the plane n.x + d = 0, at one position for every
        timestep (their mean over timesteps), and at least `opacity` opaque. With `follow`
        the plane first moves along its normal to the ground Gaussians' mean height (where
        the optimiser pulled them), so a plane found a little off settles where the views
        put the ground. Returns the offset d used."""
        if not bool(self.ground.any()):
            return offset
        with torch.no_grad():
            shared = torch.stack([m[self.ground] for m in self.means]).mean(dim=0)
            if follow:
                offset = -(shared @ normal).mean()
            shared -= (shared @ normal + offset)[:, None] * normal
            for m in self.means:  # the ground does not move: one position at every timestep
                m[self.ground] = shared
            if opacity > 0:
                floor = inverse_sigmoid(torch.tensor(opacity, device=self.ground.device))
                logits = self.opacity_logits[self.ground]
                self.opacity_logits[self.ground] = torch.maximum(logits, floor)
        return offset

    def to_gaussians(self) -> list[Gaussians]:
        """One Gaussians container per timestep, index i the same Gaussian in each (the 3D
        filter baked into scales and opacities)."""
        with torch.no_grad():
            def array(x: Tensor):
                return x.detach().float().cpu().numpy()
            scales, opacities = self.filtered()
            shared = {"log_scales": array(torch.log(scales)),
                      "opacity_logits": array(inverse_sigmoid(opacities)),
                      "sh0": array(self.sh0)}
            return [Gaussians(means=array(m),
                              quats=array(torch.nn.functional.normalize(q, dim=-1)), **shared)
                    for m, q in zip(self.means, self.quats, strict=True)]


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:  # [..., 4] (w, x, y, z) each
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def quat_conjugate(q: Tensor) -> Tensor:
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)


def quat_to_matrix(q: Tensor) -> Tensor:  # [..., 4] -> [..., 3, 3]
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        dim=-1).reshape(*q.shape[:-1], 3, 3)
