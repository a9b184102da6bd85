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
ASSET_FIGURES = ("rig_views", "novel_view", "cycles_vs_rasterizer")
FIGURES = ("generated", "copy_baseline", "generate_generated_cells",
           *(f"{kind}_{name}" for kind in ("generate", "reconstruct") for name in ASSET_FIGURES))
STAGES = ("scene", "render_truth", "backend_start", "generate_and_import",
          "reconstruct_and_import", "export_render_save", "quality", "total")
# Cycles' render of each imported asset at the novel view against our rasterizer's: the
# smallest grid (32 px, 1 sample) measured 52.4 and 54.2 dB; issue 15 asks 26 dB of the
# default demo (128 px).
CYCLES_FLOOR_SMALL_DB = 40.0
CYCLES_FLOOR_DB = 26.0


def run_demo(out: Path, *args: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FOURREAL_WEIGHTS", None)  # the shipped checkpoints
    result = subprocess.run([sys.executable, "-m", "backend.tools.demo", "--out", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generated views vs Blender" in result.stdout
    return json.loads((out / "report.json").read_text())


def check_outputs(out: Path, report: dict, views: int, frames: int, cycles_floor: float) -> None:
    for key in FIGURES:
        assert math.isfinite(report["psnr_" + key]), key
        assert 0.0 < report["ssim_" + key] <= 1.0, key
    for kind in ("generate", "reconstruct"):
        assert report[f"psnr_{kind}_cycles_vs_rasterizer"] >= cycles_floor, report
        assert report[f"fit_s_{kind}"] > 0 and report[f"fit_{kind}"]["gaussians"] > 0
        assert len(report[f"gaussians_per_timestep_{kind}"]) == frames
        assert all(n > 0 for n in report[f"gaussians_per_timestep_{kind}"])
    assert set(STAGES) <= set(report["timings_s"])
    assert report["views"] == views and report["timesteps"] == frames
    for folder in ("gaussians", "gaussians-reconstruct"):
        assert len(sorted((out / folder).glob("*.ply"))) == frames, folder
    grid = iio.imread(out / "grid.mp4")  # [T, h, V * w, 3] upscaled
    assert grid.shape[0] == frames and grid.shape[2] == views * grid.shape[1]
    render = iio.imread(out / "render.mp4")  # Blender's render | Generate's | Reconstruct's
    assert render.shape[0] == frames and render.shape[2] == 3 * render.shape[1]
    width = render.shape[1]
    for i in (1, 2):
        panel = render[..., i * width:(i + 1) * width, :]
        assert panel.std() > 2.0, "a Cycles render of an imported asset is flat"
    assert_blend_holds_the_assets(out / "scene.blend", frames)
    comparison = iio.imread(out / "docs" / "comparison.png")
    assert comparison.ndim == 3 and comparison.dtype == np.uint8


def assert_blend_holds_the_assets(path: Path, frames: int) -> None:
    """Open the saved .blend in a fresh Blender and find both assets (Generate's and
    Reconstruct's) with their objects."""
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
    # one point set that moves (Gaussians with identities) or one object per timestep
    assert info["roots"] == 2 and all(n in (1, frames) for n in info["children"]), info
    assert info["cameras"] >= 3  # the rig's cameras and the novel view


def test_demo_on_the_smallest_grid(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, "--views", "2", "--frames", "2", "--steps", "1", "--resolution",
                      "32", "--samples", "1", "--fit", "fast", timeout=900)
    check_outputs(out, report, views=2, frames=2, cycles_floor=CYCLES_FLOOR_SMALL_DB)
    assert report["sampler_steps"] == 1 and report["setting"] == "row_and_column"
    assert report["fit"] == "fast"


@pytest.mark.slow
def test_full_demo(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, timeout=3600)
    check_outputs(out, report, views=4, frames=8, cycles_floor=CYCLES_FLOOR_DB)


def test_demo_refuses_to_clear_a_folder_it_did_not_write(tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("not a demo")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "backend.tools.demo", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "not empty and holds no earlier demo" in result.stderr
    assert keep.read_text() == "not a demo"
