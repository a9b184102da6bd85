"""A tiny reconstruction model learns one dynamic sample through the render loss."""

from __future__ import annotations

import pytest
import torch
from recon_scene import moving_spheres, orbit_grid, render_scene

from backend.recon import ReconConfig, ReconModel, psnr, reconstruction_loss

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit_one_sample(num_views: int, num_steps: int, steps: int, lr: float, warmup: float
                   ) -> tuple[float, float]:
    """Train on the sample's own views with the photometric loss; return the PSNR of its
    renders before and after.

    `warmup` is the fraction of steps spent raising the learning rate: the output layer
    starts near zero, so Adam needs a few small steps before its moment estimates settle.
    """
    c2w, intr = orbit_grid(num_views, num_steps, SIZE)
    scene = render_scene(moving_spheres(num_steps), c2w, intr, SIZE)
    torch.manual_seed(0)
    config = ReconConfig(patch_size=8, width=64, depth=2, num_heads=2, head_features=32,
                         dense_layers=(0, 0, 1, 1), image_size=(SIZE, SIZE))
    model = ReconModel(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=warmup)

    def render_psnr() -> float:
        with torch.no_grad():
            out = model(scene.frames, c2w, intr)
            loss = reconstruction_loss(out.gaussians, scene.frames, c2w, intr)
        return float(psnr(loss.renders.rgb, scene.frames))

    initial = render_psnr()
    for _ in range(steps):
        out = model(scene.frames, c2w, intr)
        loss = reconstruction_loss(out.gaussians, scene.frames, c2w, intr)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return initial, render_psnr()


def test_a_few_steps_raise_render_psnr_clearly():
    before, after = fit_one_sample(num_views=2, num_steps=2, steps=20, lr=1.5e-3, warmup=0.3)
    assert after > before + 3.0


@pytest.mark.slow
def test_tiny_model_overfits_one_dynamic_sample():
    before, after = fit_one_sample(num_views=3, num_steps=3, steps=150, lr=2e-3, warmup=0.3)
    assert before < 20.0 < 25.0 < after
