"""What lies behind the Gaussians: a colour per viewing direction (real spherical harmonics
of a low degree), fitted with them. A sky or world gradient is a smooth function of the
direction only, so rays that miss every Gaussian take it from here instead of from sky-coloured
splats placed anywhere along the input rays (which veil cameras the rig did not have).
Degree 0 is one colour. Directions are world directions (the rig normalisation does not
rotate), so the coefficients carry over to the scene's frame unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005,
         -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)
MAX_DEGREE = 3


def sh_basis(directions: Tensor, degree: int) -> Tensor:  # [..., 3] unit -> [..., (d+1)^2]
    """Real SH basis values of degrees 0..degree at unit directions (3DGS' order and signs)."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"environment degree must be 0..{MAX_DEGREE}, got {degree}")
    x, y, z = directions.unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        basis += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        basis += [SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2 * zz - xx - yy),
                  SH_C2[3] * xz, SH_C2[4] * (xx - yy)]
    if degree >= 3:
        basis += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z,
                  SH_C3[2] * y * (4 * zz - xx - yy), SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
                  SH_C3[4] * x * (4 * zz - xx - yy), SH_C3[5] * z * (xx - yy),
                  SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(basis, dim=-1)


def ray_directions(viewmats: Tensor, Ks: Tensor, width: int, height: int) -> Tensor:
    """Unit world directions through the pixel centres: [C, H, W, 3] for view matrices
    [C, 4, 4] (world to camera, OpenCV) and pinhole matrices [C, 3, 3]."""
    ys = torch.arange(height, dtype=Ks.dtype, device=Ks.device) + 0.5
    xs = torch.arange(width, dtype=Ks.dtype, device=Ks.device) + 0.5
    fx, fy = Ks[:, 0, 0, None, None], Ks[:, 1, 1, None, None]
    cx, cy = Ks[:, 0, 2, None, None], Ks[:, 1, 2, None, None]
    u = ((xs[None, None, :] - cx) / fx).expand(-1, height, width)
    v = ((ys[None, :, None] - cy) / fy).expand(-1, height, width)
    camera = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [C, H, W, 3]
    rotation = viewmats[:, :3, :3].transpose(-1, -2)  # camera to world
    world = torch.einsum("cij,chwj->chwi", rotation, camera)
    return world / world.norm(dim=-1, keepdim=True)


class Environment:
    """Colour by direction: rgb = 0.5 + sum_k coeffs[k] * basis_k(direction), per channel
    (the DC term as in 3DGS' colours). `coeffs` [(degree+1)^2, 3]."""

    def __init__(self, coeffs: Tensor):
        count = coeffs.shape[0]
        degree = round(count ** 0.5) - 1
        if coeffs.ndim != 2 or coeffs.shape[1] != 3 or (degree + 1) ** 2 != count:
            raise ValueError(f"environment coefficients must be [(d+1)^2, 3], got "
                             f"{list(coeffs.shape)}")
        self.coeffs = coeffs
        self.degree = degree

    @classmethod
    def constant(cls, colour: Tensor, degree: int) -> Environment:
        coeffs = torch.zeros((degree + 1) ** 2, 3, dtype=torch.float32, device=colour.device)
        coeffs[0] = (colour.float() - 0.5) / SH_C0
        return cls(coeffs)

    def colour(self) -> Tensor:  # [3] the mean over all directions
        return 0.5 + SH_C0 * self.coeffs[0]

    def __call__(self, directions: Tensor) -> Tensor:  # [..., 3] -> [..., 3]
        return 0.5 + sh_basis(directions, self.degree) @ self.coeffs

    def image(self, viewmats: Tensor, Ks: Tensor, width: int, height: int) -> Tensor:
        """[C, H, W, 3] the environment seen through each camera."""
        return self(ray_directions(viewmats, Ks, width, height))

    def to_list(self) -> list[list[float]]:
        return [[round(float(c), 5) for c in row] for row in self.coeffs.detach().cpu()]

    @classmethod
    def from_list(cls, rows: list[list[float]]) -> Environment:
        return cls(torch.tensor(rows, dtype=torch.float32))
