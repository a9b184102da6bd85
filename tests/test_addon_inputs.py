"""Job inputs read in Blender: image files byte-exact, and the Generate request built from
an image sequence and a freeze-time folder."""

from __future__ import annotations

import numpy as np
import pytest
from blender_support import addon_module, bpy, empty_scene

pytestmark = pytest.mark.blender

inputs = addon_module("inputs")
rig = addon_module("rig")
workflows = addon_module("workflows")


@pytest.fixture(scope="module", autouse=True)
def addon():
    module = addon_module()
    module.register()
    yield module
    module.unregister()


def write_png(path, rgb: np.ndarray) -> None:
    """Save [H, W, 3] uint8 as an 8-bit PNG through Blender."""
    height, width, _ = rgb.shape
    image = bpy.data.images.new("png", width, height, alpha=False)
    rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    image.pixels.foreach_set((rgba[::-1].astype(np.float32) / 255.0).ravel())
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def test_png_pixels_come_back_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(inputs.read_image_rgb8(tmp_path / "a.png"), rgb)


def test_images_of_different_sizes_are_refused(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        inputs.read_images(inputs.image_files(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        inputs.image_files(tmp_path / "missing")


def test_generate_request_from_image_sequence_and_freeze_time(tmp_path):
    scene = empty_scene()
    scene.frame_start, scene.frame_end = 1, 3
    _, cameras = rig.create_rig_preset(scene, rig.RigPresetConfig(num_cameras=2))
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (4, 6, 8, 3), dtype=np.uint8)  # one image more than needed
    freeze = rng.integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    for t, frame in enumerate(video):
        write_png(tmp_path / "video" / f"img_{t:03d}.png", frame)
    for v, frame in enumerate(freeze):
        write_png(tmp_path / "freeze" / f"view_{v}.png", frame)
    settings = scene.fourreal
    settings.rig_source, settings.rig_collection = "COLLECTION", cameras[0].users_collection[0]
    settings.input_source, settings.image_folder = "IMAGES", str(tmp_path / "video")
    settings.freeze_folder, settings.seed = str(tmp_path / "freeze"), 7
    settings.fit_init = "stereo+recon"
    request = workflows.generate_request(bpy.context)
    assert request.kind == "generate" and request.frames == [1, 2, 3]
    assert request.params["seed"] == 7 and request.params["fit_init"] == "stereo+recon"
    job_params = addon_module("vendor.job_params")
    job_params.JOB_PARAMS["generate"].validate(request.params)  # the backend accepts them
    assert set(request.arrays) == {"c2w", "intrinsics", "video", "freeze"}
    assert request.arrays["c2w"].shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(request.arrays["video"], video[:3])
    np.testing.assert_array_equal(request.arrays["freeze"], freeze)
    settings.freeze_folder = str(tmp_path / "video")
    with pytest.raises(ValueError, match="4 freeze-time images for 2 views"):
        workflows.generate_request(bpy.context)
