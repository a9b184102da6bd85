"""The shipped checkpoints under backend/weights/: they load, and on three fixed held-out
samples of the procedural generator they still reach their figures (a broken model, loader
or sampler fails here). backend/weights/README.md has the full evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from backend.models import SHIPPED_WEIGHTS, available_models
from backend.train.evaluate import (
    EvalConfig,
    evaluate_diffusion,
    evaluate_recon,
    held_out_samples,
    load_model,
)

DIFFUSION, RECON = SHIPPED_WEIGHTS / "diffusion-tiny", SHIPPED_WEIGHTS / "recon-tiny"
SAMPLER_STEPS = 1  # the shipped diffusion model is sampled in one step (see the README)
# Floors on three samples, a little under what the shipped models reach there (row and
# column -0.30 dB, row only +1.50 dB, reconstruction 19.65 dB). The project's bars - 3 dB
# over the copy baseline given row 0 and column 0, 22 dB for reconstruction - are NOT met
# by these models (see backend/weights/README.md). A fresh or broken model starts at the
# copy baseline (gain 0) given row 0 only and near 10 dB for reconstruction, so it fails.
MIN_GAIN_ROW_AND_COLUMN_DB = -0.6
MIN_GAIN_ROW_ONLY_DB = 1.0
MIN_PSNR_RECON_DB = 18.5


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return EvalConfig(num_samples=3, sampler_steps=SAMPLER_STEPS, batch_size=3,
                      attention_impl="decomposed", device="cpu",
                      output_dir=str(tmp_path_factory.mktemp("eval")))


def test_shipped_checkpoints_are_listed_and_small():
    models = available_models()
    assert models["diffusion-tiny"]["model"] == "VideoDiT"
    assert models["recon-tiny"]["model"] == "ReconModel"
    for folder in (DIFFUSION, RECON):
        assert (folder / "model.safetensors").stat().st_size < 10e6
        assert json.loads((folder / "config.json").read_text())["format_version"] == 1


def test_diffusion_checkpoint_beats_the_copy_baselines(eval_config):
    model, config = load_model("diffusion", DIFFUSION, torch.device("cpu"), "decomposed")
    data = eval_config.data_config(config.image_size, eval_config.num_views)
    samples = held_out_samples(data, eval_config)
    report, _ = evaluate_diffusion(model, samples, eval_config, torch.device("cpu"))
    both, row = report["settings"]["row_and_column"], report["settings"]["row_only"]
    print(json.dumps({"row_and_column": both, "row_only": row}, indent=1))
    assert both["psnr_gain_db"] >= MIN_GAIN_ROW_AND_COLUMN_DB, both
    assert row["psnr_gain_db"] > MIN_GAIN_ROW_ONLY_DB, row


def test_reconstruction_checkpoint_renders_held_out_views(eval_config):
    model, config = load_model("recon", RECON, torch.device("cpu"))
    data = eval_config.data_config(config.image_size,
                                   eval_config.num_views + eval_config.recon_held_out_views)
    samples = held_out_samples(data, eval_config)
    report, _ = evaluate_recon(model, samples, eval_config, torch.device("cpu"))
    print(json.dumps({k: v for k, v in report.items() if isinstance(v, float)}, indent=1))
    assert report["psnr_recon"] >= MIN_PSNR_RECON_DB, report
