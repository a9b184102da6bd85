"""Properties: per-scene job settings (saved with the .blend) and the live backend and job
status on the window manager (never saved), which the panel and the status bar draw."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .vendor.job_params import JOB_PARAMS

BLENDER_INT_MAX = 2**31 - 1  # IntProperty is a signed 32-bit integer


def job_param(kind: str, name: str) -> dict:
    """default, min, max and description of job parameter `name` of job `kind`, from the
    backend's schema (`backend/job_params.py`), for an Int/FloatProperty."""
    param = JOB_PARAMS[kind][name]
    bounds = {}
    if param.low is not None:
        bounds["min"] = param.low
    if param.high is not None:
        bounds["max"] = param.high
    if param.type == "int":
        bounds = {k: int(max(-BLENDER_INT_MAX, min(BLENDER_INT_MAX, v)))
                  for k, v in bounds.items()}
    return {"default": param.default, "description": param.doc[:1].upper() + param.doc[1:],
            **bounds}


def job_choices(kind: str, name: str) -> list[tuple[str, str, str]]:
    """EnumProperty items of a job parameter with a fixed set of values."""
    return [(c, c.title(), f"{name} = {c}") for c in JOB_PARAMS[kind][name].choices]


RIG_SOURCES = [
    ("SELECTION", "Selected Cameras", "The selected camera objects, ordered by name"),
    ("COLLECTION", "Collection", "The cameras of a collection, ordered by name"),
]
INPUT_SOURCES = [
    ("CLIP", "Movie Clip", "A movie clip (sent by path; the backend reads it)"),
    ("IMAGES", "Image Sequence", "A folder of images, read in Blender"),
    ("RENDER", "Render Camera 1", "Render the rig's first camera over the frame range"),
]
DISPLAY_MODES = [
    ("POINTS", "Points", "Fast points"),
    ("SPLATS", "Splats", "Oriented ellipsoids with a Gaussian falloff"),
]


class FourRealSettings(bpy.types.PropertyGroup):
    """What to send and how to import, per scene."""

    rig_source: EnumProperty(name="Cameras", items=RIG_SOURCES, default="SELECTION")
    rig_collection: PointerProperty(name="Rig Collection", type=bpy.types.Collection)
    use_scene_range: BoolProperty(name="Scene Frame Range", default=True)
    frame_start: IntProperty(name="Start", default=1)
    frame_end: IntProperty(name="End", default=16)
    frame_step: IntProperty(name="Step", default=1, min=1)
    input_source: EnumProperty(name="Input", items=INPUT_SOURCES, default="RENDER")
    movie_clip: PointerProperty(name="Clip", type=bpy.types.MovieClip)
    image_folder: StringProperty(name="Images", subtype="DIR_PATH")
    freeze_folder: StringProperty(
        name="Freeze-Time Images", subtype="DIR_PATH",
        description="Optional: one image per view at the first timestep, ordered by name")
    # Job parameters: defaults, bounds and descriptions from the backend's schema
    seed: IntProperty(name="Seed", **job_param("generate", "seed"))
    steps: IntProperty(name="Sampling Steps", soft_max=200, **job_param("generate", "steps"))
    guidance: FloatProperty(name="Guidance", soft_max=20.0,
                            **job_param("generate", "guidance"))
    fit_preset: EnumProperty(name="Fit", items=job_choices("generate", "fit"),
                             **job_param("generate", "fit"))
    fit_seconds: FloatProperty(name="Fit Seconds", soft_max=1800.0, subtype="TIME_ABSOLUTE",
                               **job_param("generate", "fit_seconds"))
    fit_init: EnumProperty(name="Fit Start", items=job_choices("generate", "fit_init"),
                           **job_param("generate", "fit_init"))
    render_folder: StringProperty(
        name="Render Folder", subtype="DIR_PATH",
        description="Where rig renders are written (empty: a temporary folder)")
    # Import of results
    viewport_display: EnumProperty(name="Viewport", items=DISPLAY_MODES, default="SPLATS")
    render_display: EnumProperty(name="Render", items=DISPLAY_MODES, default="SPLATS")
    viewport_ratio: FloatProperty(name="Viewport Ratio", default=1.0, min=0.001, max=1.0,
                                  subtype="FACTOR")


class FourRealStatus(bpy.types.PropertyGroup):
    """Live state mirrored from the job runner on every poll."""

    backend_state: StringProperty(name="Backend", default="stopped")
    backend_address: StringProperty(name="Address")
    backend_device: StringProperty(name="Device")
    backend_kinds: StringProperty(name="Job Kinds")
    backend_error: StringProperty(name="Backend Error")
    job_id: StringProperty(name="Job")
    job_kind: StringProperty(name="Kind")
    job_state: StringProperty(name="State")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step")
    of: IntProperty(name="Of")
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")
    message: StringProperty(name="Message")
    job_error: StringProperty(name="Job Error")
    active_jobs: IntProperty(name="Active Jobs")
    lost_jobs: IntProperty(name="Lost Jobs")


CLASSES = (FourRealSettings, FourRealStatus)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.fourreal = PointerProperty(type=FourRealSettings)
    bpy.types.WindowManager.fourreal_status = PointerProperty(type=FourRealStatus)


def unregister() -> None:
    del bpy.types.WindowManager.fourreal_status
    del bpy.types.Scene.fourreal
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
