"""The Blender import benchmark runs end to end on a tiny input and writes its figures."""

from __future__ import annotations

import json

import pytest
from blender_support import bpy  # noqa: F401  (bpy set up before the benchmark imports it)

from backend.tools.bench import blender as bench

pytestmark = pytest.mark.blender


def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--timesteps", "3", "--gaussians", "200", "--repeats", "1",
                       "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["timesteps"] == 3 and figures["gaussians"] == 200
    for key in ("import_s", "frame_ms", "replay_frame_ms", "splat_frame_ms"):
        assert figures[key] > 0, key
    assert set(figures["render_s"]) == {"CYCLES", "BLENDER_EEVEE"}
    assert all(seconds > 0 for seconds in figures["render_s"].values())
    with pytest.raises(SystemExit):
        bench.main(["--timesteps", "0"])
