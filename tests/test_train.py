"""Training and evaluation entry points: short seeded runs on the CPU, checkpoints that
resume, a two-process run under torchrun (gloo), the evaluation report and its baselines."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import backend.diffusion.attention as attention
from backend.cameras import unproject_depth
from backend.checkpoint import save_pretrained
from backend.data import DataConfig, PoolConfig, make_sample
from backend.diffusion.model import VideoDiT
from backend.recon import ReconModel
from backend.train import (
    DiffusionTrainConfig,
    EvalConfig,
    ExponentialMovingAverage,
    ReconTrainConfig,
    copy_baseline,
    cosine_learning_rate,
    evaluate_all,
    list_checkpoints,
    load_checkpoint,
    sample_cell_masks,
    train_diffusion,
    train_recon,
)
from backend.train.__main__ import main
from backend.train.common import _resume, find_resume_checkpoint, make_optimizer
from backend.train.config_cli import build_config
from backend.train.diffusion import build_diffusion_job, diffusion_loss
from backend.train.evaluate import (
    depth_scores,
    frame_psnr,
    scored_cells,
    seen_by_inputs,
    setting_mask,
    summarise_depth,
    visibility_ceiling,
)
from backend.train.recon import GeometryValidSamples, choose_view_split, recon_loss

ROOT = Path(__file__).resolve().parent.parent
TINY_DIFFUSION = {"width": 32, "depth": 2, "num_heads": 2}
TINY_RECON = {"width": 32, "depth": 1, "num_heads": 2, "head_features": 16,
              "dense_layers": [0, 0, 0, 0]}


def tiny_diffusion_config(output_dir: Path, steps: int = 2) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(
        data=DataConfig(num_views=2, num_steps=3, height=16, width=16),
        model_overrides=dict(TINY_DIFFUSION), pool=PoolConfig(num_samples=4), batch_size=2,
        steps=steps, warmup_steps=1, log_every=1, checkpoint_every=2,
        output_dir=str(output_dir))


def tiny_recon_config(output_dir: Path, steps: int = 2) -> ReconTrainConfig:
    return ReconTrainConfig(
        data=DataConfig(num_views=3, num_steps=2, height=16, width=16,
                        homography_fraction=0.0),
        model_overrides=dict(TINY_RECON), input_views=2, target_timesteps=1,
        pool=PoolConfig(num_samples=2), batch_size=1, steps=steps, warmup_steps=1,
        log_every=1, output_dir=str(output_dir))


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def assert_resumes(output_dir: Path, first_steps: int) -> None:
    """A rerun at the same step count loads the checkpoint and trains nothing; the re-saved
    final weights equal the checkpoint's EMA (or model) weights bit for bit."""
    checkpoint = list_checkpoints(output_dir)[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"step_{first_steps:06d}" and state["step"] == first_steps
    averaged = checkpoint / "ema" if (checkpoint / "ema").is_dir() else checkpoint / "model"
    final = load_file(str(output_dir / "model" / "model.safetensors"))
    assert_same_tensors(final, load_file(str(averaged / "model.safetensors")))


# ------------------------------------------------------------------------------ training


def test_diffusion_run_writes_checkpoint_log_and_resumes(tmp_path):
    out = tmp_path / "diffusion"
    final = train_diffusion(tiny_diffusion_config(out, steps=2))
    assert final == out / "model" and (final / "config.json").is_file()
    assert_resumes(out, 2)
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and record["lr"] > 0 and record["samples_per_s"] > 0

    train_diffusion(tiny_diffusion_config(out, steps=2))  # nothing left: reload and re-save
    assert_resumes(out, 2)
    train_diffusion(tiny_diffusion_config(out, steps=3))
    log = read_log(out)
    starts = [r for r in log if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 2, 2]
    assert starts[-1]["resumed_from"].endswith("step_000002")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())[
        "samples_seen"] == 6


def test_checkpoint_reload_restores_model_ema_and_optimizer(tmp_path):
    out = tmp_path / "diffusion"
    config = tiny_diffusion_config(out, steps=2)
    train_diffusion(config)
    checkpoint = list_checkpoints(out)[-1]
    job = build_diffusion_job(config, _single_process())
    optimizer = make_optimizer(job.model, config)
    ema = ExponentialMovingAverage(job.model, config.ema_decay)
    state = load_checkpoint(checkpoint, job.model, job.model_config, ema, optimizer)
    assert state["step"] == 2
    assert_same_tensors(job.model.state_dict(),
                        load_file(str(checkpoint / "model" / "model.safetensors")))
    assert_same_tensors(ema.model.state_dict(),
                        load_file(str(checkpoint / "ema" / "model.safetensors")))
    assert not torch.equal(job.model.proj_out.weight, ema.model.proj_out.weight)
    steps = {float(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {2.0}


def test_resume_with_another_model_config_is_refused(tmp_path):
    out = tmp_path / "diffusion"
    train_diffusion(tiny_diffusion_config(out, steps=2))
    changed = tiny_diffusion_config(out, steps=3)
    changed.model_overrides["mlp_ratio"] = 2.0
    with pytest.raises(ValueError, match="another model config"):
        train_diffusion(changed)


def test_init_weights_start_a_fresh_run_from_exported_weights(tmp_path):
    first = train_diffusion(tiny_diffusion_config(tmp_path / "first", steps=2))
    exported = load_file(str(first / "model.safetensors"))
    config = tiny_diffusion_config(tmp_path / "second", steps=2)
    config.init_weights = str(first)
    config.model_overrides["cfg_dropout"] = 0.3  # not in the weights: allowed, and logged
    job = build_diffusion_job(config, _single_process())
    fresh = {k: v.clone() for k, v in job.model.state_dict().items()}
    optimizer = make_optimizer(job.model, config)
    ema = ExponentialMovingAverage(job.model, config.ema_decay)
    state = _resume(job, job.model, ema, optimizer)
    assert state["step"] == 0 and state["initialised_from"] == str(first)
    assert state["init_config_differences"] == ["cfg_dropout"]
    assert any(not torch.equal(fresh[k], exported[k]) for k in exported)
    assert_same_tensors(job.model.state_dict(), exported)
    assert_same_tensors(ema.model.state_dict(), exported)
    train_diffusion(config)
    start = json.loads((tmp_path / "second" / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["initialised_from"] == str(first)
    # once the run has its own checkpoint, going on resumes that and ignores init_weights
    config.steps = 3
    job = build_diffusion_job(config, _single_process())
    optimizer = make_optimizer(job.model, config)
    state = _resume(job, job.model, ExponentialMovingAverage(job.model, 0.9), optimizer)
    checkpoint = tmp_path / "second" / "checkpoints" / "step_000002"
    assert state["step"] == 2 and state["resumed_from"] == str(checkpoint)
    assert "initialised_from" not in state and "resumed" in state["init_weights_ignored"]
    assert_same_tensors(job.model.state_dict(),
                        load_file(str(checkpoint / "model" / "model.safetensors")))


def test_init_weights_of_another_shape_or_a_missing_folder_are_refused(tmp_path):
    first = train_diffusion(tiny_diffusion_config(tmp_path / "first", steps=2))
    config = tiny_diffusion_config(tmp_path / "second", steps=2)
    config.model_overrides["mlp_ratio"] = 2.0
    config.init_weights = str(first)
    with pytest.raises(ValueError, match=r"(?s)cannot load the weights .*size mismatch.*"
                                         r"configs differ in mlp_ratio"):
        train_diffusion(config)
    config.init_weights = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a save_pretrained folder"):
        train_diffusion(config)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"config": [1, 2]}')
    config.init_weights = str(tmp_path / "broken")
    with pytest.raises(ValueError, match="cannot load the weights"):
        train_diffusion(config)


def test_time_budget_ends_the_sitting_with_a_checkpoint(tmp_path):
    out = tmp_path / "diffusion"
    config = tiny_diffusion_config(out, steps=50)
    config.max_minutes = 1e-6
    train_diffusion(config)
    assert [p.name for p in list_checkpoints(out)] == ["step_000001"]
    assert (out / "model" / "model.safetensors").is_file()
    assert find_resume_checkpoint(config) == out / "checkpoints" / "step_000001"
    config.resume = str(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        find_resume_checkpoint(config)
    config.resume = "none"
    assert find_resume_checkpoint(config) is None


def test_cpu_time_budget_ends_the_sitting_and_a_wall_budget_left_alone_does_not(tmp_path):
    out = tmp_path / "diffusion"
    config = tiny_diffusion_config(out, steps=3)
    config.max_cpu_minutes, config.max_minutes = 1e-6, 60.0
    train_diffusion(config)
    assert [p.name for p in list_checkpoints(out)] == ["step_000001"]
    with pytest.raises(ValueError, match="max_cpu_minutes"):
        replace(config, max_cpu_minutes=0.0)


def test_recon_run_writes_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "recon"
    train_recon(tiny_recon_config(out, steps=2))
    assert_resumes(out, 2)
    train_recon(tiny_recon_config(out, steps=3))
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("mse", "ssim", "depth", "camera"):
        assert all(math.isfinite(r[key]) for r in records), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_on_cpu_and_resume(tmp_path):
    out = tmp_path / "ddp"
    config = tiny_diffusion_config(out, steps=2).to_dict()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
               "-m", "backend.train", "diffusion", "--config", json.dumps(config)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    start = next(r for r in read_log(out) if r.get("event") == "start")
    assert start["world_size"] == 2
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["samples_seen"] for r in records] == [4, 8]  # 2 processes x batch 2
    assert_resumes(out, 2)
    train_diffusion(tiny_diffusion_config(out, steps=3))  # resumed by one process
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]


def _single_process():
    from backend.train.common import DistributedContext

    return DistributedContext()


def test_training_attention_is_the_differentiable_decomposed_kernel(monkeypatch):
    calls = []
    original = attention.decomposed_view_time_attention

    def counting(*args, **kwargs):
        calls.append(args[0].requires_grad)
        return original(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("flex attention was chosen while training")

    monkeypatch.setattr(attention, "decomposed_view_time_attention", counting)
    monkeypatch.setattr(attention, "flex_view_time_attention", refuse)
    config = tiny_diffusion_config(Path("unused"))
    assert config.model_config().attention_impl == "auto"
    torch.manual_seed(0)
    model = VideoDiT(config.model_config()).train()
    for weight in model.parameters():  # zero-initialised gates and output would block grads
        if weight.ndim == 2 and not weight.any():
            torch.nn.init.normal_(weight, std=0.05)
    sample = make_sample(config.data, 0).to_tensors()
    batch = {k: v[None] for k, v in sample.items()}
    loss, _ = diffusion_loss(model, batch, 0, config, rank=0)
    loss.backward()
    assert len(calls) == config.model_config().depth and all(calls)
    qkv = model.blocks[0].attentions[0].qkv.weight.grad
    assert qkv is not None and qkv.abs().sum() > 0


# ------------------------------------------------------------------------------ pieces


def test_cell_mask_policies():
    rng = np.random.default_rng(0)
    row = sample_cell_masks(3, 4, 5, {"row": 1.0}, 0.3, rng)
    assert row[:, 0].all() and not row[:, 1:].any()
    both = sample_cell_masks(3, 4, 5, {"row_and_column": 1.0}, 0.3, rng)
    assert both[:, 0].all() and both[:, :, 0].all() and not both[:, 1:, 1:].any()
    random = sample_cell_masks(200, 2, 2, {"random": 1.0}, 0.9, rng)
    given = random.flatten(1).sum(1)
    assert (given >= 1).all() and (given <= 3).all()
    mixed = sample_cell_masks(400, 3, 3, {"row": 1.0, "row_and_column": 3.0}, 0.3, rng)
    share = mixed[:, 1, 0].float().mean()  # given only under row_and_column
    assert 0.68 < share < 0.82


def test_view_split_holds_views_out():
    config = tiny_recon_config(Path("unused"))
    split = choose_view_split(3, 2, config, np.random.default_rng(1))
    held = sorted(set(split.targets) - set(split.inputs))
    assert len(split.inputs) == 2 and len(held) == 1 and len(split.timesteps) == 1
    config.supervise_input_views = False
    split = choose_view_split(3, 2, config, np.random.default_rng(1))
    assert not set(split.targets) & set(split.inputs)


def test_view_counts_vary_per_step_and_the_input_depth_term_scores_the_models_depth(tmp_path):
    config = tiny_recon_config(tmp_path)
    config.data = replace(config.data, num_views=5)
    config.input_views, config.min_input_views = 4, 1
    counts = {len(choose_view_split(5, 2, config, np.random.default_rng([0, 0, step])).inputs)
              for step in range(60)}
    assert counts == {1, 2, 3, 4}  # every count from a single video to the full rig
    with pytest.raises(ValueError, match="min_input_views"):
        replace(config, min_input_views=5)
    with pytest.raises(ValueError, match="input_depth_weight"):
        replace(config, input_depth_weight=-1.0)
    torch.manual_seed(0)
    model = ReconModel(config.model_config())
    batch = {k: v[None] for k, v in make_sample(config.data, 0).to_tensors().items()}
    without, parts = recon_loss(model, batch, 0, config, 0)
    assert "input_depth" not in parts
    config.input_depth_weight = 1.0
    with_depth, parts = recon_loss(model, batch, 0, config, 0)
    # the same split and renders; the term is the model's depth error at the input views
    term = float(parts["input_depth"].detach())
    assert float((with_depth - without).detach()) == pytest.approx(term, rel=1e-4)
    assert term > 0


def test_geometry_invalid_samples_are_skipped():
    items = [{"geometry_valid": torch.tensor(flag), "index": torch.tensor(i)}
             for i, flag in enumerate([True, False, True, False])]
    kept = [int(item["index"]) for item in GeometryValidSamples(items)]
    assert kept == [0, 2]


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    lrs = [cosine_learning_rate(s, 1.0, 10, 110, 0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[110] == pytest.approx(0.1)


def test_ema_trails_the_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = ExponentialMovingAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)
    assert torch.allclose(ema.model.weight, start + 0.1)
    ema.update(model, step=0)  # early steps use decay (1 + step) / (10 + step) = 0.1
    assert torch.allclose(ema.model.weight, start + 0.1 + 0.9 * 0.9)


def test_config_round_trip_cli_overrides_and_errors():
    config = build_config(DiffusionTrainConfig, '{"data": {"height": 32, "width": 32}}',
                          ["model_overrides.patch_size=4", "pool.num_samples=16"],
                          {"steps": 7, "lr": None})
    assert (config.data.height, config.data.num_views, config.steps) == (32, 4, 7)
    assert config.model_config().patch_size == 4 and config.pool.num_samples == 16
    assert config.model_config().image_size == (32, 32)
    again = DiffusionTrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown key"):
        build_config(DiffusionTrainConfig, None, ["data.heigth=3"], {})
    with pytest.raises(ValueError, match="mask_weights"):
        DiffusionTrainConfig(mask_weights={"diagonal": 1.0})
    with pytest.raises(ValueError, match="image_size"):
        DiffusionTrainConfig(model_overrides={"image_size": (32, 32)})
    with pytest.raises(ValueError, match="input_views"):
        ReconTrainConfig(input_views=6)
    with pytest.raises(ValueError, match="batch_size"):
        DiffusionTrainConfig(batch_size=0)


def test_cli_reports_bad_input(capsys):
    assert main(["diffusion", "--set", "lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["diffusion", "--set", "data.height=32", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["height"] == 32


# ------------------------------------------------------------------------------ evaluation


def test_copy_baselines_copy_the_right_cells():
    B, V, T = 2, 3, 4
    values = torch.arange(B * V * T, dtype=torch.float32).reshape(B, V, T, 1, 1, 1)
    frames = values.expand(B, V, T, 3, 2, 2)
    over_time = copy_baseline(frames, "row_and_column")
    assert torch.equal(over_time, frames[:, :, :1].expand_as(frames))
    assert over_time[1, 2, 3, 0, 0, 0] == values[1, 2, 0, 0, 0, 0]
    over_views = copy_baseline(frames, "row_only")
    assert over_views[1, 2, 3, 0, 0, 0] == values[1, 0, 3, 0, 0, 0]
    assert setting_mask("row_and_column", V, T).sum() == V + T - 1
    assert setting_mask("row_only", V, T).sum() == T
    with pytest.raises(ValueError, match="setting"):
        copy_baseline(frames, "column_only")


def test_copy_baseline_is_perfect_where_copying_is_exact():
    data = DataConfig(num_views=3, num_steps=3, height=16, width=16, homography_strength=0.0)
    static = make_sample(data, 5, kind="static").frames[None]  # still scene and rig
    cells = ~setting_mask("row_and_column", 3, 3)
    psnr_static, ssim_static = scored_cells(copy_baseline(static, "row_and_column"), static,
                                            cells)
    assert (psnr_static >= 119.9).all() and torch.allclose(ssim_static, torch.ones(4))
    psnr_row_only, _ = scored_cells(copy_baseline(static, "row_only"), static,
                                    ~setting_mask("row_only", 3, 3))
    assert psnr_row_only.max() < 60  # other views of a still scene do differ
    identical_views = make_sample(data, 6, kind="homography").frames[None]  # identity warps
    psnr_views, _ = scored_cells(copy_baseline(identical_views, "row_only"), identical_views,
                                 ~setting_mask("row_only", 3, 3))
    assert (psnr_views >= 119.9).all()
    assert frame_psnr(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.1)).item() == \
        pytest.approx(20.0)


def test_eval_writes_report_with_every_key_and_image_grids(tmp_path):
    torch.manual_seed(0)
    diffusion_config = tiny_diffusion_config(tmp_path).model_config()
    recon_config = tiny_recon_config(tmp_path).model_config()
    save_pretrained(tmp_path / "diffusion", VideoDiT(diffusion_config), diffusion_config)
    save_pretrained(tmp_path / "recon", ReconModel(recon_config), recon_config)
    config = EvalConfig(num_samples=2, num_views=2, num_steps=3, recon_held_out_views=1,
                        sampler_steps=2, batch_size=2, held_out_kind="static",
                        attention_impl="decomposed", output_dir=str(tmp_path / "eval"))
    report = evaluate_all(tmp_path / "diffusion", tmp_path / "recon", config)
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    for key in ("psnr_generated", "psnr_copy_baseline", "psnr_recon", "ssim_generated",
                "ssim_copy_baseline", "ssim_recon", "psnr_generated_row_only",
                "psnr_copy_baseline_row_only", "ssim_generated_row_only",
                "ssim_copy_baseline_row_only"):
        assert math.isfinite(on_disk[key]) and on_disk[key] == report[key], key
    assert on_disk["psnr_copy_baseline"] >= 119.9  # still scenes: copying over time is exact
    assert on_disk["psnr_copy_baseline_row_only"] < 60
    assert on_disk["psnr_generated"] < 60  # an untrained model does not match it
    for name in ("row_and_column", "row_only", "recon"):
        image = iio.imread(tmp_path / "eval" / f"grid_{name}.png")
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    grid = iio.imread(tmp_path / "eval" / "grid_row_and_column.png")
    assert grid.shape[1] > 2 * 3 * 16  # ground truth | generated, 3 timesteps each
    ceiling = on_disk["psnr_recon_visibility_ceiling"]
    assert math.isfinite(ceiling) and ceiling > on_disk["psnr_recon"]
    assert 0.0 <= on_disk["recon"]["recon_held_out_unseen_fraction"] < 1.0
    # both scene families, scored the same way; the top level is the dome family's
    assert list(on_disk["families"]) == ["dome", "open"]
    assert {k: on_disk[k] for k in on_disk["families"]["dome"]} == on_disk["families"]["dome"]
    for family, figures in on_disk["families"].items():
        assert len(figures) == 12 and all(math.isfinite(v) for v in figures.values()), family
        assert figures["depth_median_ratio"] > 0, family
        assert figures["psnr_copy_baseline"] >= 119.9, family  # still scenes in both
        assert figures["psnr_copy_baseline_row_only"] < 60, family
    assert on_disk["families"]["open"] != on_disk["families"]["dome"]
    for kind in ("diffusion", "recon"):
        for family in ("dome", "open"):
            held_out = on_disk[kind]["families"][family]["held_out"]
            assert held_out["data"]["scene_kind"] == family
    for name in ("row_and_column", "row_only", "recon"):
        assert (tmp_path / "eval" / f"grid_open_{name}.png").is_file()
    rc = main(["eval", "diffusion", "--weights", str(tmp_path / "diffusion"), "--config",
               json.dumps({**asdict(config), "families": ["open"],
                           "output_dir": str(tmp_path / "open")})])
    only_open = json.loads((tmp_path / "open" / "eval_diffusion.json").read_text())
    assert rc == 0 and list(only_open["families"]) == ["open"]
    assert only_open["psnr_generated"] == on_disk["families"]["open"]["psnr_generated"]


def test_depth_scores_measure_the_ratio_to_true_depth_and_split_ground_from_objects():
    data = DataConfig(num_views=3, num_steps=2, height=24, width=24, scene_kind="open")
    sample = make_sample(data, 4)
    views = [0, 2]
    truth = sample.depth[views, :, 0]
    exact = depth_scores(truth.clone(), sample, views)
    assert exact["median_ratio"] == pytest.approx(1.0) and exact["abs_rel"] < 1e-6
    assert {"median_ratio_ground", "median_ratio_objects"} <= set(exact)
    far = truth * 1.5  # everything 1.5x too far
    scores = depth_scores(far, sample, views)
    assert scores["median_ratio"] == pytest.approx(1.5, rel=1e-5)
    assert scores["abs_rel"] == pytest.approx(0.5, rel=1e-5)
    # only the ground pushed away: the split tells which part is off
    points = unproject_depth(truth.double(), sample.c2w[views].double(),
                             sample.intrinsics[views].double())
    ground = (points[..., 2] - sample.scene_info["ground_height"]).abs() < 1e-3
    ground_off = depth_scores(torch.where(ground, 2 * truth, truth), sample, views)
    assert ground_off["median_ratio_ground"] == pytest.approx(2.0, rel=1e-5)
    assert ground_off["median_ratio_objects"] == pytest.approx(1.0, rel=1e-5)
    summary = summarise_depth([exact, scores, ground_off])
    assert summary["depth_median_ratio"] == pytest.approx(
        float(np.median([1.0, 1.5, ground_off["median_ratio"]])))
    assert summary["depth_within_10pct"] == pytest.approx(1 / 3)
    assert summarise_depth([])["depth_median_ratio"] is None
    with pytest.raises(ValueError, match="predicted depth"):
        depth_scores(truth[:1], sample, views)


def test_visibility_ceiling_counts_what_the_input_views_saw():
    data = DataConfig(num_views=4, num_steps=2, height=16, width=16)
    sample = make_sample(data, 3)
    assert (sample.depth > 0).all()  # the backdrop fills every pixel
    # a view sees all of itself; the ceiling is then exact (capped at 120 dB)
    assert seen_by_inputs(sample, 1, [1]).all()
    exact, unseen = visibility_ceiling(sample, [1], [1], torch.zeros(3))
    assert (exact >= 119.9).all() and (unseen == 0).all()
    # other views see part of it; a source whose depth is off everywhere sees nothing
    # (the depth test is what keeps occluded points out)
    others = seen_by_inputs(sample, 1, [0, 2, 3])
    assert 0.0 < others.float().mean() < 1.0
    assert others.float().mean() >= seen_by_inputs(sample, 1, [0]).float().mean()
    wrong_depth = sample.depth.clone()
    wrong_depth[0] *= 1.5  # the neighbour's surfaces moved away from the true ones
    near = seen_by_inputs(sample, 1, [0]).float().mean()
    wrong = seen_by_inputs(replace(sample, depth=wrong_depth), 1, [0]).float().mean()
    assert near > 0.02 and wrong < 0.5 * near
    psnr, unseen = visibility_ceiling(sample, [1], [0, 2, 3], torch.full((3,), 0.5))
    assert psnr.shape == unseen.shape == (2,)
    assert torch.allclose(unseen, 1 - others.float().mean(dim=(-1, -2)))
    with pytest.raises(ValueError, match="needs samples with depth"):
        seen_by_inputs(replace(sample, depth=None), 1, [0])


@pytest.mark.parametrize("name, variants", [
    ("attention", ["fused", "sequential", "parallel"]),
    ("recon", ["full", "no_temporal_layers", "no_camera_token_replacement"]),
])
def test_ablation_trains_every_variant_with_one_budget(tmp_path, name, variants):
    base = (tiny_diffusion_config if name == "attention" else tiny_recon_config)(tmp_path)
    config = base.to_dict()
    config.pop("output_dir")
    eval_config = {"num_samples": 1, "num_views": 2, "num_steps": 3, "sampler_steps": 1,
                   "recon_held_out_views": 1, "held_out_kind": "static", "batch_size": 1}
    out = tmp_path / "ablation"
    rc = main(["ablation", name, "--config", json.dumps(config), "--steps", "1",
               "--output-dir", str(out), "--eval-config", json.dumps(eval_config)])
    assert rc == 0
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["rows"]] == variants
    key = "psnr_generated" if name == "attention" else "psnr_recon"
    for row, variant in zip(table["rows"], variants):
        assert row["steps"] == 1 and math.isfinite(row[key]) and row["final_loss"] > 0
        trained = json.loads((out / variant / "train" / "train_config.json").read_text())
        if name == "attention":
            assert trained["model_overrides"]["attention"] == variant
    if name == "recon":
        overrides = json.loads((out / "no_temporal_layers" / "train" / "train_config.json")
                               .read_text())["model_overrides"]
        assert overrides["use_temporal_attention"] is False
    assert (out / "ablation.md").read_text().count("\n") == len(variants) + 2


def test_export_writes_half_precision_weights_that_load(tmp_path):
    torch.manual_seed(0)
    config = tiny_recon_config(tmp_path).model_config()
    save_pretrained(tmp_path / "full", ReconModel(config), config)
    assert main(["export", "--weights", str(tmp_path / "full"), "--output",
                 str(tmp_path / "half")]) == 0
    from backend.checkpoint import load_pretrained

    _model, loaded_config = load_pretrained(tmp_path / "half", ReconModel, type(config))
    assert loaded_config == config
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < \
        0.6 * (tmp_path / "full" / "model.safetensors").stat().st_size
    assert main(["export", "--weights", str(tmp_path / "nowhere"), "--output",
                 str(tmp_path / "x")]) == 2


def test_interior_held_out_views_skip_the_rig_ends():
    from backend.train.evaluate import held_out_views

    rng = np.random.default_rng(0)
    drawn = {v for _ in range(50) for v in held_out_views(6, 2, True, rng)}
    assert drawn == {1, 2, 3, 4}
    anywhere = {v for _ in range(50) for v in held_out_views(6, 2, False, rng)}
    assert anywhere == set(range(6))
    assert len(held_out_views(3, 2, True, rng)) == 2  # too few interior views: any two
