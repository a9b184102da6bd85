"""Install Backend: Python discovery, the commands an install runs, pip's output read as
progress, cancel and failures of real child processes, the disk check, the environment's
status and removal, and Start using the environment. The download itself is the slow test in
test_addon_package.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blender_support import addon_module, bpy

pytestmark = pytest.mark.blender

installer = addon_module("installer")
install_task = addon_module("install_task")
backend_process = addon_module("backend_process")
InstallError = installer.InstallError
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def addon():
    """The add-on enabled as Blender enables it, so it has preferences."""
    import addon_utils

    module = addon_utils.enable(addon_module().__name__, default_set=True, handle_error=None)
    yield module
    addon_utils.disable(module.__name__, default_set=True)


def fake_python(folder: Path, name: str, version=(3, 10), venv=True, runs=True) -> str:
    """An executable that answers the installer's probe as a Python of `version` would."""
    path = folder / name
    answer = json.dumps({"version": list(version), "venv": venv})
    path.write_text(f"#!/bin/sh\necho '{answer}'\n" if runs else "#!/bin/sh\nexit 3\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


needs_posix = pytest.mark.skipif(os.name == "nt", reason="shell-script stand-ins for Python")


def bundled_folder(tmp_path: Path, version: str = "0.1.0") -> Path:
    """A backend_wheel/ folder as build.py fills it (the wheel's bytes are not read here)."""
    build = load_build()
    folder = tmp_path / "backend_wheel"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    (folder / f"fourreal_backend-{version}-py3-none-any.whl").write_bytes(b"wheel")
    (folder / "constraints.txt").write_text("\n".join(build.backend_constraints()) + "\n")
    return folder


def load_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_script", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_installed(folder: Path, version: str = "0.1.0") -> Path:
    """An environment as a finished install leaves it (no packages in it)."""
    env = installer.env_dir(folder)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   env=installer.child_env())
    (env / installer.RECORD_NAME).write_text(json.dumps(
        {"backend_version": version, "torch": "cpu", "python_version": "3.11"}))
    return installer.env_python(env)


# ----------------------------------------------------------------------------- discovery

def test_blenders_own_python_is_chosen_when_it_can_make_environments():
    found = installer.find_python(own=sys.executable, on_path=[])
    assert found == installer.PythonCandidate(sys.executable, sys.version_info[:2], "blender")


@needs_posix
def test_python_on_path_when_blenders_cannot(tmp_path):
    old = fake_python(tmp_path, "python3.10", version=(3, 10))
    no_venv = fake_python(tmp_path, "python3.12", version=(3, 12), venv=False)
    broken = fake_python(tmp_path, "python3", runs=False)
    found = installer.find_python(own=no_venv, on_path=[old, broken, sys.executable])
    assert (found.path, found.source) == (sys.executable, "path")
    with pytest.raises(InstallError) as error:
        installer.find_python(own=no_venv, on_path=[old, broken])
    assert error.value.code == "no_python"
    for hint in ("python3.10 is Python 3.10", "cannot create virtual environments",
                 "python3 does not run", "python.org", "Python for the Environment"):
        assert hint in error.value.message, hint


@needs_posix
def test_the_users_python_must_do_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_python(tmp_path, "python3.12", version=(3, 12))
    assert installer.path_candidates(("python3.13", "python3.12")) == [
        str(tmp_path / "python3.12")]
    found = installer.find_python(user_path=str(tmp_path / "python3.12"), own=sys.executable)
    assert (found.version, found.source) == ((3, 12), "user")
    old = fake_python(tmp_path, "old", version=(3, 9))
    with pytest.raises(InstallError, match=r"\(.*old\) is Python 3.9"):
        installer.find_python(user_path=old, own=sys.executable)


# ----------------------------------------------------------------------------- commands

def test_torch_variant_and_index_per_platform():
    assert installer.torch_variant("AUTO", gpu=True, platform="linux") == "cuda"
    assert installer.torch_variant("AUTO", gpu=False, platform="linux") == "cpu"
    assert installer.torch_variant("CPU", gpu=True, platform="win32") == "cpu"
    assert installer.torch_variant("CUDA", gpu=True, platform="darwin") == "cpu"
    assert installer.torch_index("cpu", "linux") == installer.TORCH_CPU_INDEX
    assert installer.torch_index("cuda", "linux") is None  # PyPI's Linux torch is CUDA
    assert installer.torch_index("cpu", "win32") is None  # PyPI's Windows torch is CPU
    assert installer.torch_index("cuda", "win32") == installer.TORCH_CUDA_INDEX
    assert installer.torch_index("cpu", "darwin") is None
    assert installer.torch_index("cpu", "linux", override="https://x/simple") == \
        "https://x/simple"


def test_install_plan_runs_venv_pip_torch_then_the_wheel(tmp_path):
    wheels = bundled_folder(tmp_path)
    python = installer.PythonCandidate("/opt/py/bin/python3.11", (3, 11), "path")
    plan = installer.plan_install(tmp_path / "inst", python, "cpu", wheel_folder=wheels)
    env = tmp_path / "inst" / "env"
    venv_python = str(installer.env_python(env))
    venv, pip, torch, backend = (step.argv for step in plan.steps)
    assert venv == ["/opt/py/bin/python3.11", "-m", "venv", "--clear", str(env)]
    assert pip[:3] == [venv_python, "-m", "pip"] and "pip>=24.1" in pip
    assert torch[:4] == [venv_python, "-m", "pip", "install"]
    assert torch[torch.index("--progress-bar"):][:2] == ["--progress-bar", "raw"]
    build = load_build()
    assert f"torch=={build.TORCH_VERSION}" in torch, "build.py's pin"
    expected_index = installer.TORCH_CPU_INDEX if sys.platform.startswith("linux") else None
    assert (torch[torch.index("--index-url") + 1] if "--index-url" in torch else None) == \
        expected_index
    assert str(wheels / "fourreal_backend-0.1.0-py3-none-any.whl") in backend
    assert backend[backend.index("-c") + 1] == str(wheels / "constraints.txt")
    assert sum(step.weight for step in plan.steps) == pytest.approx(1.0)
    assert plan.record == {"backend_version": "0.1.0", "wheel": "fourreal_backend-0.1.0-"
                           "py3-none-any.whl", "torch": "cpu",
                           "torch_index": expected_index or "",
                           "python": "/opt/py/bin/python3.11", "python_version": "3.11"}
    assert plan.log_path == tmp_path / "inst" / "install.log"
    assert not (tmp_path / "inst").exists(), "planning writes nothing"


def test_install_plan_needs_the_bundled_wheel(tmp_path):
    python = installer.PythonCandidate(sys.executable, (3, 11), "blender")
    with pytest.raises(InstallError) as error:
        installer.plan_install(tmp_path, python, "cpu", wheel_folder=tmp_path / "none")
    assert error.value.code == "no_wheel" and "build.py addon" in error.value.message


def test_update_applies_to_the_same_or_a_newer_wheel_only(tmp_path):
    folder = tmp_path / "inst"
    with pytest.raises(InstallError, match="Install Backend first"):
        installer.plan_update(folder, bundled_folder(tmp_path))
    fake_installed(folder, "0.1.0")
    for bundled, update in (("0.1.0", "same"), ("0.2.0", "newer"), ("0.0.9", "")):
        status = installer.environment_status(folder, bundled_folder(tmp_path, bundled))
        assert (status.state, status.update) == ("installed", update), bundled
    plan = installer.plan_update(folder, bundled_folder(tmp_path, "0.2.0"))
    replace, deps = (step.argv for step in plan.steps)
    assert "--force-reinstall" in replace and "--no-deps" in replace
    assert "--force-reinstall" not in deps and "-c" in deps, "torch stays"
    assert plan.record["backend_version"] == "0.2.0" and plan.record["torch"] == "cpu"
    with pytest.raises(InstallError) as error:
        installer.plan_update(folder, bundled_folder(tmp_path, "0.0.9"))
    assert error.value.code == "older" and "Remove Backend" in error.value.message


def test_disk_check_refuses_before_anything_starts(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert installer.check_disk_space(tmp_path / "not" / "yet", 1) == pytest.approx(
        free, rel=0.01)
    with pytest.raises(InstallError) as error:
        installer.check_disk_space(tmp_path / "not" / "yet", free * 4)
    assert error.value.code == "no_space"
    assert "choose another Install Folder" in error.value.message
    assert not (tmp_path / "not").exists()


# ----------------------------------------------------------------------------- progress

PIP_TRANSCRIPT = """\
Looking in indexes: https://download.pytorch.org/whl/cpu
Collecting torch==2.13.0
  Downloading https://download.pytorch.org/whl/cpu/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl (190.2 MB)
Progress 0 of 190200000
Progress 47550000 of 190200000
Progress 95100000 of 190200000
Progress 190200000 of 190200000
Collecting filelock (from torch==2.13.0)
  Downloading filelock-3.16.1-py3-none-any.whl (16 kB)
Progress 16000 of 16000
Collecting sympy (from torch==2.13.0)
  Downloading sympy-1.13.3-py3-none-any.whl (6.2 MB)
Progress 3100000 of 6200000\r
Progress 6200000 of 6200000
Installing collected packages: mpmath, sympy, filelock, torch
Successfully installed filelock-3.16.1 mpmath-1.3.0 sympy-1.13.3 torch-2.13.0+cpu
"""  # noqa: E501  (pip 24.1+ with --progress-bar raw, as an install step prints it)


def test_pip_output_moves_the_bar_forward_only():
    progress = install_task.PipProgress()
    fractions, texts = [], []
    for line in PIP_TRANSCRIPT.replace("\r", "\n").splitlines():
        progress.feed(line)
        fractions.append(progress.fraction)
        texts.append(progress.text)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "Downloading torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl: 95 of 190 MB" \
        in texts
    half = texts.index("Downloading torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl: "
                       "95 of 190 MB")
    first_done = texts.index("Collecting filelock")
    assert fractions[half] < fractions[first_done - 1] < fractions[first_done + 2] < 0.9
    assert "Installing 4 packages (mpmath, sympy, filelock, ...)" in texts
    assert not install_task.PipProgress().feed("Requirement already satisfied: numpy")


def plan_of(tmp_path: Path, *argvs: list[str], record=None) -> installer.InstallPlan:
    steps = [installer.Step(f"step {i}", argv, 1.0) for i, argv in enumerate(argvs)]
    return installer.InstallPlan(tmp_path, steps, record or {"backend_version": "0"}, 0)


def test_a_real_child_process_feeds_progress_and_the_log(tmp_path):
    script = ("import sys, time\n"
              "for line in sys.argv[1].splitlines():\n"
              "    print(line, flush=True)\n"
              "    time.sleep(0.02)\n")
    (tmp_path / "env").mkdir()
    plan = plan_of(tmp_path, [sys.executable, "-c", "print('made')"],
                   [sys.executable, "-c", script, PIP_TRANSCRIPT])
    task = install_task.InstallTask(plan).start()
    seen = []
    deadline = time.monotonic() + 60
    while task.running and time.monotonic() < deadline:
        task.poll()
        seen.append((task.index, task.fraction, task.text))
        time.sleep(0.01)
    assert task.state == "done" and task.error is None and task.fraction == 1.0
    assert [f for _, f, _ in seen] == sorted(f for _, f, _ in seen)
    assert any(0.5 < f < 1.0 and "step 1 (2/2): Downloading torch" in text
               for _, f, text in seen), "the bar moves while pip downloads"
    log = plan.log_path.read_text()
    assert "made" in log and "Successfully installed" in log and "=== done" in log
    assert json.loads((tmp_path / "env" / installer.RECORD_NAME).read_text()) == plan.record


def test_cancel_ends_the_step_and_its_children(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('child', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    plan = plan_of(tmp_path, [sys.executable, "-c", script], [sys.executable, "-c", "1"])
    task = install_task.InstallTask(plan).start()
    parent = task.process
    deadline = time.monotonic() + 30
    while not any(line.startswith("child ") for line in task.tail):
        assert time.monotonic() < deadline, "the step did not start its child"
        task.poll()
        time.sleep(0.05)
    child = int(next(line for line in task.tail if line.startswith("child ")).split()[1])
    started = time.monotonic()
    task.cancel()
    assert time.monotonic() - started < 10
    assert task.state == "cancelled" and task.error.code == "cancelled"
    assert parent.poll() is not None
    for _ in range(100):  # the child is reaped by init once killed
        if not Path(f"/proc/{child}").exists() or "State:\tZ" in Path(
                f"/proc/{child}/status").read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the step's child survived the cancel")
    assert task.index == 0, "the next step never started"
    assert not (tmp_path / "env" / installer.RECORD_NAME).exists()
    assert "=== cancelled" in plan.log_path.read_text()


# ----------------------------------------------------------------------------- failures

def run_failing_step(tmp_path: Path, argv: list[str], record=None) -> InstallError:
    task = install_task.InstallTask(plan_of(tmp_path, argv, record=record)).start()
    assert task.wait(120) == "failed"
    return task.error


def test_unreachable_index_is_reported_as_no_network(tmp_path):
    error = run_failing_step(tmp_path, [
        sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "3",
        "--no-cache-dir", "--index-url", "http://127.0.0.1:9/simple", "fourreal-no-such-pkg"],
        record={"torch_index": "http://127.0.0.1:9/simple"})
    assert error.code == "no_network", error.message
    assert "could not be reached (http://127.0.0.1:9/simple)" in error.message
    assert str(tmp_path / "install.log") in error.message


def test_a_missing_wheel_names_the_package(tmp_path):
    error = run_failing_step(tmp_path, [sys.executable, "-m", "pip", "install", "--no-index",
                                        "fourreal-no-such-pkg==1.0"],
                             record={"python_version": "3.11"})
    assert error.code == "failed_wheel"
    assert "fourreal-no-such-pkg==1.0 for Python 3.11" in error.message


def test_failures_say_what_to_do(tmp_path):
    log = tmp_path / "install.log"
    cases = {
        "no_space": ["ERROR: Could not install packages due to an OSError: [Errno 28] No "
                     "space left on device"],
        "no_venv": ["Error: Command '['/x/env/bin/python3', '-m', 'ensurepip', '--upgrade', "
                    "'--default-pip']' returned non-zero exit status 1.",
                    "The virtual environment was not created successfully because ensurepip "
                    "is not available."],
        "no_network": ["WARNING: Retrying (Retry(total=4)) after connection broken by "
                       "'NewConnectionError(Failed to establish a new connection: [Errno -3] "
                       "Temporary failure in name resolution)'", "ERROR: No matching "
                       "distribution found for torch==2.13.0"],
        "failed": ["Traceback (most recent call last):", "KeyError: 'x'"],
    }
    advice = {"no_space": "choose another Install Folder", "no_venv": "python3-venv",
              "no_network": "internet connection", "failed": "exit code 2"}
    for code, lines in cases.items():
        error = install_task.classify_failure(lines, 2, "Installing PyTorch (CPU)", log)
        assert error.code == code, (code, error.message)
        assert error.message.startswith("Installing PyTorch (CPU) failed")
        assert advice[code] in error.message and str(log) in error.message


# ----------------------------------------------------------------------------- environment

def test_status_and_removal_of_an_environment(tmp_path):
    folder = tmp_path / "inst"
    wheels = bundled_folder(tmp_path)
    assert installer.environment_status(folder, wheels).state == "missing"
    (folder / "env" / "bin").mkdir(parents=True)
    (folder / "env" / "pyvenv.cfg").write_text("")
    assert installer.environment_status(folder, wheels).state == "incomplete"
    assert installer.remove_environment(folder) == folder / "env"
    assert not (folder / "env").exists() and folder.exists()
    with pytest.raises(InstallError, match="No backend environment"):
        installer.remove_environment(folder)
    (folder / "env").mkdir()
    (folder / "env" / "precious.txt").write_text("not ours")
    with pytest.raises(InstallError) as error:
        installer.remove_environment(folder)
    assert error.value.code == "not_ours" and (folder / "env" / "precious.txt").exists()


def test_start_uses_the_installed_environment(tmp_path):
    python = fake_installed(tmp_path / "inst")
    config = backend_process.LocalBackendConfig(python=str(python))
    assert config.resolved() == (python, None, tmp_path / "inst" / "cache")
    checkout = backend_process.LocalBackendConfig(python=str(python), repo=str(ROOT))
    assert checkout.resolved()[1] == ROOT, "a repository set by hand still wins"
    local = backend_process.LocalBackend(backend_process.LocalBackendConfig(
        python=str(python), extra_args=["--no-such-option"]))
    local.start()
    with pytest.raises(backend_process.BackendStartError, match="No module named backend"):
        local.wait_ready(60)  # an empty environment: its own packages, not the checkout's


class Layout:
    """Records what a draw call shows; fails on properties or operators that do not exist."""

    def __init__(self, drawn: list):
        self.drawn, self.alert, self.enabled = drawn, False, True

    def prop(self, data, name, **_):
        assert name in data.bl_rna.properties, name
        self.drawn.append(name)

    def operator(self, idname, **_):
        category, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, category), name), idname
        self.drawn.append(idname)

    def label(self, text="", **_):
        self.drawn.append(text)

    def progress(self, factor=0.0, text="", **_):
        assert 0.0 <= factor <= 1.0
        self.drawn.append(f"progress {text}")

    def row(self, **_):
        return self

    column = box = row


def draw_preferences(prefs) -> list:
    drawn: list = []
    values = {p.identifier: getattr(prefs, p.identifier) for p in prefs.bl_rna.properties}
    fake = type("Prefs", (), {**values, "layout": Layout(drawn), "bl_rna": prefs.bl_rna,
                              "draw_install": type(prefs).draw_install})()
    type(prefs).draw(fake, bpy.context)
    return drawn


def test_preferences_install_refusal_removal_and_start(addon, tmp_path):
    prefs = bpy.context.preferences.addons[addon.__name__].preferences
    preferences = addon_module("preferences")
    install_operators = addon_module("install_operators")
    prefs.install_folder = str(tmp_path / "inst")
    try:
        assert "fourreal.install_backend" in draw_preferences(prefs)
        with pytest.raises(RuntimeError, match="carries no backend wheel"):
            bpy.ops.fourreal.install_backend()  # a checkout's add-on has no wheel
        _, error = install_operators.install_state()
        assert error.code == "no_wheel" and any("carries no backend wheel" in line
                                                for line in draw_preferences(prefs))
        python = fake_installed(tmp_path / "inst")
        assert preferences.preference_values().python_path == str(python)
        drawn = draw_preferences(prefs)
        assert "fourreal.remove_backend" in drawn and "fourreal.update_backend" in drawn
        assert any(line.startswith("Installed: backend 0.1.0 with CPU") for line in drawn)
        assert bpy.ops.fourreal.remove_backend() == {"FINISHED"}
        assert not (tmp_path / "inst" / "env").exists()
        assert preferences.preference_values().python_path == ""
    finally:
        prefs.install_folder = ""
