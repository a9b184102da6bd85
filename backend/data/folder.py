"""User datasets on disk: a folder per scene, frames per view and a cameras JSON.

Layout of one scene folder::

    cameras.json        {"c2w": [V][T][4][4], "intrinsics": [V][T][6], "near_far": [n, f]}
    view_00/0000.png    frames of view 0 as images, sorted by file name (png, jpg, ...)
    view_01.mp4         or a view as a video file, read with imageio
    ...

`c2w` is OpenCV camera-to-world, `intrinsics` is (fx, fy, cx, cy, width, height) in
pixels of the stated width and height (`near_far` is optional). Images of another size than
the stated one are accepted when the aspect ratio agrees; the intrinsics are rescaled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from backend.cameras import scale_intrinsics
from backend.data.sample import Sample

CAMERAS_FILE = "cameras.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIX = ".mp4"
ASPECT_TOLERANCE = 0.01
RIGID_TOLERANCE = 1e-3


def view_name(view: int) -> str:
    return f"view_{view:02d}"


@dataclass
class SceneCameras:
    c2w: np.ndarray  # [V, T, 4, 4] float64
    intrinsics: np.ndarray  # [V, T, 6] float64
    near_far: tuple[float, float] | None


def _numeric_array(path: Path, key: str, value, shape_text: str, ndim: int, tail: tuple
                   ) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: '{key}' must be a numeric nested list {shape_text}") from None
    if array.ndim != ndim or array.shape[ndim - len(tail):] != tail:
        raise ValueError(f"{path}: '{key}' must have shape {shape_text}, "
                         f"got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: '{key}' contains NaN or infinite values")
    return array


def read_cameras(path: Path) -> SceneCameras:
    """Parse and check a scene's cameras.json; ValueError names the file and the problem."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (every scene folder needs a {CAMERAS_FILE})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict) or "c2w" not in data or "intrinsics" not in data:
        raise ValueError(f"{path}: expected an object with 'c2w' and 'intrinsics'")
    c2w = _numeric_array(path, "c2w", data["c2w"], "[V][T][4][4]", 4, (4, 4))
    intr = _numeric_array(path, "intrinsics", data["intrinsics"], "[V][T][6]", 3, (6,))
    if intr.shape[:2] != c2w.shape[:2]:
        raise ValueError(f"{path}: 'intrinsics' is [V={intr.shape[0]}][T={intr.shape[1]}] but "
                         f"'c2w' is [V={c2w.shape[0]}][T={c2w.shape[1]}]")
    if c2w.shape[0] < 1 or c2w.shape[1] < 1:
        raise ValueError(f"{path}: needs at least one view and one timestep")
    rot = c2w[..., :3, :3]
    rigid = np.abs(rot @ np.swapaxes(rot, -1, -2) - np.eye(3)).max() < RIGID_TOLERANCE
    if not rigid or np.abs(c2w[..., 3, :] - [0, 0, 0, 1]).max() > RIGID_TOLERANCE:
        raise ValueError(f"{path}: 'c2w' matrices must be rigid (rotation + translation, "
                         f"last row 0 0 0 1)")
    if (intr[..., [0, 1, 4, 5]] <= 0).any():
        raise ValueError(f"{path}: 'intrinsics' focal lengths and sizes must be positive")
    near_far = data.get("near_far")
    if near_far is not None:
        near_far = _numeric_array(path, "near_far", near_far, "[near, far]", 1, (2,))
        if not 0 < near_far[0] < near_far[1]:
            raise ValueError(f"{path}: 'near_far' needs 0 < near < far, got {list(near_far)}")
        near_far = (float(near_far[0]), float(near_far[1]))
    return SceneCameras(c2w, intr, near_far)


def find_view_sources(scene: Path, num_views: int, num_steps: int) -> list[Path | list[Path]]:
    """For each view, its video file or its sorted list of image files."""
    sources: list[Path | list[Path]] = []
    for view in range(num_views):
        folder, video = scene / view_name(view), scene / (view_name(view) + VIDEO_SUFFIX)
        if folder.is_dir() and video.is_file():
            raise ValueError(f"{scene}: both {folder.name}/ and {video.name} exist; keep one")
        if video.is_file():
            sources.append(video)
            continue
        if not folder.is_dir():
            raise ValueError(f"{scene}: {view_name(view)}: neither folder {folder.name}/ nor "
                             f"video {video.name} found ({CAMERAS_FILE} has {num_views} views)")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) != num_steps:
            raise ValueError(f"{folder}: {len(images)} image files, but {CAMERAS_FILE} has "
                             f"T={num_steps} timesteps")
        sources.append(images)
    extra = scene / view_name(num_views)
    if extra.is_dir() or extra.with_suffix(VIDEO_SUFFIX).is_file():
        raise ValueError(f"{scene}: found {extra.name} but {CAMERAS_FILE} has only "
                         f"{num_views} views")
    return sources


def _to_rgb_float(
    image: np.ndarray,  # [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]
    source: Path,
) -> np.ndarray:  # [H, W, 3] float32 in [0, 1]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{source}: unsupported image shape {list(image.shape)}")
    image = np.broadcast_to(image[..., :3], (*image.shape[:2], 3))
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def read_view_frames(source: Path | list[Path], num_steps: int) -> np.ndarray:
    """[T, H, W, 3] float32 frames of one view from a video or image files."""
    import imageio.v3 as iio

    if isinstance(source, Path):
        try:
            video = iio.imread(source, index=None)
        except Exception as error:  # imageio raises many types for broken files
            raise ValueError(f"{source}: cannot read video ({error})") from None
        if video.shape[0] != num_steps:
            raise ValueError(f"{source}: {video.shape[0]} frames, but {CAMERAS_FILE} has "
                             f"T={num_steps} timesteps")
        return np.stack([_to_rgb_float(frame, source) for frame in video])
    frames = []
    for path in source:
        try:
            image = iio.imread(path)
        except Exception as error:
            raise ValueError(f"{path}: cannot read image ({error})") from None
        frames.append(_to_rgb_float(image, path))
        if frames[-1].shape != frames[0].shape:
            raise ValueError(f"{path}: size {frames[-1].shape[1]}x{frames[-1].shape[0]} "
                             f"differs from {source[0].name} "
                             f"({frames[0].shape[1]}x{frames[0].shape[0]})")
    return np.stack(frames)


def fit_intrinsics(
    intr: np.ndarray,  # [T, 6]
    width: int,
    height: int,
    where: str,
) -> np.ndarray:  # [T, 6]
    """Intrinsics rescaled to images of `width` x `height` with the same aspect ratio."""
    stated = intr[:, 4] / intr[:, 5]
    if np.abs(stated / (width / height) - 1).max() > ASPECT_TOLERANCE:
        raise ValueError(f"{where}: images are {width}x{height} but {CAMERAS_FILE} states "
                         f"{intr[0, 4]:g}x{intr[0, 5]:g}, a different aspect ratio")
    return scale_intrinsics(intr, width, height)


def resize_frames(
    frames: Tensor,  # [N, 3, h, w]
    height: int,
    width: int,
) -> Tensor:  # [N, 3, H, W]
    """Bilinear resize, antialiased when shrinking."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    out = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp(0.0, 1.0)


def scene_folders(root: Path) -> list[Path]:
    """`root` itself when it holds a cameras.json, else its scene subfolders (sorted)."""
    if not root.is_dir():
        raise ValueError(f"{root}: dataset folder not found")
    if (root / CAMERAS_FILE).is_file():
        return [root]
    scenes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not scenes:
        raise ValueError(f"{root}: no scene folders (and no {CAMERAS_FILE})")
    for scene in scenes:
        if not (scene / CAMERAS_FILE).is_file():
            raise ValueError(f"{scene / CAMERAS_FILE}: missing (every scene folder needs one)")
    return scenes


class FolderDataset(Dataset):
    """Scenes from disk as `Sample`s (kind "folder", no depth or alpha).

    Cameras and file lists are checked when the dataset is built; frames are decoded when a
    scene is read. With `height` and `width`, frames are resized and intrinsics follow.
    """

    def __init__(self, root: str | Path, height: int | None = None, width: int | None = None):
        if (height is None) != (width is None):
            raise ValueError("FolderDataset: pass both height and width, or neither")
        if height is not None and (height < 1 or width < 1):
            raise ValueError(f"FolderDataset: size must be positive, got {height}x{width}")
        self.root = Path(root)
        self.height, self.width = height, width
        self.scenes = scene_folders(self.root)
        self.cameras = [read_cameras(scene / CAMERAS_FILE) for scene in self.scenes]
        self.sources = [find_view_sources(scene, *cams.c2w.shape[:2])
                        for scene, cams in zip(self.scenes, self.cameras)]

    def __len__(self) -> int:
        return len(self.scenes)

    def _load_view(self, index: int, view: int) -> tuple[Tensor, np.ndarray]:
        """Frames [T, 3, H, W] and intrinsics [T, 6] of one view at the output size."""
        cams, source = self.cameras[index], self.sources[index][view]
        frames = read_view_frames(source, cams.c2w.shape[1])  # [T, h, w, 3]
        height, width = frames.shape[1:3]
        where = str(source if isinstance(source, Path) else source[0].parent)
        intr = fit_intrinsics(cams.intrinsics[view], width, height, where)
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if self.height is not None:
            frames = resize_frames(frames, self.height, self.width)
            intr = scale_intrinsics(intr, self.width, self.height)
        return frames.contiguous(), intr

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"FolderDataset: index {index} out of range ({len(self)} scenes)")
        index = index % len(self)
        cams = self.cameras[index]
        views = [self._load_view(index, v) for v in range(cams.c2w.shape[0])]
        sizes = {tuple(frames.shape[-2:]) for frames, _ in views}
        if len(sizes) != 1:
            raise ValueError(f"{self.scenes[index]}: views have different image sizes "
                             f"{sorted(sizes)}; give FolderDataset a height and width")
        return Sample(
            frames=torch.stack([frames for frames, _ in views]),
            c2w=torch.as_tensor(cams.c2w, dtype=torch.float32),
            intrinsics=torch.as_tensor(np.stack([intr for _, intr in views]),
                                       dtype=torch.float32),
            kind="folder", index=index, near_far=cams.near_far, family="user")


def write_scene_folder(sample: Sample, root: str | Path, video: bool = False,
                       fps: int = 8) -> Path:
    """Write a sample as a scene folder (PNG frames, or one mp4 per view with `video`)."""
    import imageio.v3 as iio

    root = Path(root)
    height, width = sample.frames.shape[-2:]
    if video and (height % 2 or width % 2):
        raise ValueError(f"write_scene_folder: mp4 needs even image sizes, got {width}x{height}")
    root.mkdir(parents=True, exist_ok=True)
    cameras = {"c2w": sample.c2w.double().tolist(),
               "intrinsics": sample.intrinsics.double().tolist()}
    if sample.near_far is not None:
        cameras["near_far"] = list(sample.near_far)
    (root / CAMERAS_FILE).write_text(json.dumps(cameras))
    frames = (sample.frames.clamp(0, 1) * 255).round().to(torch.uint8)
    frames = frames.permute(0, 1, 3, 4, 2).numpy()  # [V, T, H, W, 3]
    for view, view_frames in enumerate(frames):
        if video:
            iio.imwrite(root / (view_name(view) + VIDEO_SUFFIX), view_frames, fps=fps,
                        codec="libx264", quality=10, macro_block_size=2)
            continue
        folder = root / view_name(view)
        folder.mkdir(exist_ok=True)
        for step, frame in enumerate(view_frames):
            iio.imwrite(folder / f"{step:04d}.png", frame)
    return root
