"""`build.py demo` end to end: real Blender (bpy), the add-on's operators, a real backend
child process over ZeroMQ and the shipped checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("psnr_generated", "psnr_copy_baseline", "psnr_recon", "ssim_generated",
           "ssim_copy_baseline", "ssim_recon", "psnr_recon_novel_view")
STAGES = ("scene", "render_truth", "backend_start", "generate_and_import",
          "export_render_save", "quality", "total")


def run_demo(out: Path, *args: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FOURREAL_WEIGHTS", None)  # the shipped checkpoints
    result = subprocess.run([sys.executable, "-m", "backend.tools.demo", "--out", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generated views vs Blender" in result.stdout
    return json.loads((out / "report.json").read_text())


def check_outputs(out: Path, report: dict, views: int, frames: int) -> None:
    for key in FIGURES:
        assert math.isfinite(report[key]), key
    assert set(STAGES) <= set(report["timings_s"])
    assert report["views"] == views and report["timesteps"] == frames
    plys = sorted((out / "gaussians").glob("*.ply"))
    assert len(plys) == frames
    assert all(n > 0 for n in report["gaussians_per_timestep"])
    grid = iio.imread(out / "grid.mp4")  # [T, h, V * w, 3] upscaled
    assert grid.shape[0] == frames and grid.shape[2] == views * grid.shape[1]
    render = iio.imread(out / "render.mp4")  # Blender's render | the Gaussians', side by side
    assert render.shape[0] == frames and render.shape[2] == 2 * render.shape[1]
    gaussians_half = render[..., render.shape[2] // 2:, :]
    assert gaussians_half.std() > 2.0, "the Cycles render of the imported Gaussians is blank"
    assert_blend_holds_the_asset(out / "scene.blend", frames)
    comparison = iio.imread(out / "docs" / "comparison.png")
    assert comparison.ndim == 3 and comparison.dtype == np.uint8


def assert_blend_holds_the_asset(path: Path, frames: int) -> None:
    """Open the saved .blend in a fresh Blender and count the asset's timestep objects."""
    script = (
        "import os, sys, json, bpy\n"
        f"bpy.ops.wm.open_mainfile(filepath={str(path)!r})\n"
        "roots = [o for o in bpy.data.objects if 'fourreal_job' in o.keys()]\n"
        "print(json.dumps({'roots': len(roots), 'children': [len(r.children) for r in roots],"
        " 'cameras': sum(o.type == 'CAMERA' for o in bpy.data.objects)}))\n")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(ROOT / ".cache" / "blender"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["roots"] == 1 and info["children"] == [frames], info
    assert info["cameras"] >= 3  # the rig's cameras and the novel view


def test_demo_on_the_smallest_grid(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, "--views", "2", "--frames", "2", "--steps", "1", "--resolution",
                      "32", "--samples", "1", timeout=900)
    check_outputs(out, report, views=2, frames=2)
    assert report["sampler_steps"] == 1 and report["setting"] == "row_and_column"


@pytest.mark.slow
def test_full_demo(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, timeout=3600)
    check_outputs(out, report, views=4, frames=8)


def test_demo_refuses_to_clear_a_folder_it_did_not_write(tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("not a demo")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "backend.tools.demo", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "not empty and holds no earlier demo" in result.stderr
    assert keep.read_text() == "not a demo"
