"""The add-on as a package: vendored backend modules, the extension manifest, and the zip
that `build.py addon` builds, installed into a fresh Blender user folder."""

from __future__ import annotations

import importlib.util
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


def test_built_zip_has_the_addon_without_tests_or_caches_and_installs(tmp_path):
    package = build_addon(tmp_path, "--no-wheels")
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
    assert manifest["wheels"] == []
    report = install_in_fresh_blender(tmp_path, package)
    assert report == {"result": ["FINISHED"], "enabled": True, "added": ["FINISHED"],
                      "cameras": 4, "mode": "LOCAL"}  # the factory scene has one camera


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
