"""The registered add-on: operators called as a user's clicks call them, menus, properties,
and the status mirrored for the panels."""

from __future__ import annotations

import pytest
from blender_support import addon_module, bpy, empty_scene, gaussian_sequence_arrays

pytestmark = pytest.mark.blender

pointcloud = addon_module("pointcloud")
runtime = addon_module("runtime")
gaussians_mod = addon_module("vendor.gaussians")


@pytest.fixture(scope="module", autouse=True)
def addon():
    module = addon_module()
    module.register()
    yield module
    module.unregister()


def test_job_settings_take_defaults_and_bounds_from_the_backends_schema():
    job_params = addon_module("vendor.job_params")
    rna = bpy.types.Scene.bl_rna.properties["fourreal"].fixed_type.bl_rna.properties
    for name in ("seed", "steps", "guidance", "fit_seconds"):
        param, prop = job_params.JOB_PARAMS["generate"][name], rna[name]
        high = min(param.high, 2**31 - 1) if param.type == "int" else param.high
        assert prop.default == pytest.approx(param.default), name
        assert (prop.hard_min, prop.hard_max) == pytest.approx((param.low, high)), name
        assert prop.description.lower().startswith(param.doc[:20].lower()), name
    for prop_name, name in (("fit_preset", "fit"), ("fit_init", "fit_init")):
        prop, param = rna[prop_name], job_params.JOB_PARAMS["generate"][name]
        assert [item.identifier for item in prop.enum_items] == list(param.choices), name
        assert prop.default == param.default, name


def test_add_rig_operator_creates_cameras_and_selects_the_rig():
    scene = empty_scene()
    scene.cursor.location = (1.0, 2.0, 0.0)
    assert bpy.ops.fourreal.add_rig(num_cameras=5, radius=2.0, arc_degrees=120.0,
                                    animate_orbit=True) == {"FINISHED"}
    settings = scene.fourreal
    assert settings.rig_source == "COLLECTION"
    cameras = [o for o in settings.rig_collection.all_objects if o.type == "CAMERA"]
    assert len(cameras) == 5 and scene.camera in cameras
    target = cameras[0].parent
    assert tuple(target.location) == pytest.approx((1.0, 2.0, 0.0))
    scene.frame_set(scene.frame_end)
    assert target.matrix_world.to_euler().z == pytest.approx(0.0, abs=1e-5), "a full turn"


def test_add_rig_operator_reports_bad_settings():
    empty_scene()
    with pytest.raises(RuntimeError, match="frame_end > frame_start"):
        bpy.context.scene.frame_end = bpy.context.scene.frame_start
        bpy.ops.fourreal.add_rig(animate_orbit=True)


def test_import_and_export_operators_round_trip(tmp_path):
    steps = gaussian_sequence_arrays(2, 100, seed=9)
    seq = gaussians_mod.GaussianSequence([gaussians_mod.Gaussians.from_arrays(a) for a in steps],
                                         [3, 4])
    gaussians_mod.write_ply_sequence(tmp_path / "seq", seq)
    scene = empty_scene()
    scene.fourreal.viewport_ratio = 0.5
    assert bpy.ops.fourreal.import_ply_sequence(
        directory=str(tmp_path / "seq") + "/", files=[{"name": "frame_0003.ply"}]) == \
        {"FINISHED"}
    root = next(o for o in scene.objects if pointcloud.is_asset(o))
    assert len(pointcloud.timestep_objects(root)) == 2, "the whole folder by default"
    assert pointcloud.read_settings(root).viewport_ratio == pytest.approx(0.5)
    bpy.context.view_layer.objects.active = pointcloud.timestep_objects(root)[0]
    assert bpy.ops.fourreal.export_ply_sequence(filepath=str(tmp_path / "out")) == {"FINISHED"}
    for name in ("frame_0003.ply", "frame_0004.ply"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes()


def test_export_needs_an_active_asset():
    empty_scene()
    assert not bpy.ops.fourreal.export_ply_sequence.poll()


def test_file_menus_list_the_ply_operators():
    import_entries = [f.__name__ for f in bpy.types.TOPBAR_MT_file_import._dyn_ui_initialize()]
    export_entries = [f.__name__ for f in bpy.types.TOPBAR_MT_file_export._dyn_ui_initialize()]
    assert "menu_import" in import_entries and "menu_export" in export_entries


def test_job_operators_refuse_clearly_without_a_backend():
    empty_scene()
    runtime.shutdown()
    with pytest.raises(RuntimeError, match="backend is stopped"):
        bpy.ops.fourreal.generate()
    with pytest.raises(RuntimeError, match="not connected"):
        bpy.ops.fourreal.release()
    with pytest.raises(RuntimeError, match="no lost job"):
        bpy.ops.fourreal.refetch()


def test_status_mirror_shows_the_latest_job():
    run = runtime.runner()
    jobs = addon_module("jobs")
    record = jobs.JobRecord("abc123", "generate", state="failed", stage="sample", step=2, of=8,
                            error_code="unknown_kind", error_message="no generate here")
    run.jobs[record.id] = record
    try:
        runtime.mirror(bpy.context.window_manager)
        status = bpy.context.window_manager.fourreal_status
        assert (status.job_id, status.job_state, status.step, status.of) == \
            ("abc123", "failed", 2, 8)
        assert status.progress == pytest.approx(0.25)
        assert status.job_error.startswith("no generate here [unknown_kind]")
    finally:
        runtime.shutdown()


def test_start_backend_with_a_bad_repository_reports_it(tmp_path):
    addon_name = addon_module().__name__
    assert bpy.context.preferences.addons.get(addon_name) is None  # defaults apply
    preferences = addon_module("preferences")
    values = preferences.preference_values()
    assert values.backend_mode == "LOCAL" and values.address.startswith("tcp://")
    backend_process = addon_module("backend_process")
    assert backend_process.default_repo() is not None, "run from the repository"
    config = backend_process.LocalBackendConfig(repo=str(tmp_path))
    with pytest.raises(ValueError, match="repository not found"):
        runtime.runner().start_local(backend_process.LocalBackend(config))
    assert runtime.runner().backend_state == "dead"
    runtime.shutdown()


class RecordingLayout:
    """Stands in for a UI layout: checks that every drawn property and operator exists."""

    def __init__(self, drawn: list):
        self.drawn = drawn
        self.alert = self.enabled = False
        self.scale_y = 1.0

    def prop(self, data, name, text=None, **_):
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no {name!r}"
        self.drawn.append(text or name)

    def operator(self, idname, **_):
        category, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, category), name), idname
        self.drawn.append(idname)
        return type("OperatorProperties", (), {})()

    def label(self, text="", **_):
        self.drawn.append(text)

    def progress(self, factor=0.0, type="BAR", text=""):
        assert 0.0 <= factor <= 1.0
        self.drawn.append(text)

    def separator(self, **_):
        pass

    def row(self, **_):
        return self

    column = box = row


def test_panels_draw_existing_properties_and_operators():
    panels = addon_module("panels")
    scene = empty_scene()
    steps = gaussian_sequence_arrays(2, 20, seed=2)
    root = pointcloud.build_asset_from_arrays(scene, "Drawn", steps, [1, 2])
    bpy.context.view_layer.objects.active = root
    status = bpy.context.window_manager.fourreal_status
    status.job_id, status.job_state, status.job_error = "x", "failed", "bad [bad_input] hint"
    status.backend_state, status.lost_jobs = "dead", 1
    drawn = []
    for panel in panels.CLASSES:
        for settings in ("SELECTION", "COLLECTION"):
            scene.fourreal.rig_source = settings
            for source in ("CLIP", "IMAGES", "RENDER"):
                scene.fourreal.input_source = source
                fake = type("Panel", (), {"layout": RecordingLayout(drawn)})()
                panel.draw(fake, bpy.context)
    status.active_jobs = 1
    panels.draw_status_bar(type("Header", (), {"layout": RecordingLayout(drawn)})(),
                           bpy.context)
    for expected in ("fourreal.generate", "fourreal.refetch", "fourreal.export_ply_sequence",
                     "movie_clip", "image_folder", "rig_collection", "Viewport Ratio"):
        assert any(expected in str(item) for item in drawn), expected
    assert panels.FOURREAL_PT_result.poll(bpy.context)
