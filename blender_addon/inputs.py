"""Job inputs read in Blender: renders of the rig from the scene, and image files."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import bpy
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".exr", ".webp")


def read_image_rgb8(path: str | Path) -> np.ndarray:
    """[H, W, 3] uint8 of an image file as stored (8-bit files: exactly their byte values;
    float files: clipped to [0, 1] and scaled), top row first."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"{path}: could not be read as an image")
        pixels = np.empty(width * height * image.channels, np.float32)
        image.pixels.foreach_get(pixels)
        pixels = pixels.reshape(height, width, image.channels)[::-1]
    finally:
        bpy.data.images.remove(image)
    rgb = pixels[..., :3] if pixels.shape[2] >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_images(paths: Sequence[str | Path]) -> np.ndarray:
    """[N, H, W, 3] uint8 of image files that share one size."""
    if not paths:
        raise ValueError("no image files given")
    frames = [read_image_rgb8(p) for p in paths]
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"images differ in size: {sorted(sizes)}")
    return np.stack(frames)


def image_files(folder: str | Path) -> list[Path]:
    """Image files of a folder, ordered by name."""
    folder = Path(bpy.path.abspath(str(folder)))
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def render_rig(scene: bpy.types.Scene, cameras: Sequence[bpy.types.Object],
               frames: Sequence[int], folder: str | Path | None = None) -> np.ndarray:
    """Render every camera at every frame with the scene's engine and settings; returns
    [V, T, H, W, 3] uint8 (the PNGs stay in `folder`, default a temporary folder). The
    scene's camera, frame and output settings are restored."""
    if not cameras or not frames:
        raise ValueError("render_rig needs at least one camera and one frame")
    folder = Path(folder or tempfile.mkdtemp(prefix="fourreal-rig-"))
    folder.mkdir(parents=True, exist_ok=True)
    render, settings = scene.render, scene.render.image_settings
    saved = (scene.camera, scene.frame_current, render.filepath, settings.file_format,
             settings.color_mode, settings.color_depth)
    paths = [[folder / f"view{v:02d}_frame{f:05d}.png" for f in frames]
             for v in range(len(cameras))]
    try:
        settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGB", "8"
        for t, frame in enumerate(frames):
            scene.frame_set(frame)
            for v, cam in enumerate(cameras):
                scene.camera = cam
                render.filepath = str(paths[v][t])
                bpy.ops.render.render(write_still=True, scene=scene.name)
    finally:
        scene.camera = saved[0]
        scene.frame_set(saved[1])
        render.filepath = saved[2]
        settings.file_format, settings.color_mode, settings.color_depth = saved[3:]
    return np.stack([read_images(row) for row in paths])


def movie_clip_path(clip: bpy.types.MovieClip) -> str:
    """Absolute path of a movie clip's file (the backend reads it)."""
    if clip is None:
        raise ValueError("no movie clip chosen")
    path = Path(bpy.path.abspath(clip.filepath, library=clip.library))
    if not path.exists():
        raise ValueError(f"movie clip file {path} does not exist")
    return str(path)
