"""Importing what users have: a single unnumbered `point_cloud.ply`, and files that are
damaged or inconsistent, reported with the file and the field named and the scene untouched;
job results imported from the polling timer push an undo step."""

from __future__ import annotations

import numpy as np
import pytest
from blender_support import addon_module, bpy, empty_scene, gaussian_sequence_arrays

pytestmark = pytest.mark.blender

pointcloud = addon_module("pointcloud")
plyio = addon_module("plyio")
workflows = addon_module("workflows")
jobs = addon_module("jobs")
gaussians_mod = addon_module("vendor.gaussians")
protocol = addon_module("vendor.protocol")
Gaussians = gaussians_mod.Gaussians


def some_gaussians(n: int = 30, seed: int = 0) -> Gaussians:
    return Gaussians.from_arrays(gaussian_sequence_arrays(1, n, seed=seed)[0])


def data_snapshot(scene) -> dict:
    """What an import adds to or changes in the file."""
    return {"objects": len(bpy.data.objects), "meshes": len(bpy.data.meshes),
            "groups": len(bpy.data.node_groups), "materials": len(bpy.data.materials),
            "collections": len(bpy.data.collections), "actions": len(bpy.data.actions),
            "view": scene.view_settings.view_transform,
            "bounces": scene.cycles.transparent_max_bounces}


def test_single_unnumbered_point_cloud_imports_as_a_static_asset(tmp_path):
    folder = tmp_path / "iteration_30000"
    folder.mkdir()
    g = some_gaussians()
    gaussians_mod.write_ply(folder / "point_cloud.ply", g)
    for source in (folder / "point_cloud.ply", folder, [folder / "point_cloud.ply"]):
        scene = empty_scene()
        root = plyio.import_ply_sequence(scene, source)
        assert root.name == "point_cloud"
        (obj,) = pointcloud.timestep_objects(root)
        assert obj.animation_data is None, "a static asset has no visibility keys"
        np.testing.assert_array_equal(pointcloud.mesh_gaussians(obj.data).means, g.means)
        assert scene.view_settings.view_transform == "Raw"
        assert "view transform" in root["fourreal_scene_changes"]


def bad_files(folder) -> dict:
    """name -> (file bytes, what the error must say)."""
    good = gaussians_mod.ply_bytes(some_gaussians(10))
    fewer = good.replace(b"element vertex 10", b"element vertex 7")
    absurd = some_gaussians(10)
    absurd.log_scales[4, 1] = 60.0
    return {"frame_0001.ply": (b"", "empty"),
            "frame_0002.ply": (fewer, "element vertex 7.*smaller than the data"),
            "frame_0003.ply": (gaussians_mod.ply_bytes(absurd), "scale_1.*vertex 4.*60")}


def test_bad_files_are_named_and_leave_the_scene_untouched(tmp_path):
    scene = empty_scene()
    gaussians_mod.write_ply(tmp_path / "frame_0000.ply", some_gaussians(10))
    before = data_snapshot(scene)
    for name, (data, message) in bad_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: PLY: .*{message}"):
            plyio.import_ply_sequence(scene, tmp_path)
        assert data_snapshot(scene) == before, name
        (tmp_path / name).unlink()


def test_ascii_file_with_more_rows_than_its_header_is_refused(tmp_path):
    g = some_gaussians(4)
    names = ["x", "y", "z", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3", "f_dc_0", "f_dc_1", "f_dc_2"]
    columns = np.concatenate([g.means, g.opacity_logits[:, None], g.log_scales, g.quats,
                              g.sh0], axis=1)
    header = ["ply", "format ascii 1.0", "element vertex 3"]
    header += [f"property float {n}" for n in names] + ["end_header"]
    rows = [" ".join(f"{v:.6f}" for v in row) for row in columns]
    (tmp_path / "cloud.ply").write_text("\n".join(header + rows) + "\n")
    with pytest.raises(ValueError, match=r"cloud\.ply: .*element vertex 3.*1 more lines"):
        plyio.import_ply_sequence(empty_scene(), tmp_path / "cloud.ply")


def test_duplicate_frame_numbers_name_both_files(tmp_path):
    for name in ("gs_1.ply", "gs_01.ply", "gs_2.ply"):
        gaussians_mod.write_ply(tmp_path / name, some_gaussians(5))
    with pytest.raises(ValueError, match=r"gs_01\.ply and gs_1\.ply have the same frame number 1"):
        plyio.import_ply_sequence(empty_scene(), tmp_path)


def test_unnumbered_file_among_several_is_named(tmp_path):
    for name in ("frame_0000.ply", "point_cloud.ply"):
        gaussians_mod.write_ply(tmp_path / name, some_gaussians(5))
    with pytest.raises(ValueError, match=r"no frame number in file name .point_cloud\.ply."):
        plyio.import_ply_sequence(empty_scene(), tmp_path)


def test_job_results_imported_from_the_timer_can_be_undone():
    scene = empty_scene()
    bpy.ops.ed.undo_push(message="before the job")
    steps = gaussian_sequence_arrays(2, 20, seed=1)
    record = jobs.JobRecord(id="job1", kind="generate", state="done",
                            context={"frames": [1, 2]})
    record.results = [protocol.Message("result", "job1", {"content": "gaussians", "index": t,
                                                          "frame": t}, arrays)
                      for t, arrays in enumerate(steps)]
    root = workflows.finish_import(record, scene.name, "Result")
    assert root is not None and len(pointcloud.timestep_objects(root)) == 2
    assert record.results == [] and record.context["imported"] == 2
    name = root.name
    edit = bpy.data.objects.new("Edit", None)
    scene.collection.objects.link(edit)
    bpy.ops.ed.undo_push(message="a user edit after the import")
    bpy.ops.ed.undo()  # undoes the edit only: the import was a step of its own
    assert name in bpy.data.objects and "Edit" not in bpy.data.objects
    bpy.ops.ed.undo()
    assert name not in bpy.data.objects
