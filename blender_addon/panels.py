"""Sidebar panels (View3D > Sidebar > 4Real) and the status-bar progress: drawing only."""

from __future__ import annotations

import bpy

from . import pointcloud


def _progress(layout, status) -> None:
    text = f"{status.job_kind} {status.job_state}: {status.stage} {status.step}/{status.of}"
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=status.progress, type="BAR", text=text)
    else:
        layout.label(text=f"{text} ({status.progress:.0%})")


def _error_box(layout, text: str) -> None:
    box = layout.box()
    box.alert = True
    for i, line in enumerate(text.splitlines()[:8]):
        box.label(text=line, icon="ERROR" if i == 0 else "BLANK1")


def _job_status(layout, status) -> None:
    """Progress, message, error and the job buttons of the latest job."""
    if not status.job_id:
        return
    _progress(layout, status)
    if status.message:
        layout.label(text=status.message)
    if status.job_error:
        _error_box(layout, status.job_error)
    row = layout.row(align=True)
    row.operator("fourreal.cancel", text="Cancel", icon="CANCEL").queued = False
    row.operator("fourreal.cancel", text="Clear Queue", icon="X").queued = True
    if status.lost_jobs or status.job_state == "failed":
        layout.operator("fourreal.refetch", icon="FILE_REFRESH")


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "4Real"


class FOURREAL_PT_backend(_Panel, bpy.types.Panel):
    bl_label = "Backend"

    def draw(self, context):
        layout, status = self.layout, context.window_manager.fourreal_status
        layout.label(text=f"Backend: {status.backend_state}", icon="LINKED"
                     if status.backend_state == "ready" else "UNLINKED")
        if status.backend_address:
            layout.label(text=f"{status.backend_address} ({status.backend_device or '?'})")
        if status.backend_kinds:
            layout.label(text=f"Jobs: {status.backend_kinds}")
        if status.backend_error:
            _error_box(layout, status.backend_error)
        row = layout.row(align=True)
        label = "Restart" if status.backend_state in ("dead", "unreachable") else "Start"
        row.operator("fourreal.start_backend", text=label, icon="PLAY")
        row.operator("fourreal.stop_backend", text="Stop", icon="PAUSE")
        layout.operator("fourreal.release", icon="TRASH")


class FOURREAL_PT_rig(_Panel, bpy.types.Panel):
    bl_label = "Camera Rig"

    def draw(self, context):
        layout, settings = self.layout, context.scene.fourreal
        layout.operator("fourreal.add_rig", icon="OUTLINER_OB_CAMERA")
        layout.prop(settings, "rig_source")
        if settings.rig_source == "COLLECTION":
            layout.prop(settings, "rig_collection")
        layout.prop(settings, "use_scene_range")
        if not settings.use_scene_range:
            row = layout.row(align=True)
            row.prop(settings, "frame_start")
            row.prop(settings, "frame_end")
            row.prop(settings, "frame_step")


class FOURREAL_PT_job(_Panel, bpy.types.Panel):
    bl_label = "Generate"

    def draw(self, context):
        layout, settings = self.layout, context.scene.fourreal
        status = context.window_manager.fourreal_status
        layout.prop(settings, "input_source")
        if settings.input_source == "CLIP":
            layout.prop(settings, "movie_clip")
        elif settings.input_source == "IMAGES":
            layout.prop(settings, "image_folder")
        layout.prop(settings, "freeze_folder")
        row = layout.row(align=True)
        row.prop(settings, "seed")
        row.prop(settings, "steps")
        layout.prop(settings, "guidance")
        row = layout.row(align=True)
        row.prop(settings, "fit_preset", text="Fit")
        row.prop(settings, "fit_seconds", text="Seconds")
        layout.prop(settings, "fit_init", text="Start From")
        layout.prop(settings, "render_folder")
        row = layout.row(align=True)
        row.scale_y = 1.4
        row.enabled = status.backend_state == "ready"
        row.operator("fourreal.generate", icon="RENDER_ANIMATION")
        row.operator("fourreal.reconstruct", icon="MESH_ICOSPHERE")
        _job_status(layout, status)


class FOURREAL_PT_result(_Panel, bpy.types.Panel):
    bl_label = "Gaussian Asset"

    @classmethod
    def poll(cls, context):
        return pointcloud.asset_of(context.active_object) is not None

    def draw(self, context):
        layout, settings = self.layout, context.scene.fourreal
        asset = pointcloud.asset_of(context.active_object)
        layout.label(text=f"{asset.name}: {len(pointcloud.asset_frames(asset))} timesteps")
        node = pointcloud.asset_group_of(asset).nodes["Settings"]
        for name in ("Viewport Splats", "Render Splats", "Viewport Ratio", "Sigma Extent",
                     "Splat Subdivisions", "Dilation", "Blend Stored Values",
                     "Sorted Blending"):
            layout.prop(node.inputs[name], "default_value", text=name)
        layout.separator()
        layout.label(text="Defaults for new imports:")
        layout.prop(settings, "viewport_display")
        layout.prop(settings, "render_display")
        layout.prop(settings, "viewport_ratio")
        layout.operator("fourreal.export_ply_sequence", icon="EXPORT")


def draw_status_bar(self, context) -> None:
    status = context.window_manager.fourreal_status
    if status.active_jobs:
        _progress(self.layout.row(), status)


CLASSES = (FOURREAL_PT_backend, FOURREAL_PT_rig, FOURREAL_PT_job, FOURREAL_PT_result)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.STATUSBAR_HT_header.prepend(draw_status_bar)


def unregister() -> None:
    bpy.types.STATUSBAR_HT_header.remove(draw_status_bar)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
