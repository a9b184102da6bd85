"""The add-on as a package: vendored backend modules, the extension manifest, and the zip
that `build.py addon` builds, installed into a fresh Blender user folder."""

from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import tomllib
from blender_support import addon_module

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "blender_addon"
MANIFEST = tomllib.loads((ADDON / "blender_manifest.toml").read_text())

INSTALL_SCRIPT = textwrap.dedent("""
    import json, sys
    import bpy
    result = bpy.ops.extensions.package_install_files(
        repo="user_default", filepath=sys.argv[1], enable_on_install=True)
    name = "bl_ext.user_default.fourreal_4d"
    enabled = name in bpy.context.preferences.addons
    added = bpy.ops.fourreal.add_rig(num_cameras=3) if enabled else None
    json.dump({"result": sorted(result), "enabled": enabled,
               "added": sorted(added or []),
               "cameras": sum(o.type == "CAMERA" for o in bpy.context.scene.objects),
               "mode": bpy.context.preferences.addons[name].preferences.backend_mode
               if enabled else None}, open(sys.argv[2], "w"))
""")


def test_shared_modules_are_not_committed_twice():
    """One copy of each shared module in the repository: the add-on reads the checkout's."""
    vendor = addon_module("vendor")
    assert vendor.SHARED_MODULES
    for name in vendor.SHARED_MODULES:
        assert not (ADDON / "vendor" / f"{name}.py").exists(), name
        module = addon_module(f"vendor.{name}")
        assert Path(module.__file__).resolve() == ROOT / "backend" / f"{name}.py"


def test_exclusions_follow_the_manifest_patterns():
    build = load_build_module()
    patterns = MANIFEST["build"]["paths_exclude_pattern"]
    files = {p.as_posix() for p in build.addon_files(patterns)}
    assert {"__init__.py", "blender_manifest.toml", "vendor/__init__.py"} <= files
    cases = {"__pycache__/x.cpython-311.pyc": True, "a/__pycache__/b.py": True, "x.pyc": True,
             "tests/test_a.py": True, "vendor/tests/a.py": False, "test_rig.py": True,
             "scene.blend1": True, "rig.py": False, ".cache/a": True}
    for rel, expected in cases.items():
        assert build.excluded_by(PurePosixPath(rel), False, patterns) == expected, rel


def test_manifest_declares_the_extension():
    assert MANIFEST["schema_version"] == "1.0.0"
    assert MANIFEST["id"] == "fourreal_4d" and MANIFEST["type"] == "add-on"
    assert MANIFEST["version"] == "0.1.0"
    assert MANIFEST["blender_version_min"] == "4.2.0"
    assert set(MANIFEST["permissions"]) == {"network", "files"}
    assert all(MANIFEST["permissions"].values()), "each permission says why"
    excluded = MANIFEST["build"]["paths_exclude_pattern"]
    assert {"__pycache__/", "/tests/", ".cache/"} <= set(excluded)


def test_manifest_lists_pyzmq_for_every_platform_and_python():
    wheels = [Path(w).name for w in MANIFEST["wheels"]]
    assert all(w.startswith("./wheels/pyzmq-") for w in MANIFEST["wheels"])
    for python_tag in ("cp311-cp311", "abi3"):  # Blender 4.2-5.0, and 5.1+ (Python 3.13)
        for platform in ("manylinux", "win_amd64", "macosx"):
            assert any(python_tag in w and platform in w for w in wheels), (python_tag, platform)
    assert all("universal2" in w for w in wheels if "macosx" in w), "arm64 and x86_64"


def load_build_module():
    spec = importlib.util.spec_from_file_location("build_script", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_addon(tmp_path: Path, *args: str) -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "build.py"), "addon", "--output",
                          str(tmp_path / "dist"), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    zips = list((tmp_path / "dist").glob("fourreal_4d-*.zip"))
    assert [z.name for z in zips] == ["fourreal_4d-0.1.0.zip"]
    return zips[0]


def install_in_fresh_blender(tmp_path: Path, package: Path) -> dict:
    script, report = tmp_path / "install.py", tmp_path / "report.json"
    script.write_text(INSTALL_SCRIPT)
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender-user"))
    out = subprocess.run([sys.executable, str(script), str(package), str(report)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and report.exists(), out.stdout + out.stderr
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    """The extension zip without the pyzmq wheels (nothing downloaded), built once."""
    return build_addon(tmp_path_factory.mktemp("zip"), "--no-wheels")


def test_built_zip_has_the_addon_without_tests_or_caches_and_installs(built_zip, tmp_path):
    package = built_zip
    names = zipfile.ZipFile(package).namelist()
    for required in ("blender_manifest.toml", "__init__.py", "rig.py", "pointcloud.py",
                     "vendor/__init__.py", "vendor/protocol.py", "vendor/client.py",
                     "vendor/gaussians.py"):
        assert required in names
    for name in ("protocol", "client", "gaussians"):
        assert zipfile.ZipFile(package).read(f"vendor/{name}.py") == \
            (ROOT / "backend" / f"{name}.py").read_bytes()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")
                or "/test_" in n or n.startswith("test")]
    manifest = tomllib.loads(zipfile.ZipFile(package).read("blender_manifest.toml").decode())
    assert manifest["wheels"] == [], "the backend wheel is not for Blender's own Python"
    assert [n for n in names if n.startswith("backend_wheel/")] == [
        "backend_wheel/fourreal_backend-0.1.0-py3-none-any.whl", "backend_wheel/constraints.txt"]
    report = install_in_fresh_blender(tmp_path, package)
    assert report == {"result": ["FINISHED"], "enabled": True, "added": ["FINISHED"],
                      "cameras": 4, "mode": "LOCAL"}  # the factory scene has one camera


def expected_backend_files() -> set[str]:
    """What pyproject.toml installs: the packages `find` includes less its exclusions (their
    modules), and the declared package data (the shipped weights)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = config["packages"]["find"]
    files = set()
    for init in (ROOT / "backend").rglob("__init__.py"):
        package = ".".join(init.parent.relative_to(ROOT).parts)
        if any(fnmatch.fnmatchcase(package, p) for p in find["include"]) and not any(
                fnmatch.fnmatchcase(package, p) for p in find["exclude"]):
            files |= {m.relative_to(ROOT).as_posix() for m in init.parent.glob("*.py")}
    for package, patterns in config["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            files |= {f.relative_to(ROOT).as_posix() for f in folder.glob(pattern)}
    return files


def test_backend_wheel_in_the_zip_is_the_repositorys_backend_package(built_zip):
    archive = zipfile.ZipFile(built_zip)
    wheel = zipfile.ZipFile(io.BytesIO(archive.read(
        "backend_wheel/fourreal_backend-0.1.0-py3-none-any.whl")))
    names = wheel.namelist()
    installed = {n for n in names if not n.startswith("fourreal_backend-0.1.0.dist-info/")}
    expected = expected_backend_files()
    assert "backend/weights/recon-tiny/model.safetensors" in expected
    assert "backend/server.py" in expected and not any(
        f.startswith(("backend/train/", "backend/data/", "backend/tools/")) for f in expected)
    assert installed == expected
    for name in sorted(expected):
        assert wheel.read(name) == (ROOT / name).read_bytes(), name
    metadata = wheel.read("fourreal_backend-0.1.0.dist-info/METADATA").decode()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"Version: {project['version']}" in metadata
    for requirement in project["dependencies"]:
        assert f"Requires-Dist: {requirement}" in metadata, requirement
    entry_points = wheel.read("fourreal_backend-0.1.0.dist-info/entry_points.txt").decode()
    assert "fourreal-backend = backend.__main__:main" in entry_points
    constraints = archive.read("backend_wheel/constraints.txt").decode().splitlines()
    assert constraints == load_build_module().backend_constraints()


@pytest.mark.slow
def test_built_zip_with_wheels_installs_pyzmq(tmp_path):
    package = build_addon(tmp_path)
    names = zipfile.ZipFile(package).namelist()
    manifest = tomllib.loads(zipfile.ZipFile(package).read("blender_manifest.toml").decode())
    assert len(manifest["wheels"]) == 6
    assert all(w[2:] in names for w in manifest["wheels"])
    report = install_in_fresh_blender(tmp_path, package)
    assert report["enabled"] and report["cameras"] == 4
    site = tmp_path / "blender-user" / "extensions" / ".local"
    assert list(site.glob("lib/python3*/site-packages/zmq/__init__.py")), "pyzmq installed"


# Runs in a fresh Blender with the extension installed from the zip, as a user would use it:
# Install Backend (from the package index), Start, a render job, Generate, Remove Backend.
# Blender's timers do not run without a window, so the script calls the timer callbacks.
END_TO_END_SCRIPT = textwrap.dedent("""
    import importlib, json, sys, time
    from pathlib import Path
    import bpy
    import numpy as np

    package, folder, torch_index, report_path = sys.argv[1:5]
    report = {}

    def save():
        Path(report_path).write_text(json.dumps(report, indent=1))

    def pump(callback, until, timeout):
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached within {timeout} s")
            callback()
            time.sleep(0.1)

    bpy.ops.extensions.package_install_files(repo="user_default", filepath=package,
                                             enable_on_install=True)
    name = "bl_ext.user_default.fourreal_4d"
    install = importlib.import_module(name + ".install_operators")
    runtime = importlib.import_module(name + ".runtime")
    prefs = bpy.context.preferences.addons[name].preferences
    prefs.install_folder, prefs.install_torch, prefs.torch_index = folder, "CPU", torch_index

    started = time.monotonic()
    report["install_op"] = sorted(bpy.ops.fourreal.install_backend())
    task, fractions = install.current_task(), []
    while task.running:
        install.tick()
        fractions.append(task.fraction)
        time.sleep(0.5)
    report["install"] = {"state": task.state, "error": task.error and task.error.message,
                         "seconds": round(time.monotonic() - started),
                         "monotonic": fractions == sorted(fractions),
                         "moved": len(set(fractions))}
    save()

    report["start_op"] = sorted(bpy.ops.fourreal.start_backend())
    run = runtime.runner()
    pump(runtime.tick, lambda: run.backend_state in ("ready", "dead"), 600)
    report["backend"] = {"state": run.backend_state, "error": run.backend_error,
                         "python": run.local.config.python}
    save()

    rng = np.random.default_rng(0)
    n = 200
    c2w = np.eye(4, dtype=np.float32)[None]
    c2w[0, 2, 3] = -3.0  # OpenCV camera at z=-3 looking down +Z at the origin
    render = run.submit("render", {"near": 0.1}, {
        "means": rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "log_scales": np.full((n, 3), -3.0, np.float32),
        "opacity_logits": np.full(n, 3.0, np.float32),
        "sh0": rng.normal(0.0, 0.8, (n, 3)).astype(np.float32),
        "c2w": c2w, "intrinsics": np.array([[40, 40, 16, 16, 32, 32]], np.float32)})
    pump(runtime.tick, lambda: not render.active, 600)
    images = render.ordered_results("image") if render.state == "done" else []
    report["render"] = {"state": render.state, "error": render.error_text,
                        "images": len(images),
                        "covered": float((images[0].arrays["alpha"] > 0.5).mean())
                        if images else 0.0}
    save()

    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 2
    scene.render.resolution_x, scene.render.resolution_y = 32, 24
    scene.render.resolution_percentage = 100
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = 4, "CPU"
    bpy.ops.fourreal.add_rig(num_cameras=4, radius=6.0, height=1.0)
    settings = scene.fourreal
    settings.input_source, settings.steps, settings.fit_preset = "RENDER", 1, "fast"
    report["generate_op"] = sorted(bpy.ops.fourreal.generate())
    job = run.latest()
    pump(runtime.tick, lambda: not job.active, 1200)
    runtime.tick()  # imports the result
    asset = job.context.get("asset")
    report["generate"] = {"state": job.state, "error": job.error_text,
                          "asset": asset is not None and asset in bpy.data.objects}
    save()

    report["stop_op"] = sorted(bpy.ops.fourreal.stop_backend())
    report["remove_op"] = sorted(bpy.ops.fourreal.remove_backend())
    report["env_left"] = (Path(folder) / "env").exists()
    runtime.shutdown()
    save()
""")


def torch_index_for_this_machine() -> str:
    """"" (the add-on's choice: PyTorch's CPU index on Linux) where that index can be reached;
    else PyPI, whose pinned torch is the CPU wheel only where pip finds a local one (as on the
    project's CI machines, which reach no other index). FOURREAL_TORCH_INDEX overrides."""
    import socket

    if "FOURREAL_TORCH_INDEX" in os.environ:
        return os.environ["FOURREAL_TORCH_INDEX"]
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=5).close()
        return ""
    except OSError:
        return "https://pypi.org/simple"


@pytest.mark.slow
def test_zip_installs_the_backend_starts_renders_generates_and_removes(built_zip, tmp_path):
    script, report_path = tmp_path / "end_to_end.py", tmp_path / "report.json"
    script.write_text(END_TO_END_SCRIPT)
    folder = tmp_path / "backend install"  # a space, as in many user folders
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender-user"))
    env.pop("PYTHONPATH", None)  # nothing of the checkout's backend can leak in
    out = subprocess.run([sys.executable, str(script), str(built_zip), str(folder),
                          torch_index_for_this_machine(), str(report_path)],
                         capture_output=True, text=True, env=env, timeout=3000)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert out.returncode == 0, f"{report}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert report["install"]["state"] == "done", report["install"]["error"]
    assert report["install"]["monotonic"] and report["install"]["moved"] > 10
    assert report["backend"]["state"] == "ready", report["backend"]["error"]
    assert report["backend"]["python"] == str(folder / "env" / "bin" / "python")
    assert report["render"]["state"] == "done" and report["render"]["images"] == 1
    assert report["render"]["covered"] > 0.01, "the Gaussians show in the render"
    assert report["generate"] == {"state": "done", "error": "", "asset": True}
    assert (report["stop_op"], report["remove_op"]) == (["FINISHED"], ["FINISHED"])
    assert not report["env_left"]
    assert (folder / "install.log").read_text().count("=== done") == 1
