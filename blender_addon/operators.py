"""Operators: each one reads its inputs, calls one plain function, and reports."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    StringProperty,
)
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import plyio, pointcloud, rig, runtime, workflows


def _fail(op: bpy.types.Operator, exc: Exception) -> set[str]:
    op.report({"ERROR"}, str(exc))
    return {"CANCELLED"}


class FOURREAL_OT_add_rig(bpy.types.Operator):
    """Add a ring or arc of cameras around a target empty"""

    bl_idname = "fourreal.add_rig"
    bl_label = "Add Camera Rig"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012 (Blender reads a set)

    num_cameras: IntProperty(name="Cameras", default=8, min=1, max=64)
    radius: FloatProperty(name="Radius", default=4.0, min=0.01, unit="LENGTH")
    height: FloatProperty(name="Height", default=1.0, unit="LENGTH")
    focal_length: FloatProperty(name="Focal Length", default=35.0, min=1.0, unit="CAMERA")
    arc_degrees: FloatProperty(name="Arc", default=360.0, min=1.0, max=360.0)
    animate_orbit: BoolProperty(name="Orbit over Frame Range", default=False)
    orbit_degrees: FloatProperty(name="Orbit", default=360.0)

    def execute(self, context):
        scene = context.scene
        config = rig.RigPresetConfig(
            num_cameras=self.num_cameras, radius=self.radius, height=self.height,
            focal_length=self.focal_length, arc_degrees=self.arc_degrees,
            target=tuple(scene.cursor.location), animate_orbit=self.animate_orbit,
            orbit_degrees=self.orbit_degrees, frame_start=scene.frame_start,
            frame_end=scene.frame_end)
        try:
            target, cameras = rig.create_rig_preset(scene, config)
        except ValueError as exc:
            return _fail(self, exc)
        scene.fourreal.rig_source = "COLLECTION"
        scene.fourreal.rig_collection = target.users_collection[0]
        if scene.camera is None:
            scene.camera = cameras[0]
        self.report({"INFO"}, f"added {len(cameras)} cameras around {target.name}")
        return {"FINISHED"}


class FOURREAL_OT_start_backend(bpy.types.Operator):
    """Start the local backend or connect to the remote one (see the add-on preferences)"""

    bl_idname = "fourreal.start_backend"
    bl_label = "Start / Connect Backend"

    def execute(self, context):
        try:
            runtime.start_backend(context)
        except (ValueError, OSError) as exc:
            return _fail(self, exc)
        return {"FINISHED"}


class FOURREAL_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend (or disconnect from the remote one)"""

    bl_idname = "fourreal.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context):
        runtime.stop_backend(context)
        return {"FINISHED"}


class FOURREAL_OT_release(bpy.types.Operator):
    """Make the backend release its models and GPU memory"""

    bl_idname = "fourreal.release"
    bl_label = "Release Models"

    def execute(self, context):
        try:
            runtime.runner().release()
        except ValueError as exc:
            return _fail(self, exc)
        return {"FINISHED"}


class FOURREAL_OT_cancel(bpy.types.Operator):
    """Cancel the running job; with Queued, drop the queued jobs instead"""

    bl_idname = "fourreal.cancel"
    bl_label = "Cancel Job"

    queued: BoolProperty(name="Queued", default=False)

    def execute(self, context):
        try:
            if self.queued:
                runtime.runner().cancel_queued()
            else:
                runtime.runner().cancel()
        except ValueError as exc:
            return _fail(self, exc)
        return {"FINISHED"}


class FOURREAL_OT_refetch(bpy.types.Operator):
    """Fetch a job's results again from the backend's cache (default: the latest lost job)"""

    bl_idname = "fourreal.refetch"
    bl_label = "Fetch Job Again"

    job_id: StringProperty(name="Job ID")

    def execute(self, context):
        run = runtime.runner()
        job_id = self.job_id or next((j.id for j in reversed(run.jobs.values())
                                      if j.state in ("lost", "failed")), "")
        if not job_id:
            return _fail(self, ValueError("no lost job to fetch; give a job id"))
        try:
            run.refetch(job_id)
        except ValueError as exc:
            return _fail(self, exc)
        runtime.ensure_polling()
        return {"FINISHED"}


class _SubmitBase:
    """Shared by Generate and Reconstruct: `request_builder(context)` makes the request."""

    bl_options = {"REGISTER"}  # noqa: RUF012 (Blender reads a set)

    def execute(self, context):
        run = runtime.runner()
        if run.backend_state != "ready":
            return _fail(self, ValueError(f"the backend is {run.backend_state}: start it "
                                          "first (4Real > Backend)"))
        try:
            request = self.request_builder(context)
            config = workflows.display_config(context.scene.fourreal)
            record = workflows.submit_and_import(run, context.scene, request, config)
        except (ValueError, OSError) as exc:
            return _fail(self, exc)
        runtime.ensure_polling()
        self.report({"INFO"}, f"{request.kind} job {record.id[:8]} submitted")
        return {"FINISHED"}


class FOURREAL_OT_generate(_SubmitBase, bpy.types.Operator):
    """Generate a 4D scene for the rig from the input video"""

    bl_idname = "fourreal.generate"
    bl_label = "Generate"

    request_builder = staticmethod(workflows.generate_request)


class FOURREAL_OT_reconstruct(_SubmitBase, bpy.types.Operator):
    """Render every rig camera over the frame range and reconstruct Gaussians from it"""

    bl_idname = "fourreal.reconstruct"
    bl_label = "Reconstruct"

    request_builder = staticmethod(workflows.reconstruct_request)


class FOURREAL_OT_import_ply(bpy.types.Operator, ImportHelper):
    """Import a 3DGS PLY file, or a sequence (one file per frame) as an animated Gaussian
    asset"""

    bl_idname = "fourreal.import_ply_sequence"
    bl_label = "Import 3DGS PLY Sequence"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012 (Blender reads a set)

    filename_ext = ".ply"
    filter_glob: StringProperty(default="*.ply", options={"HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN"})
    whole_folder: BoolProperty(name="Whole Folder", default=True,
                               description="Import every PLY of the folder, not just the "
                                           "selected files")
    persistent: EnumProperty(
        name="Persistent Gaussians", default="AUTO",
        items=(("AUTO", "Detect", "One moving point set when every file holds the same "
                "count with equal colour, opacity and scale rows, else one object per file"),
               ("PERSISTENT", "Persistent", "Gaussian i is the same in every file: one point "
                "set whose positions and rotations change per frame (motion blur works)"),
               ("PER_TIMESTEP", "Per File", "One object per file, shown on its frames")),
        description="Whether the files hold the same Gaussians at every frame")

    def execute(self, context):
        folder = Path(self.directory or Path(self.filepath).parent)
        chosen = [folder / f.name for f in self.files if f.name]
        source = folder if self.whole_folder or not chosen else chosen
        config = workflows.display_config(context.scene.fourreal)
        try:
            root = plyio.import_ply_sequence(context.scene, source, config=config,
                                             persistent=self.persistent)
        except (ValueError, OSError) as exc:
            return _fail(self, exc)
        layout = (" as persistent Gaussians" if pointcloud.persistent_object(root) is not None
                  else "")
        self.report({"INFO"}, f"imported {len(pointcloud.asset_frames(root))} timesteps{layout}")
        if root.get("fourreal_scene_changes"):
            self.report({"WARNING"}, "render settings changed for the Gaussians: "
                        f"{root['fourreal_scene_changes']}")
        return {"FINISHED"}


class FOURREAL_OT_export_ply(bpy.types.Operator, ExportHelper):
    """Export the active Gaussian asset as a 3DGS PLY sequence into a folder"""

    bl_idname = "fourreal.export_ply_sequence"
    bl_label = "Export 3DGS PLY Sequence"

    filename_ext = ""
    use_filter_folder = True
    world_space: BoolProperty(name="World Space", default=True)

    @classmethod
    def poll(cls, context):
        return pointcloud.asset_of(context.active_object) is not None

    def execute(self, context):
        folder = Path(self.filepath)
        folder = folder if folder.suffix == "" else folder.with_suffix("")
        try:
            paths = plyio.export_ply_sequence(context.active_object, folder, self.world_space)
        except (ValueError, OSError) as exc:
            return _fail(self, exc)
        self.report({"INFO"}, f"wrote {len(paths)} PLY files to {folder}")
        return {"FINISHED"}


def menu_import(self, context):
    self.layout.operator(FOURREAL_OT_import_ply.bl_idname, text="3DGS PLY Sequence (.ply)")


def menu_export(self, context):
    self.layout.operator(FOURREAL_OT_export_ply.bl_idname, text="3DGS PLY Sequence (.ply)")


CLASSES = (FOURREAL_OT_add_rig, FOURREAL_OT_start_backend, FOURREAL_OT_stop_backend,
           FOURREAL_OT_release, FOURREAL_OT_cancel, FOURREAL_OT_refetch, FOURREAL_OT_generate,
           FOURREAL_OT_reconstruct, FOURREAL_OT_import_ply, FOURREAL_OT_export_ply)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(menu_import)
    bpy.types.TOPBAR_MT_file_export.append(menu_export)


def unregister() -> None:
    bpy.types.TOPBAR_MT_file_export.remove(menu_export)
    bpy.types.TOPBAR_MT_file_import.remove(menu_import)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    runtime.shutdown()
