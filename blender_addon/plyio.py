"""3DGS PLY sequences in and out of Blender (one PLY file per timestep, numbered by frame)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import bpy

from . import pointcloud
from .vendor.gaussians import (
    GaussianSequence,
    read_ply,
    read_ply_sequence,
    write_ply_sequence,
)


def _ply_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The PLY files named by a file, a folder or a list of files."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise ValueError(f"{source} is neither a PLY file nor a folder")
        paths = sorted(source.glob("*.ply"))
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise ValueError(f"no .ply files in {source}")
    return paths


def read_gaussians(source: str | Path | Sequence[str | Path]) -> GaussianSequence:
    """One PLY file without a frame number in its name (`point_cloud.ply`) is a static asset
    at frame 0; several files are a sequence numbered by the last number in each name."""
    paths = _ply_paths(source)
    if len(paths) == 1 and not re.search(r"\d", paths[0].stem):
        return GaussianSequence([read_ply(paths[0])], [0])
    return read_ply_sequence(paths)


PERSISTENT_MODES = ("AUTO", "PERSISTENT", "PER_TIMESTEP")


def _file_name(source, number: int) -> str:
    """The name of the file of frame `number` in `source` (for messages)."""
    found = [p.name for p in _ply_paths(source) if re.findall(r"\d+", p.stem)
             and int(re.findall(r"\d+", p.stem)[-1]) == number]
    return found[0] if found else f"frame {number}"


def persistent_layout(source, steps, numbers: list[int], mode: str) -> bool:
    """Whether the files are imported as persistent Gaussians (one moving point set): with
    "AUTO" when every file holds the same count with identical sh0, SH rest, opacity and
    scale columns; "PERSISTENT" requires it (an error names the file that differs);
    "PER_TIMESTEP" never."""
    if mode not in PERSISTENT_MODES:
        raise ValueError(f"persistent must be one of {PERSISTENT_MODES}, got {mode!r}")
    if mode == "PER_TIMESTEP" or (mode == "AUTO" and len(steps) < 2):
        return False
    why = pointcloud.persistent.mismatch(steps)
    if why is not None and mode == "PERSISTENT":
        t, reason = why
        if len(steps) < 2:
            raise ValueError("Persistent Gaussians need at least two PLY files")
        raise ValueError(f"not persistent Gaussians: {_file_name(source, numbers[t])} has "
                         f"{reason} ({_file_name(source, numbers[0])})")
    return why is None


def import_ply_sequence(scene: bpy.types.Scene, source: str | Path | Sequence[str | Path],
                        name: str | None = None, frame_start: int | None = None,
                        config: pointcloud.PointCloudConfig | None = None,
                        persistent: str = "AUTO") -> bpy.types.Object:
    """Import a folder of PLY files, a list of files or one file as an asset. The first
    file's frame lands on `frame_start` (default: the scene's start frame); the others keep
    their spacing, so frame_0000, frame_0002 -> scene frames 1, 3. `persistent` chooses the
    layout (see `persistent_layout`). Every file is read and checked before the scene is
    touched. Returns the asset root."""
    sequence = read_gaussians(source)
    numbers = list(sequence.frame_numbers)
    order = sorted(range(len(numbers)), key=numbers.__getitem__)
    steps = [sequence.frames[i] for i in order]
    use_persistent = persistent_layout(source, steps, sorted(numbers), persistent)
    start = scene.frame_start if frame_start is None else int(frame_start)
    offset = start - numbers[order[0]]
    if name is None:
        first = Path(source) if isinstance(source, (str, Path)) else Path(source[0]).parent
        if len(sequence) == 1 and first.is_dir() and len(_ply_paths(first)) == 1:
            first = _ply_paths(first)[0]
        name = first.stem or "Gaussians"
    return pointcloud.build_asset(scene, name, steps, [numbers[i] + offset for i in order],
                                  config, source_offset=offset,
                                  persistent_gaussians=use_persistent)


def export_ply_sequence(asset: bpy.types.Object, folder: str | Path,
                        world_space: bool = True) -> list[Path]:
    """Write the asset's timesteps as `frame_NNNN.ply` into `folder`, numbered by source
    frame (an imported sequence is written back under its own numbers). With `world_space`
    a moved or rotated asset is exported where it stands in the scene."""
    root = pointcloud.asset_of(asset)
    if root is None:
        raise ValueError(f"{asset.name!r} is not part of an imported Gaussian asset")
    return write_ply_sequence(folder, pointcloud.asset_sequence(root, world_space))
