"""The GPU check (`build.py gpu-check`): its dry run end to end on the CPU, so the plan the
first GPU session runs cannot rot, and the runner's time budgets and wheel bookkeeping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from backend.tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent
# Parts whose figures the dry run must produce (gpu_tests only skips on the CPU).
TRAINING_PARTS = ("train_diffusion_small", "train_recon_small", "continue_diffusion_tiny",
                  "continue_recon_tiny")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-check")
    subprocess.run([sys.executable, "-m", "backend.tools.gpu_check", "--dry-run", "--out",
                    str(out)], cwd=ROOT, check=True, timeout=300, capture_output=True)
    return out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_gives_every_part_a_status_and_figures(dry_run):
    out, report = dry_run
    planned = [p.name for p in gpu_check.plan(out, gpu_check.SCRATCH, dry_run=True)]
    assert report["finished"] and report["dry_run"] and report["device"] == "cpu"
    assert list(report["parts"]) == ["install", *planned]
    for name in planned:
        part = report["parts"][name]
        assert part["status"] == "ok", (name, part.get("reason"))
        assert part["figures"], name
        assert (out / "logs" / f"{name}.log").exists()
    assert report["parts"]["install"]["status"] in ("ok", "skipped")
    log = (out / "gpu_check.log").read_text()
    assert "done" in log.splitlines()[-1]


def test_dry_run_figures_are_what_the_parts_measured(dry_run):
    out, report = dry_run
    figures = {name: part["figures"] for name, part in report["parts"].items()}
    for name in ("attention_8x16x256", "attention_8x16x2304"):
        shape = figures[name]["shapes"][0]
        assert shape["times_s"]["full_fwd"] > 0 and "decomposed_fwd_bwd" in shape["times_s"]
        assert any("flex_fwd_bwd skipped" in note for note in shape["notes"])
    case = figures["render"]["cases"][0]
    assert case["cpu_fwd_bwd_s"] > 0 and case["parity"]["cpu"]["rgb_max_abs"] < 1e-3
    assert figures["fit"]["gaussians"] > 0 and figures["fit"]["device"] == "cpu"
    assert figures["gpu_tests"]["counts"]["skipped"] > 0  # the gpu tests exist, need CUDA
    assert figures["gsplat_build"]["backend"] == "cpu"
    assert figures["environment"]["cuda_available"] is False
    for name in TRAINING_PARTS:
        train = figures[name]
        assert train["steps_done"] == 2 and train["precision"] == "float32", name
        assert math.isfinite(train["loss_last_window"]) and train["loss_first_window"] > 0
        assert train["samples_per_s_median_after_first_window"] > 0
        assert "peak_cuda_allocated_bytes" not in train  # nothing claimed that was not measured
    for weights in ("diffusion-tiny", "recon-tiny"):
        assert (out / "export" / weights / "model.safetensors").exists()
        assert figures[f"continue_{weights.replace('-', '_')}"]["initialised_from"]


def _run(tmp_path: Path, budget_s: float) -> gpu_check.Run:
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "parts").mkdir(exist_ok=True)
    run = gpu_check.Run(out=tmp_path, dry_run=True, budget_s=budget_s)
    run.report["parts"] = {}
    return run


def test_a_part_past_its_budget_is_stopped_and_recorded(tmp_path):
    run = _run(tmp_path, budget_s=60)
    part = gpu_check.Part("sleeper", ["-c", "import time; time.sleep(60)"], 1.0,
                          lambda folder, name: {}, min_s=0.5)
    run.plan = [part]
    run.report["parts"]["sleeper"] = {"status": "pending", "figures": {}}
    started = time.monotonic()
    gpu_check.run_part(run, part, cuda=False)
    entry = run.report["parts"]["sleeper"]
    assert entry["status"] == "timeout" and entry["figures"] == {}
    assert time.monotonic() - started < 15
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["sleeper"][
        "status"] == "timeout"


def test_a_part_is_skipped_when_the_total_budget_is_spent(tmp_path):
    run = _run(tmp_path, budget_s=gpu_check.RESERVE_S + 2)
    part = gpu_check.Part("late", ["-c", "pass"], 30.0, lambda folder, name: {}, min_s=10)
    run.report["parts"]["late"] = {"status": "pending", "figures": {}}
    gpu_check.run_part(run, part, cuda=False)
    assert run.report["parts"]["late"]["status"] == "skipped"
    assert "no time left" in run.report["parts"]["late"]["reason"]


def _fake_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {name}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_missing_requirements_close_over_wheel_metadata(tmp_path):
    wheels = [
        _fake_wheel(tmp_path, "gsplat", ["ninja", "numpy", "jaxtyping", "rich>=12", "torch",
                                         'typing_extensions; python_version < "3.8"',
                                         'pytest==7.1.2; extra == "dev"']),
        _fake_wheel(tmp_path, "ninja", []),
        _fake_wheel(tmp_path, "rich", ['colorama; sys_platform == "win32"',
                                       'markdown-it-py>=2.2.0']),
    ]
    assert gpu_check.missing_requirements(wheels) == ["jaxtyping", "markdown-it-py"]


def test_wheels_follow_the_pinned_runtime_requirements():
    wanted = gpu_check.wheel_requirements()
    assert "gsplat==1.5.3" in wanted and any(r.startswith("pyzmq") for r in wanted)
    assert any(r.startswith("pytest") for r in wanted)
    names = {gpu_check.normalise(r.split("=")[0].split(">")[0].split("<")[0]) for r in wanted}
    assert not names & {"torch", "numpy", "safetensors", "imageio", "bpy", "ruff"}
