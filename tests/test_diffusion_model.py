"""The 4D video diffusion transformer: config, forward, attention locality, loss, sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from backend.checkpoint import count_parameters
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.losses import (
    masked_cell_mse,
    rectified_flow_loss,
    sample_diffusion_time,
)
from backend.diffusion.model import VideoDiT, patchify, unpatchify
from backend.diffusion.sampler import EulerSampler, SamplingCancelled

VARIANTS = ("fused", "sequential", "parallel", "full")


def debug_config(**overrides) -> DiffusionConfig:
    values = dict(in_channels=3, patch_size=4, width=32, depth=2, num_heads=2, mlp_ratio=2.0,
                  t_max=4, max_views=4, use_camera_rays=False, cfg_dropout=0.0,
                  attention_impl="reference", image_size=(16, 16))
    values.update(overrides)
    return DiffusionConfig(**values)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Replace the zero-initialised weights so every path of the network is live."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def grid_inputs(B: int = 1, V: int = 3, T: int = 4, C: int = 3, H: int = 16, W: int = 16,
                seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, V, T, dtype=torch.bool)
    mask[:, 0, :] = True  # the input video: view 0 at every timestep
    mask[:, :, 0] = True  # the freeze-time column: every view at timestep 0
    return {"x": torch.randn(B, V, T, C, H, W, generator=generator),
            "s": torch.rand(B, generator=generator),
            "cond_frames": torch.randn(B, V, T, C, H, W, generator=generator),
            "cell_mask": mask}


def blob_grid(V: int = 2, T: int = 4, H: int = 16, W: int = 16) -> Tensor:
    """A smooth 4D sample: two coloured Gaussian blobs moving over time, shifting per view."""
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    frames = torch.zeros(1, V, T, 3, H, W)
    colours = torch.tensor([[1.0, -0.6, -0.8], [-0.7, 0.2, 0.9]])
    for v in range(V):
        for t in range(T):
            for i, colour in enumerate(colours):
                cx = W * (0.25 + 0.5 * i) + 1.5 * t * (1 - 2 * i) + 2.0 * v
                cy = H * 0.5 + 2.0 * math.sin(t + i)
                blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0**2))
                frames[0, v, t] += colour[:, None, None] * blob
    return frames.clamp(-1, 1)


# ---------------------------------------------------------------- config


def test_presets_are_valid_and_tiny_is_cpu_sized():
    for name in ("tiny", "small", "paper"):
        config = DiffusionConfig.preset(name)
        assert DiffusionConfig.from_dict(config.to_dict()) == config
    with torch.device("meta"):
        tiny = VideoDiT(DiffusionConfig.preset("tiny"))
    count = count_parameters(tiny)
    print(f"tiny preset: {count / 1e6:.2f}M parameters")
    assert 3e6 <= count <= 6e6
    with pytest.raises(ValueError, match="unknown preset"):
        DiffusionConfig.preset("huge")


def test_paper_preset_has_about_eleven_billion_parameters():
    with torch.device("meta"):
        model = VideoDiT(DiffusionConfig.preset("paper"))
    count = count_parameters(model)
    print(f"paper preset: {count / 1e9:.2f}B parameters")
    assert 10e9 <= count <= 12.5e9


@pytest.mark.parametrize(("overrides", "message"), [
    ({"attention": "diagonal"}, "attention must be"),
    ({"attention_impl": "cuda"}, "attention_impl"),
    ({"width": 30, "num_heads": 4}, "not divisible by num_heads"),
    ({"cross_attention": True, "context_dim": 0}, "context_dim"),
    ({"cfg_dropout": 1.0}, "cfg_dropout"),
    ({"image_size": (18, 16)}, "image_size"),
    ({"depth": 0}, "depth"),
    ({"conv_channels": -1}, "conv_channels"),
    ({"conv_channels": True}, "conv_channels"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        debug_config(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    config = debug_config(attention="parallel", image_size=(16, 32))
    values = config.to_dict()
    assert values["image_size"] == [16, 32]
    assert DiffusionConfig.from_dict(values) == config
    with pytest.raises(ValueError, match="unknown DiffusionConfig keys: colour"):
        DiffusionConfig.from_dict({**values, "colour": "red"})


# ---------------------------------------------------------------- model


def test_patchify_round_trip_and_token_order():
    frames = torch.randn(2, 3, 4, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    tokens = patchify(frames, 4)  # [B, V*T*h*w, C*p*p]
    assert tokens.shape == (2, 3 * 4 * 2 * 3, 48)
    assert torch.equal(unpatchify(tokens, 3, 4, 8, 12, 4), frames)
    v, t, y, x = 2, 1, 1, 2
    index = ((v * 4 + t) * 2 + y) * 3 + x
    patch = frames[0, v, t, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1)
    assert torch.equal(tokens[0, index], patch)


@pytest.mark.parametrize("attention", VARIANTS)
def test_forward_shapes_for_every_attention_variant(attention):
    torch.manual_seed(0)
    model = randomize(VideoDiT(debug_config(attention=attention)))
    inputs = grid_inputs(B=2)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all()


def test_forward_with_rays_and_cross_attention():
    torch.manual_seed(0)
    config = debug_config(use_camera_rays=True, cross_attention=True, context_dim=12)
    model = randomize(VideoDiT(config))
    inputs = grid_inputs(B=2)
    generator = torch.Generator().manual_seed(5)
    rays = torch.randn(2, 3, 4, 6, 16, 16, generator=generator)
    context = torch.randn(2, 7, 12, generator=generator)
    out = model(**inputs, rays=rays, context=context)
    assert out.shape == inputs["x"].shape
    other = model(**inputs, rays=rays + 1, context=context)
    assert not torch.allclose(out, other)


def test_fresh_model_predicts_zero_velocity():
    torch.manual_seed(0)
    out = VideoDiT(debug_config())(**grid_inputs())
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("attention", "isolated"), [
    ("fused", True), ("parallel", True), ("full", False), ("sequential", False)])
def test_one_block_sees_only_its_view_and_timestep(attention, isolated):
    torch.manual_seed(0)
    model = randomize(VideoDiT(debug_config(attention=attention, depth=1)))
    inputs = grid_inputs()
    base = model(**inputs)
    far = dict(inputs, x=inputs["x"].clone())
    far["x"][0, 2, 3] += 1.0  # cell (v=2, t=3): neither view 1 nor timestep 1
    changed = (model(**far) - base).abs().amax(dim=(3, 4, 5))[0]  # [V, T]
    assert changed[2, 3] > 1e-3
    assert changed[2, 1] > 1e-3 and changed[1, 3] > 1e-3  # same timestep / same view
    if isolated:
        assert changed[1, 1] == 0
    else:
        assert changed[1, 1] > 1e-3


def assert_given_frames_read_only_in_given_cells(model: VideoDiT) -> tuple[Tensor, Tensor]:
    """Edits of a non-given cell's frame change nothing, of a given cell's change the
    output, and dropped conditioning ignores the given frames. Returns (base, dropped)."""
    inputs = grid_inputs()
    base = model(**inputs)
    free_edit = dict(inputs, cond_frames=inputs["cond_frames"].clone())
    free_edit["cond_frames"][0, 1, 1] += 5.0  # not a given cell
    assert torch.equal(model(**free_edit), base)
    given_edit = dict(inputs, cond_frames=inputs["cond_frames"].clone())
    given_edit["cond_frames"][0, 0, 2] += 5.0  # a given cell
    assert not torch.allclose(model(**given_edit), base)
    dropped = model(**inputs, drop_conditioning=True)
    assert torch.equal(model(**given_edit, drop_conditioning=True), dropped)
    return base, dropped


def test_given_frames_are_read_only_in_given_cells():
    torch.manual_seed(0)
    base, dropped = assert_given_frames_read_only_in_given_cells(
        randomize(VideoDiT(debug_config())))
    assert not torch.allclose(dropped, base)


def test_drop_conditioning_is_per_sample():
    torch.manual_seed(0)
    model = randomize(VideoDiT(debug_config()))
    inputs = grid_inputs(B=2)
    drop = torch.tensor([False, True])
    mixed = model(**inputs, drop_conditioning=drop)
    assert torch.allclose(mixed[0], model(**inputs)[0], atol=1e-5)
    assert torch.allclose(mixed[1], model(**inputs, drop_conditioning=True)[1], atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"x": torch.zeros(1, 3, 4, 1, 16, 16)}, "channels"),
    ({"cell_mask": torch.zeros(1, 3, 4)}, "cell_mask"),
    ({"s": torch.zeros(2)}, "s must have shape"),
    ({"x": torch.zeros(1, 3, 5, 3, 16, 16), "cond_frames": torch.zeros(1, 3, 5, 3, 16, 16),
      "cell_mask": torch.zeros(1, 3, 5, dtype=torch.bool)}, "t_max"),
    ({"x": torch.zeros(1, 3, 4, 3, 16, 18)}, "divisible"),
    ({"rays": torch.zeros(1, 3, 4, 6, 16, 16)}, "without camera rays"),
    ({"context": torch.zeros(1, 2, 8)}, "no cross-attention"),
])
def test_forward_rejects_bad_inputs(change, message):
    model = VideoDiT(debug_config())
    with pytest.raises(ValueError, match=message):
        model(**{**grid_inputs(), **change})


# ---------------------------------------------------------------- loss


class CellwiseModel(nn.Module):
    """A stand-in velocity model whose output at a cell depends on that cell only."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, s, cond_frames, cell_mask, rays=None, context=None,
                drop_conditioning=None):
        return self.scale * x + cond_frames


def test_loss_ignores_given_cells():
    model = CellwiseModel()
    z = torch.randn(1, 3, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 0] = True

    def loss_of(grid: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(1)
        return rectified_flow_loss(model, grid, mask, generator=generator, cfg_dropout=0.0)

    base = loss_of(z)
    given_edit = z.clone()
    given_edit[0, 0, 2] += 3.0
    assert torch.equal(loss_of(given_edit), base)
    free_edit = z.clone()
    free_edit[0, 1, 2] += 3.0
    assert not torch.equal(loss_of(free_edit), base)


def test_masked_mse_averages_free_cells_only():
    prediction = torch.zeros(1, 2, 2, 1, 2, 2)
    target = torch.zeros(1, 2, 2, 1, 2, 2)
    target[0, 0, 0] = 100.0  # given: ignored
    target[0, 1, 1] = 3.0  # free: error 9 on one of three free cells
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    assert masked_cell_mse(prediction, target, mask).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="every cell"):
        masked_cell_mse(prediction, target, torch.ones(1, 2, 2, dtype=torch.bool))


def test_loss_matches_rectified_flow_definition_and_trains_the_model():
    torch.manual_seed(0)
    model = randomize(VideoDiT(debug_config()), std=0.05)
    z = blob_grid(V=3)
    mask = grid_inputs()["cell_mask"]
    s = torch.tensor([0.3])
    loss = rectified_flow_loss(model, z, mask, generator=torch.Generator().manual_seed(2), s=s)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    prediction = model((1 - 0.3) * z + 0.3 * eps, s, z, mask)
    assert loss.item() == pytest.approx(masked_cell_mse(prediction, eps - z, mask).item(),
                                        rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- sampler


def sampler_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize(VideoDiT(debug_config()), std=0.1).eval()
    inputs = grid_inputs()
    return model, inputs["cond_frames"], inputs["cell_mask"]


def test_sampler_clamps_given_cells_and_is_deterministic():
    model, cond, mask = sampler_setup()
    sampler = EulerSampler(steps=4)
    out = sampler.sample(model, cond, mask, generator=torch.Generator().manual_seed(3))
    assert out.shape == cond.shape
    assert torch.equal(out[mask], cond[mask])
    assert not torch.allclose(out[~mask], cond[~mask])
    again = sampler.sample(model, cond, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = sampler.sample(model, cond, mask, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(out, other)


def test_sampler_progress_and_cancel():
    model, cond, mask = sampler_setup()
    calls = []
    EulerSampler(steps=5).sample(model, cond, mask, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]
    checks = []

    def cancel_on_third_check() -> bool:
        checks.append(1)
        return len(checks) == 3

    with pytest.raises(SamplingCancelled):
        EulerSampler(steps=5).sample(model, cond, mask, should_cancel=cancel_on_third_check)
    assert len(checks) == 3


def test_sampler_guidance_changes_the_result():
    model, cond, mask = sampler_setup()
    plain = EulerSampler(steps=3).sample(model, cond, mask,
                                         generator=torch.Generator().manual_seed(0))
    guided = EulerSampler(steps=3, guidance=3.0).sample(
        model, cond, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guided).all()
    assert torch.equal(guided[mask], cond[mask])
    assert not torch.allclose(plain, guided)


def test_sampler_schedule_runs_from_noise_to_data():
    for shift in (1.0, 3.0):
        times = EulerSampler(steps=8, shift=shift).schedule()
        assert times[0] == 1.0 and times[-1] == 0.0
        assert (times[1:] < times[:-1]).all()
    assert EulerSampler(steps=8, shift=3.0).schedule()[4] > 0.5
    with pytest.raises(ValueError, match="steps"):
        EulerSampler(steps=0)


def test_sampler_with_exact_velocity_recovers_the_data():
    """With the true velocity of a single data point, Euler integration lands on it."""
    z = blob_grid()
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, 0] = True

    class Oracle(nn.Module):
        def forward(self, x, s, cond_frames, cell_mask, **kwargs):
            return (x - z) / s.clamp(min=1e-6).reshape(-1, 1, 1, 1, 1, 1)

    out = EulerSampler(steps=6).sample(Oracle(), z, mask,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, z, atol=1e-5)


# ---------------------------------------------------------------- overfitting


def overfit(config: DiffusionConfig, steps: int, lr: float, V: int, T: int, size: int
            ) -> tuple[float, float]:
    """Train on one blob grid; return the fixed-noise loss before and after."""
    torch.manual_seed(0)
    model = VideoDiT(config)
    z = blob_grid(V=V, T=T, H=size, W=size)
    mask = torch.zeros(1, V, T, dtype=torch.bool)
    mask[0, 0] = True
    s_eval = torch.linspace(0.15, 0.85, 6)

    def evaluation_loss() -> float:
        model.eval()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(123)
            losses = [rectified_flow_loss(model, z, mask, generator=generator, s=s[None])
                      for s in s_eval]
        model.train()
        return float(torch.stack(losses).mean())

    before = evaluation_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        loss = rectified_flow_loss(model, z, mask, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return before, evaluation_loss()


def test_debug_model_overfits_one_grid_quickly():
    before, after = overfit(debug_config(width=64, num_heads=2), steps=100, lr=2e-3, V=2, T=4,
                            size=16)
    print(f"overfit (fast): loss {before:.4f} -> {after:.4f}")
    assert after < before / 3


@pytest.mark.slow
def test_small_model_overfits_one_grid_tenfold():
    config = debug_config(width=96, num_heads=3, depth=4, patch_size=4, image_size=(32, 32),
                          t_max=8)
    before, after = overfit(config, steps=400, lr=1e-3, V=2, T=4, size=32)
    print(f"overfit (slow): loss {before:.4f} -> {after:.4f}")
    assert after < before / 10


def test_training_times_shift_towards_noise_and_hit_pure_noise():
    generator = torch.Generator().manual_seed(0)
    plain = sample_diffusion_time(4000, generator=generator)
    shifted = sample_diffusion_time(4000, generator=generator, shift=3.0)
    assert 0.45 < float(plain.median()) < 0.55
    assert 0.70 < float(shifted.median()) < 0.80  # 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    mixed = sample_diffusion_time(4000, generator=generator, terminal_fraction=0.3)
    assert 0.27 < float((mixed == 1.0).float().mean()) < 0.33
    assert float(mixed.min()) > 0.0
    with pytest.raises(ValueError, match="terminal_fraction"):
        sample_diffusion_time(4, terminal_fraction=1.5)


def test_reference_frames_are_the_copy_baselines():
    from backend.diffusion.model import reference_frames

    B, V, T = 1, 3, 4
    frames = torch.arange(B * V * T, dtype=torch.float32).reshape(B, V, T, 1, 1, 1)
    frames = frames.expand(B, V, T, 2, 2, 2).clone()  # cell (v, t) holds the value 4v + t
    both = torch.zeros(B, V, T, dtype=torch.bool)
    both[:, 0] = True
    both[:, :, 0] = True
    _, _, reference, has = reference_frames(frames, both)
    assert has.all()
    assert torch.equal(reference[0, :, :, 0, 0, 0], torch.tensor(
        [[0, 1, 2, 3], [4, 4, 4, 4], [8, 8, 8, 8]], dtype=torch.float32))  # own view's first
    row = torch.zeros(B, V, T, dtype=torch.bool)
    row[:, 0] = True
    by_view, by_time, reference, has = reference_frames(frames, row)
    assert torch.equal(reference[0, :, :, 0, 0, 0], torch.tensor(
        [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.float32))  # row 0, same t
    assert by_view[0, 1:].abs().max() == 0 and torch.equal(by_time, reference)
    sparse = torch.zeros(B, V, T, dtype=torch.bool)
    sparse[0, 1, 3] = True  # one given cell: nearest in time within view 1, else same t
    _, _, reference, has = reference_frames(frames, sparse)
    assert torch.equal(has[0], torch.tensor([[False, False, False, True], [True] * 4,
                                             [False, False, False, True]]))
    assert torch.equal(reference[0, :, :, 0, 0, 0], torch.tensor(
        [[0, 0, 0, 7], [7, 7, 7, 7], [0, 0, 0, 7]], dtype=torch.float32))
    ties = torch.zeros(B, V, T, dtype=torch.bool)
    ties[0, 0, 0] = ties[0, 0, 2] = True
    _, _, reference, _ = reference_frames(frames, ties)
    assert reference[0, 0, 1, 0, 0, 0] == 0  # equally near: the earlier frame


def test_fresh_reference_model_starts_at_the_copy_baseline():
    from backend.diffusion.model import reference_frames

    config = DiffusionConfig(patch_size=4, width=32, depth=1, num_heads=1, t_max=4,
                             max_views=4, use_camera_rays=False, reference_conditioning=True,
                             prediction="x0", image_size=(8, 8))
    model = VideoDiT(config).eval()
    generator = torch.Generator().manual_seed(0)
    z = torch.rand(2, 3, 4, 3, 8, 8, generator=generator) * 2 - 1
    eps = torch.randn(z.shape, generator=generator)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, :, 0] = True  # sample 0: row and column; sample 1: row only
    with torch.no_grad():
        velocity = model(eps, torch.ones(2), z, mask)
        estimate = eps - velocity  # x0 at s = 1
        _, _, reference, _ = reference_frames(z, mask)
        torch.testing.assert_close(estimate, reference, rtol=0, atol=1e-6)
        dropped = model(eps, torch.ones(2), z, mask, drop_conditioning=True)
    assert (eps - dropped).abs().max() < 1e-6  # the null branch has no references: x0 = 0
    s = torch.tensor([1.0, 0.3])
    loss = rectified_flow_loss(model.train(), z, mask, s=s, cfg_dropout=0.0,
                               generator=torch.Generator().manual_seed(1))
    # a fresh model's x0 error is the copy baseline's error, at every diffusion time
    copy_error = ((reference - z).square().mean(dim=(3, 4, 5)) * ~mask).sum() / (~mask).sum()
    torch.testing.assert_close(loss, copy_error, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert model.ref_embed.weight.grad is not None


def test_x0_model_samples_in_one_step_to_its_estimate():
    config = DiffusionConfig(patch_size=4, width=32, depth=1, num_heads=1, t_max=4,
                             max_views=4, use_camera_rays=False, reference_conditioning=True,
                             prediction="x0", image_size=(8, 8))
    model = VideoDiT(config).eval()
    z = torch.rand(1, 2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, :, 0] = True
    out = EulerSampler(steps=1).sample(model, z, mask)
    torch.testing.assert_close(out[0, 1], z[0, 1, :1].expand(3, 3, 8, 8))  # the copy baseline
    several = EulerSampler(steps=4).sample(model, z, mask)
    torch.testing.assert_close(several, out, rtol=0, atol=1e-5)  # a fixed point of the flow


# ---------------------------------------------------------------- convolutional hourglass


def hourglass_x0_config(**overrides) -> DiffusionConfig:
    return debug_config(conv_channels=16, reference_conditioning=True, prediction="x0",
                        **overrides)


def test_hourglass_is_off_by_default_and_old_configs_load():
    config = debug_config()
    assert config.conv_channels == 0 and VideoDiT(config).hourglass is None
    values = debug_config(conv_channels=8).to_dict()
    assert values["conv_channels"] == 8
    del values["conv_channels"]  # a config written before the option existed
    assert DiffusionConfig.from_dict(values).conv_channels == 0
    plain = {k for k in VideoDiT(config).state_dict()}
    hourglass = {k for k in VideoDiT(debug_config(conv_channels=8)).state_dict()}
    assert plain < hourglass and all(k.startswith("hourglass.") for k in hourglass - plain)


def test_fresh_hourglass_model_starts_at_the_copy_baseline_and_zero_velocity():
    from backend.diffusion.model import reference_frames

    torch.manual_seed(0)
    model = VideoDiT(hourglass_x0_config(use_camera_rays=True)).eval()
    inputs = grid_inputs(B=2)
    rays = torch.randn(2, 3, 4, 6, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        velocity = model(inputs["x"], torch.ones(2), inputs["cond_frames"],
                         inputs["cell_mask"], rays=rays)
        _, _, reference, _ = reference_frames(inputs["cond_frames"], inputs["cell_mask"])
    torch.testing.assert_close(inputs["x"] - velocity, reference, rtol=0, atol=1e-6)
    out = VideoDiT(debug_config(conv_channels=16))(**grid_inputs())
    assert torch.equal(out, torch.zeros_like(out))


def test_hourglass_trains_from_its_zero_head():
    torch.manual_seed(0)
    model = VideoDiT(debug_config(conv_channels=16))
    hourglass = model.hourglass
    z = blob_grid(V=3)
    mask = grid_inputs()["cell_mask"]
    probe = grid_inputs(seed=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        loss = rectified_flow_loss(model, z, mask, generator=torch.Generator().manual_seed(2),
                                   s=torch.tensor([0.5]), cfg_dropout=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        before = model(**probe)
    step()
    assert hourglass.head_convs[-1].weight.grad.abs().max() > 0
    assert hourglass.head_convs[-1].bias.grad.abs().max() > 0
    with torch.no_grad():
        after = model(**probe)
    assert not torch.allclose(before, after)
    step()  # the head is live now: gradients flow back into the stem
    for conv in (hourglass.stem_convs[0], hourglass.stem_convs[2], hourglass.down):
        assert conv.weight.grad.abs().max() > 0


def test_hourglass_shapes_on_a_non_square_grid_with_gradient_checkpointing():
    torch.manual_seed(0)
    model = randomize(VideoDiT(hourglass_x0_config(use_camera_rays=True)), std=0.1)
    inputs = grid_inputs(B=2, V=2, T=3, H=16, W=24)
    rays = torch.randn(2, 2, 3, 6, 16, 24, generator=torch.Generator().manual_seed(5))
    grads = []
    outs = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        out = model(**inputs, rays=rays)
        assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(model.hourglass.stem_convs[0].weight.grad.clone())
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0])
    big = grid_inputs(V=4, T=4)  # the largest grid the config allows
    big_rays = torch.randn(1, 4, 4, 6, 16, 16, generator=torch.Generator().manual_seed(6))
    assert model(**big, rays=big_rays).shape == big["x"].shape


def test_hourglass_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize(VideoDiT(hourglass_x0_config()), std=0.1).eval()
    model.save_pretrained(tmp_path / "hourglass")
    loaded = VideoDiT.from_pretrained(tmp_path / "hourglass")
    assert loaded.config.conv_channels == 16 and loaded.config == model.config
    inputs = grid_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


@pytest.mark.parametrize("reference_conditioning", [False, True])
def test_hourglass_reads_given_frames_only_in_given_cells(reference_conditioning):
    torch.manual_seed(0)
    config = debug_config(conv_channels=16, reference_conditioning=reference_conditioning)
    assert_given_frames_read_only_in_given_cells(randomize(VideoDiT(config), std=0.1))


def test_hourglass_stem_patches_follow_the_token_order():
    from backend.diffusion.model import ConvHourglass

    torch.manual_seed(0)
    hourglass = ConvHourglass(in_channels=5, channels=4, width=6, patch_size=4, out_channels=3)
    B, V, T, H, W = 2, 3, 2, 8, 12
    inputs = torch.randn(B, V, T, 5, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, patches = hourglass.stem(inputs)
        assert features.shape == (B * V * T, 4, H, W) and patches.shape == (B, V * T * 6, 6)
        b, v, t, y, x = 1, 2, 1, 1, 2
        frame = features[(b * V + v) * T + t][None]  # [1, c, H, W]
        expected = hourglass.down(frame)[0, :, y, x]  # [D]
        torch.testing.assert_close(patches[b, ((v * T + t) * 2 + y) * 3 + x], expected)
