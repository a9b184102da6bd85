"""3DGS PLY sequences in and out of Blender (one PLY file per timestep, numbered by frame)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bpy

from . import pointcloud
from .vendor.gaussians import read_ply_sequence, write_ply_sequence


def import_ply_sequence(scene: bpy.types.Scene, source: str | Path | Sequence[str | Path],
                        name: str | None = None, frame_start: int | None = None,
                        config: pointcloud.PointCloudConfig | None = None
                        ) -> bpy.types.Object:
    """Import a folder of PLY files (or a list of files) as an animated asset. The first
    file's frame lands on `frame_start` (default: the scene's start frame); the others keep
    their spacing, so frame_0000, frame_0002 -> scene frames 1, 3. Returns the asset root."""
    sequence = read_ply_sequence(source)
    numbers = list(sequence.frame_numbers)
    order = sorted(range(len(numbers)), key=numbers.__getitem__)
    start = scene.frame_start if frame_start is None else int(frame_start)
    offset = start - numbers[order[0]]
    if name is None:
        first = Path(source) if isinstance(source, (str, Path)) else Path(source[0]).parent
        name = first.stem or "Gaussians"
    return pointcloud.build_asset(
        scene, name, [sequence.frames[i] for i in order], [numbers[i] + offset for i in order],
        config, source_offset=offset)


def export_ply_sequence(asset: bpy.types.Object, folder: str | Path,
                        world_space: bool = True) -> list[Path]:
    """Write the asset's timesteps as `frame_NNNN.ply` into `folder`, numbered by source
    frame (an imported sequence is written back under its own numbers). With `world_space`
    a moved or rotated asset is exported where it stands in the scene."""
    root = pointcloud.asset_of(asset)
    if root is None:
        raise ValueError(f"{asset.name!r} is not part of an imported Gaussian asset")
    return write_ply_sequence(folder, pointcloud.asset_sequence(root, world_space))
