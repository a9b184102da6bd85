"""Install Backend: a virtual environment holding the backend wheel this extension carries, made
by pip in child processes (never on Blender's UI thread), its progress read from pip's output.

Plain functions and one task class, no bpy: the operators in install_operators.py call them,
a `bpy.app.timers` callback polls the task. Layout of an install folder:

    <folder>/env/                        the virtual environment (removed by Remove Backend)
    <folder>/env/fourreal-install.json   written once the install succeeded
    <folder>/install.log                 every command and its output
    <folder>/cache/                      the local backend's job results
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIN_PYTHON = (3, 11)
WHEEL_FOLDER = Path(__file__).resolve().parent / "backend_wheel"  # filled by build.py addon
WHEEL_GLOB = "fourreal_backend-*.whl"
ENV_NAME, RECORD_NAME, LOG_NAME, CACHE_NAME = "env", "fourreal-install.json", "install.log", "cache"
# Linux: PyPI's torch is the CUDA build, so CPU-only installs use PyTorch's CPU index. Windows:
# PyPI's torch is the CPU build, so CUDA installs use PyTorch's CUDA index. macOS: PyPI (MPS).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
# free space an install needs in its folder: torch, numba/llvmlite, gsplat and the rest
REQUIRED_BYTES = {"cpu": 3 * 2**30, "cuda": 12 * 2**30, "update": 1 * 2**30}
PIP_WITH_RAW_PROGRESS = "pip>=24.1"  # `--progress-bar raw` prints "Progress N of M"
# Interpreters looked for on PATH, newest first.
PATH_NAMES = ("python3.13", "python3.12", "python3.11", "python3", "python")
_PROBE = ("import json, sys\n"
          "try:\n    import ensurepip, venv\n    ok = True\n"
          "except ImportError:\n    ok = False\n"
          "print(json.dumps({'version': list(sys.version_info[:2]), 'venv': ok}))")


class InstallError(Exception):
    """A failed or refused install step: `code` for the tests, `message` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ----------------------------------------------------------------------------- Python discovery

@dataclass(frozen=True)
class PythonCandidate:
    path: str
    version: tuple[int, int]
    source: str  # "user", "blender" or "path"


def probe_python(path: str, timeout: float = 15.0) -> tuple[tuple[int, int], bool] | None:
    """(version, can create virtual environments) of an interpreter, or None if it does not
    run (missing file, a pyenv shim without that version, a broken install)."""
    try:
        out = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True,
                             timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)
        info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    if not isinstance(info, dict):
        return None
    return tuple(info["version"]), bool(info["venv"])


def path_candidates(names: tuple[str, ...] = PATH_NAMES) -> list[str]:
    found = (shutil.which(name) for name in names)
    return list(dict.fromkeys(p for p in found if p))


def find_python(user_path: str = "", own: str | None = sys.executable,
                on_path: list[str] | None = None) -> PythonCandidate:
    """The interpreter to create the environment with: the one the user set (when set, it
    must do), else Blender's own when it can create virtual environments, else the first
    suitable one on PATH. InstallError("no_python") says what was tried."""
    if user_path:
        probed = probe_python(user_path)
        if probed is None or probed[0] < MIN_PYTHON or not probed[1]:
            raise InstallError("no_python", f"The Python set in the preferences ({user_path}) "
                               f"{_unsuitable(probed)}. Set a Python {_min()} or newer, or "
                               "clear the field to let the add-on look for one.")
        return PythonCandidate(user_path, probed[0], "user")
    tried = []
    sources = [(own, "blender")] if own else []
    sources += [(p, "path") for p in (path_candidates() if on_path is None else on_path)]
    for path, source in sources:
        probed = probe_python(path)
        if probed is not None and probed[0] >= MIN_PYTHON and probed[1]:
            return PythonCandidate(path, probed[0], source)
        tried.append(f"{path} {_unsuitable(probed)}")
    raise InstallError("no_python", f"No Python {_min()} or newer that can create virtual "
                       "environments was found. Install one (python.org; on Debian/Ubuntu also "
                       "the python3-venv package) or set 'Python for the Environment' in these "
                       "preferences. Tried: " + ("; ".join(tried) or "nothing on PATH"))


def _min() -> str:
    return ".".join(map(str, MIN_PYTHON))


def _unsuitable(probed) -> str:
    if probed is None:
        return "does not run"
    if probed[0] < MIN_PYTHON:
        return f"is Python {probed[0][0]}.{probed[0][1]}"
    return "cannot create virtual environments (no venv/ensurepip)" if not probed[1] else "is fine"


# ----------------------------------------------------------------------------- what to install

def nvidia_gpu_present(timeout: float = 20.0) -> bool:
    """Whether `nvidia-smi` runs: an NVIDIA GPU with a working driver."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def torch_variant(choice: str, gpu: bool, platform: str = sys.platform) -> str:
    """"cuda" or "cpu" from the preference (AUTO, CPU, CUDA) and whether a GPU was found."""
    if platform == "darwin":
        return "cpu"  # the macOS wheel is the only one (MPS)
    return "cuda" if choice == "CUDA" or (choice == "AUTO" and gpu) else "cpu"


def torch_index(variant: str, platform: str = sys.platform, override: str = "") -> str | None:
    """The package index torch comes from; None: the default index (PyPI)."""
    if override:
        return override
    if variant == "cpu" and platform.startswith("linux"):
        return TORCH_CPU_INDEX
    if variant == "cuda" and platform == "win32":
        return TORCH_CUDA_INDEX
    return None


def bundled_wheel(folder: Path = WHEEL_FOLDER) -> tuple[Path, Path]:
    """(backend wheel, pip constraints) that `build.py addon` put into the extension."""
    wheels = sorted(folder.glob(WHEEL_GLOB))
    constraints = folder / "constraints.txt"
    if len(wheels) != 1 or not constraints.is_file():
        raise InstallError("no_wheel", "This add-on carries no backend wheel (it runs from a "
                           "checkout, or the zip was not built by `python3 build.py addon`). "
                           "Install the extension zip built by build.py, or use a checkout's "
                           ".venv under 'Developers'.")
    return wheels[0], constraints


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0]))


def pinned_torch(constraints: Path) -> str:
    """The `torch==X` line of the constraints (build.py's TORCH_VERSION)."""
    for line in constraints.read_text().splitlines():
        if re.match(r"torch\s*==", line):
            return line.split(";")[0].strip()
    return "torch"


def check_disk_space(folder: Path, needed: int) -> int:
    """Free bytes where `folder` is (or will be); InstallError("no_space") below `needed`."""
    existing = folder.resolve()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise InstallError("no_space", f"Not enough free space for the backend in {folder}: "
                           f"{free / 2**30:.1f} GB free, about {needed / 2**30:.0f} GB needed. "
                           "Free some space or choose another Install Folder.")
    return free


# ----------------------------------------------------------------------------- the environment

def env_dir(folder: Path) -> Path:
    return Path(folder) / ENV_NAME


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed_record(env: Path) -> dict | None:
    try:
        record = json.loads((env / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def environment_of(python: str | Path) -> Path | None:
    """The environment an interpreter belongs to, if Install Backend made it."""
    env = Path(python).parent.parent
    return env if (env / RECORD_NAME).is_file() else None


@dataclass
class EnvironmentStatus:
    state: str  # "missing", "incomplete" (an install that did not finish) or "installed"
    python: Path | None = None
    record: dict = field(default_factory=dict)
    bundled: str | None = None  # version of the wheel in this extension
    update: str = ""  # "": nothing to update; "same" or "newer": Update Backend applies

    def describe(self) -> str:
        if self.state == "missing":
            return "Not installed"
        if self.state == "incomplete":
            return "An install did not finish: Install Backend again, or Remove Backend"
        torch = self.record.get("torch", "?").upper()
        text = (f"Installed: backend {self.record.get('backend_version')} with {torch} "
                f"PyTorch, Python {self.record.get('python_version')}")
        return text + (f" (this add-on carries {self.bundled})" if self.update == "newer"
                       else "")


def environment_status(folder: Path, wheel_folder: Path = WHEEL_FOLDER) -> EnvironmentStatus:
    """What is in an install folder; cheap enough to call while drawing."""
    env = env_dir(folder)
    wheels = sorted(wheel_folder.glob(WHEEL_GLOB))
    bundled = wheel_version(wheels[0]) if len(wheels) == 1 else None
    record = installed_record(env)
    if record is None or not env_python(env).exists():
        return EnvironmentStatus("incomplete" if env.exists() else "missing", bundled=bundled)
    status = EnvironmentStatus("installed", env_python(env), record, bundled)
    if bundled is not None:
        installed = version_tuple(str(record.get("backend_version", "")))
        if version_tuple(bundled) > installed:
            status.update = "newer"
        elif version_tuple(bundled) == installed:
            status.update = "same"
    return status


def remove_environment(folder: Path) -> Path:
    """Delete `<folder>/env` (only a folder an install made: it holds pyvenv.cfg or the
    record, or the install log lies beside it)."""
    env = env_dir(folder)
    if not env.exists():
        raise InstallError("not_installed", f"No backend environment in {folder}.")
    ours = any((env / name).exists() for name in ("pyvenv.cfg", RECORD_NAME))
    if not ours and not (Path(folder) / LOG_NAME).exists():
        raise InstallError("not_ours", f"{env} was not made by Install Backend; not removing it.")
    shutil.rmtree(env)
    return env


# ----------------------------------------------------------------------------- commands

@dataclass
class Step:
    label: str
    argv: list[str]
    weight: float  # its share of the whole install's progress bar


@dataclass
class InstallPlan:
    folder: Path
    steps: list[Step]
    record: dict  # written to <env>/fourreal-install.json when every step succeeded
    needed_bytes: int

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_NAME


def pip_install(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--progress-bar", "raw", *args]


def install_steps(python: str, env: Path, wheel: Path, constraints: Path, variant: str,
                  index: str | None) -> list[Step]:
    """Create the environment, bring pip up to date, torch (from `index` when given), then the
    backend wheel with its dependencies under the tested pins."""
    venv_python = env_python(env)
    torch_args = [pinned_torch(constraints), *(["--index-url", index] if index else [])]
    return [
        Step("Creating the environment", [python, "-m", "venv", "--clear", str(env)], 0.04),
        Step("Updating pip", [str(venv_python), "-m", "pip", "install", "--no-input",
                              "--disable-pip-version-check", "--upgrade",
                              PIP_WITH_RAW_PROGRESS], 0.06),
        Step(f"Installing PyTorch ({variant.upper()})", pip_install(venv_python, *torch_args),
             0.6),
        Step("Installing the backend", pip_install(venv_python, str(wheel), "-c",
                                                   str(constraints)), 0.3),
    ]


def update_steps(env: Path, wheel: Path, constraints: Path) -> list[Step]:
    """Replace the backend package (same version or newer), then add what its dependencies
    now ask for; torch stays."""
    venv_python = env_python(env)
    return [
        Step("Replacing the backend", pip_install(venv_python, "--force-reinstall", "--no-deps",
                                                  str(wheel)), 0.4),
        Step("Checking its dependencies", pip_install(venv_python, str(wheel), "-c",
                                                      str(constraints)), 0.6),
    ]


def plan_install(folder: Path, python: PythonCandidate, variant: str, index_override: str = "",
                 wheel_folder: Path = WHEEL_FOLDER) -> InstallPlan:
    """Everything a fresh install runs; refuses (InstallError) before anything is written."""
    wheel, constraints = bundled_wheel(wheel_folder)
    needed = REQUIRED_BYTES[variant]
    check_disk_space(Path(folder), needed)
    index = torch_index(variant, override=index_override)
    steps = install_steps(python.path, env_dir(folder), wheel, constraints, variant, index)
    record = {"backend_version": wheel_version(wheel), "wheel": wheel.name, "torch": variant,
              "torch_index": index or "", "python": python.path,
              "python_version": ".".join(map(str, python.version))}
    return InstallPlan(Path(folder), steps, record, needed)


def plan_update(folder: Path, wheel_folder: Path = WHEEL_FOLDER) -> InstallPlan:
    """The update of an installed environment to the extension's wheel (same or newer)."""
    status = environment_status(folder, wheel_folder)
    if status.state != "installed":
        raise InstallError("not_installed", f"No installed backend in {folder}: press Install "
                           "Backend first.")
    wheel, constraints = bundled_wheel(wheel_folder)
    if not status.update:
        installed = status.record.get("backend_version")
        raise InstallError("older", f"The installed backend ({installed}) is newer than this "
                           f"add-on's ({wheel_version(wheel)}): install the "
                           "matching add-on, or Remove Backend and Install again.")
    check_disk_space(Path(folder), REQUIRED_BYTES["update"])
    record = dict(status.record, backend_version=wheel_version(wheel), wheel=wheel.name)
    return InstallPlan(Path(folder), update_steps(env_dir(folder), wheel, constraints), record,
                       REQUIRED_BYTES["update"])


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for pip and the probes: nothing of Blender's Python leaks in."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env
