#!/usr/bin/env python3
"""The project's one entry point.

    python3 build.py demo [ARGS...]   set up if needed, then generate a 4D asset from an animated
                                      Blender scene, headless, into out/demo/ (see `demo --help`)
    python3 build.py setup            create .venv/ and install the backend with its pinned deps
    python3 build.py test [ARGS...]   set up if needed, then run pytest (not slow, not gpu)
    python3 build.py serve [ARGS...]  run the backend server (see `serve --help`)
    python3 build.py bench NAME ...   run a benchmark (`bench --help` lists them)
    python3 build.py train [--nproc N] diffusion|recon ...   train a model (torchrun when N > 1)
    python3 build.py eval diffusion|recon|all ...            evaluate trained weights
    python3 build.py eval fit [--scenes DIR --preset P]      the fitting stage on Blender scenes
    python3 build.py addon            build the Blender extension zip dist/fourreal_4d-<version>.zip
    python3 build.py gpu-check --prepare | --out DIR | --dry-run --out DIR
                                      the GPU halves in one time-boxed run (no .venv needed)

Standard library only: it runs on a bare Python 3.11 and sets up everything else itself.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path, PurePosixPath

import tomllib

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CACHE = ROOT / ".cache"
STAMP = VENV / ".setup-stamp.json"

# bpy 5.0.1 is built for CPython 3.11 only, and pins numpy 1.26.4.
PYTHON_VERSION = (3, 11)
TORCH_VERSION = "2.13.0"
RUNTIME_REQUIREMENTS = [
    "numpy==1.26.4",
    "safetensors>=0.4",
    "pyzmq>=25",
    "imageio>=2.31",
    "imageio-ffmpeg>=0.5",
    "gsplat==1.5.3",
    "packaging",  # gsplat imports it without declaring it
    "numba==0.68.*",  # JIT for the CPU rasterizer: wheels, no compiler needed
]
DEV_REQUIREMENTS = [
    "bpy==5.0.1",
    "pytest>=8",
    "hypothesis>=6.100",
    "ruff>=0.6",
]


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def cuda_available() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tool_env() -> dict[str, str]:
    """Environment for every child process: all caches live in the repo's ignored .cache/."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "torchinductor"))
    env.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
    env.setdefault("XDG_CACHE_HOME", str(CACHE / "xdg"))
    env.setdefault("BLENDER_USER_RESOURCES", str(CACHE / "blender"))
    env.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(CACHE / "hypothesis"))
    env.setdefault("MPLCONFIGDIR", str(CACHE / "matplotlib"))
    env.setdefault("NUMBA_CACHE_DIR", str(CACHE / "numba"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def requirements(cuda: bool) -> list[str]:
    # Without CUDA the exact pin resolves to the CPU wheel this platform provides; with CUDA
    # any release from the pinned one up is accepted, so the package index's CUDA build is used.
    torch = f"torch>={TORCH_VERSION}" if cuda else f"torch=={TORCH_VERSION}"
    return [torch, *RUNTIME_REQUIREMENTS, *DEV_REQUIREMENTS]


def setup_fingerprint(reqs: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(reqs).encode())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()


def find_python(version: str) -> str | None:
    """A working interpreter for `version` ("3.11"): this one, one on PATH, or pyenv's."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    candidates = [shutil.which(f"python{version}"), shutil.which("python3")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/"
                                                          f"python{version}"))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return exe
    return None


def find_python311() -> str:
    exe = find_python(".".join(map(str, PYTHON_VERSION)))
    if exe is None:
        sys.exit("build.py: Python 3.11 is required (bpy 5.0.1 is built for CPython 3.11 only)")
    return exe


def cmd_setup(args: argparse.Namespace) -> int:
    cuda = bool(getattr(args, "cuda", False)) or cuda_available()
    reqs = requirements(cuda)
    fingerprint = setup_fingerprint(reqs)
    if STAMP.exists() and venv_python().exists():
        try:
            if json.loads(STAMP.read_text()).get("fingerprint") == fingerprint:
                log(".venv is up to date")
                return 0
        except (OSError, ValueError):
            pass
    if not venv_python().exists():
        py = find_python311()
        log(f"creating .venv with {py}")
        if py == sys.executable:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        else:
            subprocess.run([py, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check"]
    log(f"installing {' '.join(reqs)} (cuda={cuda})")
    subprocess.run([*pip, *reqs], check=True, env=tool_env())
    log("installing the backend package (editable)")
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                   check=True, env=tool_env())
    STAMP.write_text(json.dumps({"fingerprint": fingerprint, "requirements": reqs, "cuda": cuda}))
    log("setup done")
    return 0


def ensure_setup() -> None:
    rc = cmd_setup(argparse.Namespace(cuda=False))
    if rc:
        sys.exit(rc)


def run_in_venv(argv: list[str]) -> int:
    ensure_setup()
    return subprocess.run([str(venv_python()), *argv], cwd=ROOT, env=tool_env()).returncode


# Other Blender lines the add-on supports, each tested in its own virtual environment:
# {line: (python version, bpy requirement)}. 5.0 is the main .venv.
BLENDER_LINES = {"4.2": ("3.11", "bpy==4.2.*"), "5.2": ("3.13", "bpy==5.2.*")}
ADDON_TEST_GLOB = "tests/test_addon_*.py"


def pop_blender_option(extra: list[str]) -> tuple[list[str], list[str]]:
    """Take `--blender all|4.2|5.0|5.2[,..]` out of the pytest arguments."""
    lines, rest, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg == "--blender" or arg.startswith("--blender="):
            value = arg.split("=", 1)[1] if "=" in arg else extra[i + 1]
            i += 1 if "=" in arg else 2
            for line in value.split(","):
                lines += ["5.0", *BLENDER_LINES] if line == "all" else [line]
            continue
        rest.append(arg)
        i += 1
    unknown = sorted(set(lines) - {"5.0", *BLENDER_LINES})
    if unknown:
        sys.exit(f"build.py: unknown Blender line(s) {unknown}; choose from 5.0, "
                 f"{', '.join(BLENDER_LINES)} or all")
    return list(dict.fromkeys(lines)), rest


def blender_line_venv(line: str) -> Path:
    """Create (once) .venvs/bpyXY with that line's bpy, pyzmq and pytest; return its python."""
    py_version, bpy_req = BLENDER_LINES[line]
    folder = ROOT / ".venvs" / f"bpy{line.replace('.', '')}"
    python = folder / "bin" / "python"
    stamp = folder / ".setup-stamp"
    reqs = [bpy_req, "pyzmq>=25", "pytest>=8", "hypothesis>=6.100"]
    if python.exists() and stamp.exists() and stamp.read_text() == json.dumps(reqs):
        return python
    interpreter = find_python(py_version)
    if interpreter is None:
        sys.exit(f"build.py: Blender {line} needs Python {py_version}, which was not found "
                 "(on PATH or under ~/.pyenv/versions)")
    log(f"creating {folder.relative_to(ROOT)} for Blender {line} with {interpreter}")
    subprocess.run([interpreter, "-m", "venv", "--clear", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *reqs],
                   check=True, env=tool_env())
    stamp.write_text(json.dumps(reqs))
    return python


def cmd_test(args: argparse.Namespace, extra: list[str]) -> int:
    lines, extra = pop_blender_option(extra)
    argv = ["-m", "pytest"]  # paths default to pyproject testpaths
    if not any(a == "-m" or (a.startswith("-m") and len(a) > 2) for a in extra):
        argv += ["-m", "not slow and not gpu"]
    rc = run_in_venv(argv + extra)
    for line in lines:
        if line == "5.0":
            continue  # the default run above
        python = blender_line_venv(line)
        log(f"add-on tests against Blender {line} ({python})")
        tests = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(ADDON_TEST_GLOB))
        result = subprocess.run([str(python), "-m", "pytest", *tests, "-m",
                                 "not slow and not gpu", "-p", "no:cacheprovider"],
                                cwd=ROOT, env=tool_env())
        rc = rc or result.returncode
    return rc


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """The whole product headless in Blender; writes out/demo/ (extra args go to the demo)."""
    return run_in_venv(["-m", "backend.tools.demo", *extra])


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    return run_in_venv(["-m", "backend", "serve", *extra])


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """`train [--nproc N] diffusion|recon ...`: one process, or N under torchrun."""
    nproc = 1
    if extra[:1] == ["--nproc"] and len(extra) > 1:
        nproc, extra = int(extra[1]), extra[2:]
    if nproc > 1:
        return run_in_venv(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                            "-m", "backend.train", *extra])
    return run_in_venv(["-m", "backend.train", *extra])


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    if extra[:1] == ["fit"]:  # the fitting stage on open Blender scenes
        return run_in_venv(["-m", "backend.tools.fit_eval", *extra[1:]])
    return run_in_venv(["-m", "backend.train", "eval", *extra])


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    return run_in_venv(["-m", "backend.tools.bench", *extra])


def cmd_gpu_check(args: argparse.Namespace, extra: list[str]) -> int:
    """The GPU halves in one time-boxed run (backend/tools/gpu_check.py). On the GPU machine it
    runs under this interpreter (the machine's python3) and needs no .venv; `--dry-run` runs
    the same plan on the CPU in .venv."""
    if "--dry-run" in extra:
        return run_in_venv(["-m", "backend.tools.gpu_check", *extra])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-m", "backend.tools.gpu_check", *extra], cwd=ROOT,
                          env=env).returncode


# ----------------------------------------------------------------------------- addon

ADDON_SOURCE = ROOT / "blender_addon"
ADDON_PYZMQ = "27.3.0"
# (Python version, pip platform tag) per bundled wheel: Blender 4.2-5.0 embed Python 3.11,
# Blender 5.1+ Python 3.13; macOS wheels are universal2 (arm64 and x86_64 in one file).
ADDON_WHEEL_TARGETS = [
    (python, platform)
    for python in ("3.11", "3.13")
    for platform in ("manylinux_2_28_x86_64", "win_amd64", "macosx_11_0_arm64",
                     "macosx_10_15_x86_64")
]


def addon_shared_modules() -> tuple[str, ...]:
    """The backend modules the add-on vendors: `SHARED_MODULES` of blender_addon/vendor."""
    tree = ast.parse((ADDON_SOURCE / "vendor" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "SHARED_MODULES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    sys.exit("build.py addon: blender_addon/vendor/__init__.py defines no SHARED_MODULES")


def excluded_by(rel: PurePosixPath, is_dir: bool, patterns: list[str]) -> bool:
    """Whether the manifest's `[build] paths_exclude_pattern` (gitignore-style, as Blender's
    `extension build` reads it) excludes `rel` or one of its folders."""
    for pattern in patterns:
        dir_only = pattern.endswith("/")
        body = pattern.rstrip("/")
        anchored = "/" in body
        body = body.lstrip("/")
        for depth in range(1, len(rel.parts) + 1):
            part_is_dir = depth < len(rel.parts) or is_dir
            if dir_only and not part_is_dir:
                continue
            target = "/".join(rel.parts[:depth]) if anchored else rel.parts[depth - 1]
            if fnmatch.fnmatchcase(target, body):
                return True
    return False


def addon_files(patterns: list[str]) -> list[PurePosixPath]:
    """The add-on's files to package (relative paths), without what the manifest excludes."""
    files = []
    for path in sorted(ADDON_SOURCE.rglob("*")):
        rel = PurePosixPath(path.relative_to(ADDON_SOURCE).as_posix())
        if not path.is_dir() and not excluded_by(rel, False, patterns):
            files.append(rel)
    return files


def manifest_excludes(text: str) -> list[str]:
    try:
        return list(tomllib.loads(text)["build"]["paths_exclude_pattern"])
    except (KeyError, tomllib.TOMLDecodeError) as error:
        sys.exit(f"build.py addon: blender_manifest.toml needs [build] paths_exclude_pattern "
                 f"({error})")


def manifest_field(text: str, key: str) -> str:
    match = re.search(rf'^{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    if not match:
        sys.exit(f"build.py addon: blender_manifest.toml has no {key}")
    return match.group(1)


def pip_command() -> list[str]:
    for python in (sys.executable, str(venv_python())):
        if Path(python).exists() and subprocess.run(
                [python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    sys.exit("build.py addon: pip is needed to download the pyzmq wheels")


def download_addon_wheels(folder: Path, version: str) -> list[Path]:
    """pyzmq wheels for every (Python, platform) target, downloaded once into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    for python, platform in ADDON_WHEEL_TARGETS:
        cmd = [*pip_command(), "download", "--disable-pip-version-check", "--only-binary=:all:",
               "--no-deps", "--python-version", python, "--platform", platform,
               f"pyzmq=={version}", "-d", str(folder)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=tool_env())
        if out.returncode != 0:
            sys.exit(f"build.py addon: no pyzmq {version} wheel for Python {python} on "
                     f"{platform}:\n{out.stderr.strip()}")
        found = re.findall(r"(pyzmq-[^\s/\\]+\.whl)", out.stdout)
        if not found:
            sys.exit(f"build.py addon: could not tell which wheel pip chose:\n{out.stdout}")
        wheel = folder / found[-1]
        if wheel not in wheels:
            wheels.append(wheel)
        log(f"pyzmq for Python {python} on {platform}: {wheel.name}")
    return sorted(wheels)


def manifest_with_wheels(text: str, wheels: list[Path]) -> str:
    listing = "".join(f'  "./wheels/{w.name}",\n' for w in wheels)
    block = f"wheels = [\n{listing}]" if wheels else "wheels = []"
    new, count = re.subn(r"^wheels\s*=\s*\[[^\]]*\]", block, text, flags=re.MULTILINE)
    if count != 1:
        sys.exit("build.py addon: blender_manifest.toml needs exactly one `wheels = [...]`")
    return new


# The backend travels in the zip as a wheel for the add-on's Install Backend (never installed into
# Blender's own Python, so it is not in the manifest's `wheels`), with the pins `setup` tests.
ADDON_BACKEND_FOLDER = "backend_wheel"


def backend_constraints() -> list[str]:
    """pip constraints for the installer: torch and the runtime pins. numpy 1.26.4 is bpy's pin
    and has no wheels for Python 3.13+, where the backend takes any numpy its metadata allows."""
    pins = [f"torch=={TORCH_VERSION}", *RUNTIME_REQUIREMENTS]
    return [f'{pin}; python_version < "3.13"' if pin.startswith("numpy==") else pin
            for pin in pins]


def wheel_builder() -> tuple[list[str], list[str]]:
    """(pip command, extra options) to build the backend wheel: an interpreter with setuptools
    builds offline (--no-build-isolation), else pip fetches the build backend itself."""
    for python in (sys.executable, str(venv_python())):
        if Path(python).exists() and subprocess.run(
                [python, "-c", "import pip, setuptools"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"], ["--no-build-isolation", "--no-index"]
    return pip_command(), []


def build_backend_wheel(folder: Path) -> Path:
    """Build the backend package (what pyproject.toml installs, weights included) as a wheel
    into `folder`, from a copy of the sources so the checkout gets no build/ or egg-info."""
    pip, options = wheel_builder()
    with tempfile.TemporaryDirectory(prefix="fourreal-wheel-") as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "backend", source / "backend",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = subprocess.run([*pip, "wheel", "--disable-pip-version-check", "--no-deps",
                              *options, "-w", str(Path(tmp) / "out"), str(source)],
                             capture_output=True, text=True, env=tool_env())
        wheels = sorted((Path(tmp) / "out").glob("fourreal_backend-*.whl"))
        if out.returncode != 0 or len(wheels) != 1:
            sys.exit(f"build.py addon: building the backend wheel failed:\n"
                     f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def cmd_addon(args: argparse.Namespace, extra: list[str]) -> int:
    """Build dist/<id>-<version>.zip: the add-on's files less the manifest's exclusions, the
    backend modules it shares (into vendor/), pyzmq wheels for Linux, Windows and macOS, and
    the backend as a wheel with its pins (into backend_wheel/, for Install Backend)."""
    manifest = (ADDON_SOURCE / "blender_manifest.toml").read_text()
    addon_id, version = manifest_field(manifest, "id"), manifest_field(manifest, "version")
    patterns = manifest_excludes(manifest)
    shared = addon_shared_modules()
    wheels = [] if args.no_wheels else download_addon_wheels(
        Path(args.wheel_cache), args.pyzmq)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{addon_id}-{version}.zip"
    wheel_folder = tempfile.TemporaryDirectory(prefix="fourreal-backend-wheel-")
    backend_wheel = build_backend_wheel(Path(wheel_folder.name))
    with wheel_folder, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in addon_files(patterns):
            if rel.as_posix() == "blender_manifest.toml":
                archive.writestr(rel.as_posix(), manifest_with_wheels(manifest, wheels))
            elif not (rel.parent.as_posix() == "vendor" and rel.stem in shared):
                archive.write(ADDON_SOURCE / rel, rel.as_posix())
        for name in shared:
            archive.write(ROOT / "backend" / f"{name}.py", f"vendor/{name}.py")
        for wheel in wheels:
            archive.write(wheel, f"wheels/{wheel.name}")
        archive.write(backend_wheel, f"{ADDON_BACKEND_FOLDER}/{backend_wheel.name}",
                      zipfile.ZIP_STORED)  # already compressed
        archive.writestr(f"{ADDON_BACKEND_FOLDER}/constraints.txt",
                         "\n".join(backend_constraints()) + "\n")
    log(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {len(wheels)} wheels, "
        f"backend {backend_wheel.name}, shared backend modules {', '.join(shared)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="create .venv and install everything")
    p_setup.add_argument("--cuda", action="store_true",
                         help="install the CUDA build of torch even if nvidia-smi is not found")
    sub.add_parser("demo", help="generate a 4D asset from an animated Blender scene, headless, "
                   "into out/demo/ (extra args go to the demo, e.g. --frames 8)", add_help=False)
    sub.add_parser("test", help="run the tests (extra args go to pytest; --blender all also "
                   "runs the add-on tests against Blender 4.2 and 5.2)", add_help=False)
    sub.add_parser("serve", help="run the backend server (extra args go to the server)",
                   add_help=False)
    sub.add_parser("train", help="train a model: train [--nproc N] diffusion|recon [options]",
                   add_help=False)
    sub.add_parser("eval", help="evaluate: eval diffusion|recon|all --weights DIR ...",
                   add_help=False)
    sub.add_parser("bench", help="run a benchmark: bench transfer [--json PATH]", add_help=False)
    sub.add_parser("gpu-check", help="the GPU halves in one prepared run: gpu-check --prepare "
                   "(here, downloads wheels), gpu-check --out DIR (on a bare CUDA machine), "
                   "gpu-check --dry-run --out DIR (the plan on the CPU)", add_help=False)
    p_addon = sub.add_parser("addon", help="build the Blender extension zip into dist/")
    p_addon.add_argument("--output", default=str(ROOT / "dist"), help="folder for the zip")
    p_addon.add_argument("--pyzmq", default=ADDON_PYZMQ, help="pyzmq version to bundle")
    p_addon.add_argument("--wheel-cache", default=str(CACHE / "addon-wheels"),
                         help="where downloaded wheels are kept between builds")
    p_addon.add_argument("--no-wheels", action="store_true",
                         help="bundle no wheels (for a Blender that already has pyzmq)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "addon":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return cmd_addon(args, extra)
    if args.command == "setup":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return cmd_setup(args)
    handler = {"demo": cmd_demo, "test": cmd_test, "serve": cmd_serve, "bench": cmd_bench,
               "train": cmd_train, "eval": cmd_eval, "gpu-check": cmd_gpu_check}[args.command]
    return handler(args, extra)


if __name__ == "__main__":
    sys.exit(main())
