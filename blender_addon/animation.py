"""Keyframes written straight into F-curves, for Blender 4.2 (one F-curve list per action) and
4.4+ (layered actions with slots), without depending on the user's keying preferences."""

from __future__ import annotations

from collections.abc import Sequence

import bpy
import numpy as np


def ensure_fcurve(id_data: bpy.types.ID, data_path: str, index: int = 0,
                  action_name: str | None = None) -> bpy.types.FCurve:
    """The F-curve animating `id_data.data_path[index]`, created (with an action) if needed."""
    anim = id_data.animation_data or id_data.animation_data_create()
    if anim.action is None:
        anim.action = bpy.data.actions.new(action_name or f"{id_data.name} Action")
    action = anim.action
    if hasattr(action, "fcurve_ensure_for_datablock"):  # Blender 4.4+: layered actions
        return action.fcurve_ensure_for_datablock(id_data, data_path, index=index)
    found = action.fcurves.find(data_path, index=index)
    return found or action.fcurves.new(data_path, index=index)


def set_keys(id_data: bpy.types.ID, data_path: str, frames: Sequence[float],
             values: Sequence[float], interpolation: str = "CONSTANT", index: int = 0,
             action_name: str | None = None) -> bpy.types.FCurve:
    """Replace the keys of one animated property with (frame, value) pairs, all with one
    interpolation ('CONSTANT', 'LINEAR' or 'BEZIER'); extrapolation stays constant."""
    frames = np.asarray(frames, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    if frames.shape != values.shape or frames.ndim != 1 or len(frames) == 0:
        raise ValueError(f"set_keys({data_path!r}): need matching non-empty frame and value "
                         f"lists, got {frames.shape} and {values.shape}")
    fcurve = ensure_fcurve(id_data, data_path, index, action_name)
    points = fcurve.keyframe_points
    points.clear()
    points.add(len(frames))
    points.foreach_set("co", np.stack([frames, values], axis=1).ravel())
    code = bpy.types.Keyframe.bl_rna.properties["interpolation"].enum_items[interpolation].value
    points.foreach_set("interpolation", np.full(len(frames), code, dtype=np.int32))
    fcurve.update()
    return fcurve
