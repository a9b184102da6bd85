"""The diffusion recipe variants: the 3D cache render of the given frames, cache-conditioned
models, the changed-pixel loss weights, and the equal-compute recipe ablation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from backend.data import DataConfig, make_sample
from backend.diffusion.cache import render_cache
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.losses import masked_cell_mse
from backend.diffusion.model import VideoDiT
from backend.diffusion.sampler import EulerSampler
from backend.train.__main__ import main
from backend.train.diffusion import changed_pixel_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import tiny_diffusion_config


def _batch(sample):
    return (sample.frames[None], sample.depth[None], sample.c2w[None].clone(),
            sample.intrinsics[None].clone())


def test_cache_is_the_given_frame_from_the_same_camera_and_never_the_cell_itself():
    sample = make_sample(DataConfig(num_views=2, num_steps=2, height=16, width=16), 0)
    frames, depth, c2w, intrinsics = _batch(sample)
    c2w[:, 1], intrinsics[:, 1] = c2w[:, 0], intrinsics[:, 0]  # view 1 = view 0's camera
    mask = torch.tensor([[[True, True], [False, False]]])
    cache = render_cache(frames, depth, c2w, intrinsics, mask)
    assert cache.shape == (1, 2, 2, 4, 16, 16)
    hit = depth[0, 0, :, 0] > 0  # [T, H, W]
    covered = cache[0, 1, :, 3] > 0
    assert not (covered & ~hit).any(), "only pixels with depth become points"
    assert covered.float().mean() > 0.6, "all but the depth edges"
    assert torch.allclose(cache[0, 1, :, :3] * covered[:, None],
                          frames[0, 0] * covered[:, None])
    assert cache[0, 0].abs().sum() == 0, "a given cell's own frame is not its cache"


def test_cache_keeps_the_nearest_surface():
    sample = make_sample(DataConfig(num_views=3, num_steps=1, height=16, width=16), 1)
    frames, depth, c2w, intrinsics = _batch(sample)
    for v in (1, 2):  # every view the same camera
        c2w[:, v], intrinsics[:, v] = c2w[:, 0], intrinsics[:, 0]
    depth[:, 2] = depth[:, 0] * 2.0  # view 2: the same pixels, twice as far, another colour
    frames = frames.clone()
    frames[:, 2] = 1.0 - frames[:, 0]
    mask = torch.tensor([[[True], [False], [True]]])
    cache = render_cache(frames, depth, c2w, intrinsics, mask)
    covered = cache[0, 1, 0, 3] > 0
    assert covered.float().mean() > 0.5
    assert torch.allclose(cache[0, 1, 0, :3][:, covered], frames[0, 0, 0][:, covered])


def test_cache_places_the_given_view_in_another_camera():
    """Across a real rig the warped pixels match the other view's truth far better than
    the unwarped input frame does on the same pixels."""
    sample = make_sample(DataConfig(num_views=4, num_steps=2, height=32, width=32), 0)
    frames, depth, c2w, intrinsics = _batch(sample)
    mask = torch.zeros(1, 4, 2, dtype=torch.bool)
    mask[0, 0] = True
    cache = render_cache(frames, depth, c2w, intrinsics, mask)
    covered = cache[0, 1:, :, 3:] > 0  # [3, T, 1, H, W]
    assert covered.float().mean() > 0.1
    truth, warped = frames[0, 1:], cache[0, 1:, :, :3]
    unwarped = frames[0, :1].expand_as(truth)
    def error(a):
        return ((a - truth).square() * covered).sum() / covered.sum()
    assert error(warped) < 0.5 * error(unwarped)


def test_cache_rejects_mismatched_shapes():
    frames = torch.zeros(1, 2, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="depth must be"):
        render_cache(frames, torch.zeros(1, 2, 2, 1, 8, 4), torch.eye(4).expand(1, 2, 2, 4, 4),
                     torch.ones(1, 2, 2, 6), torch.ones(1, 2, 2, dtype=torch.bool))


def _cache_model() -> VideoDiT:
    config = DiffusionConfig(width=24, depth=1, num_heads=1, patch_size=4, image_size=(8, 8),
                             max_views=2, t_max=2, cache_conditioning=True,
                             reference_conditioning=True, prediction="x0")
    torch.manual_seed(0)
    model = VideoDiT(config)
    for parameter in model.parameters():  # leave the zero initialisation behind
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_cache_conditioned_model_reads_the_cache_except_in_the_null_branch():
    model = _cache_model()
    x, cond = torch.randn(2, 2, 2, 3, 8, 8), torch.randn(2, 2, 2, 3, 8, 8)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0] = True
    rays = torch.randn(2, 2, 2, 6, 8, 8)
    s = torch.full((2,), 0.5)
    a, b = torch.randn(2, 2, 2, 4, 8, 8), torch.randn(2, 2, 2, 4, 8, 8)
    drop = torch.tensor([False, True])
    with torch.no_grad():
        out_a = model(x, s, cond, mask, rays=rays, cache=a, drop_conditioning=drop)
        out_b = model(x, s, cond, mask, rays=rays, cache=b, drop_conditioning=drop)
    assert not torch.allclose(out_a[0], out_b[0])
    assert torch.allclose(out_a[1], out_b[1])
    with pytest.raises(ValueError, match=r"\(cache=\) is required"):
        model(x, s, cond, mask, rays=rays)
    with pytest.raises(ValueError, match="cache must have shape"):
        model(x, s, cond, mask, rays=rays, cache=a[..., :4])
    sampler = EulerSampler(steps=2, guidance=2.0)
    grid = sampler.sample(model, cond, mask, rays=rays, cache=a,
                          generator=torch.Generator().manual_seed(0))
    assert grid.shape == cond.shape and torch.equal(grid[:, 0], cond[:, 0])


def test_changed_pixel_weights_mark_what_moves_after_the_first_frame():
    frames = torch.full((1, 2, 3, 3, 8, 8), 0.5)
    frames[0, 1, 2, 1, 2:4, 5:7] = 0.9  # a small change in view 1 at timestep 2
    frames[0, 0, 1] += 0.01  # below the threshold
    weights = changed_pixel_weights(frames, 3.0, 0.05)
    assert weights.shape == (1, 2, 3, 1, 8, 8)
    assert weights[0, 1, 2, 0, 2:4, 5:7].eq(4.0).all()
    assert weights.eq(4.0).sum() == 4 and weights.min() == 1.0
    prediction, target = torch.randn(1, 2, 3, 3, 8, 8), torch.randn(1, 2, 3, 3, 8, 8)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    plain = masked_cell_mse(prediction, target, mask)
    assert torch.allclose(masked_cell_mse(prediction, target, mask, torch.ones_like(weights)),
                          plain)
    weighted = masked_cell_mse(prediction, target, mask, weights)
    assert not torch.allclose(weighted, plain)


def test_recipe_variants_run_as_separate_processes_into_one_table(tmp_path, capsys):
    config = tiny_diffusion_config(tmp_path).to_dict()
    config.pop("output_dir")
    eval_config = {"num_samples": 1, "num_views": 2, "num_steps": 3, "sampler_steps": 1,
                   "held_out_kind": "static", "batch_size": 1}
    out = tmp_path / "recipe"
    for variant in ("changed_pixels", "cache3d"):
        assert main(["ablation", "recipe", "--variants", variant, "--config",
                     json.dumps(config), "--steps", "1", "--output-dir", str(out),
                     "--eval-config", json.dumps(eval_config)]) == 0
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["cache3d", "changed_pixels"]
    for row in table["rows"]:
        assert math.isfinite(row["psnr_generated"]) and row["final_loss"] > 0
        assert math.isfinite(row["open_psnr_generated"]), "both eval families are scored"
    trained = json.loads((out / "cache3d" / "train" / "train_config.json").read_text())
    assert trained["model_overrides"]["cache_conditioning"] is True
    trained = json.loads((out / "changed_pixels" / "train" / "train_config.json").read_text())
    assert trained["changed_pixel_weight"] == 3.0
    assert main(["ablation", "recipe", "--variants", "nope", "--config", json.dumps(config),
                 "--output-dir", str(out)]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err
