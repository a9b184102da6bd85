"""The GPU check: every GPU half of the project in one prepared, time-boxed run.

    python3 build.py gpu-check --prepare            # here, with network: the wheels
    python3 build.py gpu-check --out DIR            # on a bare CUDA machine, no network
    python3 build.py gpu-check --dry-run --out DIR  # the same plan on the CPU, tiny sizes

The bare machine's `python3` has torch, safetensors, numpy and imageio; everything else the
plan imports (gsplat, pyzmq, numba, pytest, ...) travels as cp312 manylinux wheels in
.cache/gpu-wheels/ (made by --prepare), installed with pip --no-index into .cache/gpu-site/
(no .venv). Each part runs as a subprocess with a hard timeout inside a total budget, and
DIR/gpu_check.json (statuses, figures) and DIR/gpu_check.log are rewritten after each part;
part logs go to DIR/logs/, part outputs to DIR/parts/, exported weights to DIR/export/.
Figures are only what the parts wrote: a part that did not finish has none.
Standard library only at import: the run needs nothing but the machine's python3.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
WHEELS = CACHE / "gpu-wheels"
SITE = CACHE / "gpu-site"
SCRATCH = CACHE / "gpu-check"  # training runs (checkpoints stay out of DIR)
TOTAL_BUDGET_S = 480.0
RESERVE_S = 5.0  # kept back from the total for the last write
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What the bare machine's python3 already has (torch with its own dependencies).
BARE_MACHINE_HAS = {"torch", "numpy", "safetensors", "imageio", "pillow", "typing-extensions",
                    "filelock", "sympy", "networkx", "jinja2", "fsspec", "setuptools", "triton",
                    "markupsafe", "mpmath"}
DEV_FOR_GPU = ("pytest", "hypothesis")  # the gpu tests run under pytest
# Left out of --prepare by default: no part writes movies (imageio's ffmpeg plugin, 65 MiB).
SKIP_BY_DEFAULT = ("imageio-ffmpeg",)
# A GPU machine whose image already holds these (the device lab's does, see the README) needs
# only `--prepare --machine-has-numba`: then the wheels fit a 64 MiB transfer.
NUMBA_STACK = ("numba", "llvmlite", "pytest", "hypothesis", "jaxtyping", "rich", "ninja",
               "packaging", "pygments", "markdown-it-py", "mdurl", "pluggy", "iniconfig",
               "sortedcontainers", "wadler-lindig")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements() -> list[str]:
    """build.py's pinned runtime requirements the bare machine lacks, and pytest/hypothesis."""
    tree = ast.parse((ROOT / "build.py").read_text())
    found: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                node.targets[0].id in ("RUNTIME_REQUIREMENTS", "DEV_REQUIREMENTS"):
            found[node.targets[0].id] = list(ast.literal_eval(node.value))
    dev = [r for r in found.get("DEV_REQUIREMENTS", []) if normalise(
        re.split(r"[<>=!~ ;\[]", r)[0]) in DEV_FOR_GPU]
    return [r for r in found.get("RUNTIME_REQUIREMENTS", []) + dev
            if normalise(re.split(r"[<>=!~ ;\[]", r)[0]) not in BARE_MACHINE_HAS]


def wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


def _marker_applies(marker: str) -> bool:
    """A Requires-Dist marker on the target (Python 3.12 on Linux); extras never apply."""
    if "extra" in marker:
        return False
    target = tuple(int(n) for n in TARGET_PYTHON.split("."))
    for op, version in re.findall(r"python_version\s*(<=|>=|==|!=|<|>)\s*['\"]([\d.]+)['\"]",
                                  marker):
        other = tuple(int(n) for n in version.split("."))
        if not {"<": target < other, "<=": target <= other, ">": target > other,
                ">=": target >= other, "==": target == other, "!=": target != other}[op]:
            return False
    return not re.search(r"sys_platform\s*==\s*['\"](win32|darwin)['\"]", marker)


def missing_requirements(wheels: list[Path]) -> list[str]:
    """Names the wheels require that neither they nor the bare machine provide."""
    provided = {wheel_name(w) for w in wheels} | BARE_MACHINE_HAS
    missing = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(metadata).decode("utf-8", "replace")
        for line in re.findall(r"^Requires-Dist:\s*(.+)$", text, re.MULTILINE):
            requirement, _, marker = line.partition(";")
            name = normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))
            if name not in provided and _marker_applies(marker):
                missing.add(name)
    return sorted(missing)


def pip_command() -> list[str]:
    for python in (sys.executable, str(ROOT / ".venv" / "bin" / "python")):
        if Path(python).exists() and subprocess.run(
                [python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip", "--disable-pip-version-check"]
    raise SystemExit("gpu_check: pip is needed (this python or .venv's)")


def _requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[<>=!~ ;\[]", requirement)[0])


def prepare(folder: Path = WHEELS, skip: tuple[str, ...] = SKIP_BY_DEFAULT) -> int:
    """Download the cp312 manylinux wheels the bare machine needs, closing over their
    dependencies (what the bare machine already has, and `skip`, excepted)."""
    skipped = {normalise(name) for name in skip}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    platform = [arg for p in TARGET_PLATFORMS for arg in ("--platform", p)]
    wanted = [r for r in wheel_requirements() if _requirement_name(r) not in skipped]
    for _ in range(6):
        print(f"gpu_check: downloading {' '.join(wanted)}", flush=True)
        subprocess.run([*pip_command(), "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", TARGET_PYTHON, "--implementation", "cp", *platform,
                        "-d", str(folder), *wanted], check=True)
        wanted = [r for r in missing_requirements(sorted(folder.glob("*.whl")))
                  if r not in skipped]
        if not wanted:
            break
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"  {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)")
    missing = [r for r in missing_requirements(wheels) if r not in skipped]
    print(f"gpu_check: {len(wheels)} wheels, {size:.1f} MiB in {folder}; still missing: "
          f"{missing or 'nothing'}; left out (the machine must have them or not need them): "
          f"{', '.join(sorted(skipped)) or 'nothing'}")
    return 0


# ----------------------------------------------------------------------------- the plan


@dataclass
class Part:
    """One step of the plan: a python command line (after the interpreter), its budget, and
    how its figures are read from the files it wrote under DIR/parts/."""

    name: str
    argv: list[str]
    budget_s: float
    figures: Callable[[Path, str], dict]  # (DIR/parts, part name) -> figures
    background: bool = False  # start it and go on; parts naming it in `after` wait for it
    after: tuple[str, ...] = ()
    min_s: float = 10.0  # skipped when less than this is left
    soft_stop_margin_s: float | None = None  # training: --max-minutes = timeout - margin

    def with_time(self, timeout: float) -> Part:
        if self.soft_stop_margin_s is None:
            return self
        minutes = max(0.05, (timeout - self.soft_stop_margin_s) / 60)
        return replace(self, argv=[*self.argv, "--max-minutes", f"{minutes:.2f}"])


def _read_json(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def attention_figures(folder: Path, name: str) -> dict:
    report = _read_json(folder, name)
    keys = ("views", "steps", "tokens_per_frame", "tokens", "times_s", "peak_memory_bytes",
            "fastest_exact", "speedup_vs_full", "ideal_speedup", "fraction_of_ideal",
            "paired_fraction_of_ideal", "max_abs_err", "notes")
    return {"device": report["device"], "torch": report["torch"],
            "shapes": [{k: r.get(k) for k in keys} for r in report["results"]]}


def render_figures(folder: Path, name: str) -> dict:
    report = _read_json(folder, name)
    return {"device": report["device"], "repeats": report["repeats"], "cases": report["cases"]}


def pytest_figures(folder: Path, name: str) -> dict:
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(folder / f"{name}.xml").getroot()
    cases = root.iter("testcase")
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        label = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find(
            "error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[:1]
            outcome["failed"].append(f"{label}: {message[0] if message else ''}"[:300])
        elif case.find("skipped") is not None:
            outcome["skipped"].append(f"{label}: {case.find('skipped').get('message', '')}")
        else:
            outcome["passed"].append(label)
    return {"counts": {k: len(v) for k, v in outcome.items()}, **outcome}


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text())


SIZES = {  # part -> (GPU arguments, dry-run arguments)
    "attention_8x16x256": (["--device", "cuda", "--shape", "8x16x256", "--repeats", "5"],
                           ["--device", "cpu", "--shape", "2x2x8", "--repeats", "1",
                            "--only", "decomposed,merged,decomposed_fwd_bwd,flex_fwd_bwd"]),
    "attention_8x16x2304": (["--device", "cuda", "--shape", "8x16x2304", "--repeats", "3",
                             "--only", "flex,flex_fwd_bwd,decomposed,decomposed_fwd_bwd"],
                            ["--device", "cpu", "--shape", "2x3x8", "--repeats", "1",
                             "--only", "decomposed,decomposed_fwd_bwd,flex_fwd_bwd"]),
    "render": (["--impl", "cpu", "gsplat", "--parity", "--repeats", "3", "--torch-threads", "0",
                "--only", "64px_16k", "128px_50k", "256px_100k", "64cams_128px_50k"],
               ["--impl", "cpu", "torch", "--parity", "--repeats", "1", "--case", "24x500"]),
    "fit": (["--device", "cuda", "--views", "8", "--timesteps", "8", "--size", "128"],
            ["--device", "cpu", "--views", "2", "--timesteps", "2", "--size", "24",
             "--preset", "fast"]),
    "gsplat_build": (["--backend", "gsplat"], ["--backend", "cpu"]),
}
_TINY_TRAIN = ["--device", "cpu", "--steps", "2", "--batch-size", "1", "--set", "log_every=1",
               "--set", "use_pool=false"]
_GPU_TRAIN = ["--device", "cuda", "--set", "log_every=5", "--set", "use_pool=true",
              "--set", f"pool.render_workers={max(1, min(8, (os.cpu_count() or 2) - 2))}"]
TRAIN_SIZES = {
    "train_diffusion_small": (
        ["diffusion", "--preset", "small", "--steps", "40", "--batch-size", "4", *_GPU_TRAIN,
         "--set", "pool.num_samples=32", "--set", "data.height=128", "--set", "data.width=128"],
        ["diffusion", "--preset", "small", *_TINY_TRAIN, "--set", "model_overrides.width=32",
         "--set", "model_overrides.depth=1", "--set", "model_overrides.num_heads=2",
         "--set", "data.height=16", "--set", "data.width=16", "--set", "data.num_views=2",
         "--set", "data.num_steps=2"]),
    "train_recon_small": (
        ["recon", "--preset", "small", "--steps", "30", "--batch-size", "2", *_GPU_TRAIN,
         "--set", "pool.num_samples=16", "--set", "data.height=128", "--set", "data.width=128"],
        ["recon", "--preset", "small", *_TINY_TRAIN, "--set", "model_overrides.width=32",
         "--set", "model_overrides.depth=1", "--set", "model_overrides.num_heads=2",
         "--set", "model_overrides.head_features=8", "--set", "model_overrides.dense_layers="
         "[0,0,0,0]", "--set", "data.height=16", "--set", "data.width=16",
         "--set", "data.num_views=3", "--set", "data.num_steps=2", "--set", "input_views=2",
         "--set", "target_timesteps=0"]),
    "continue_diffusion_tiny": (
        ["diffusion", "--steps", "100000", "--device", "cuda", "--num-workers",
         str(max(0, min(8, (os.cpu_count() or 2) - 2)))], ["diffusion", *_TINY_TRAIN]),
    "continue_recon_tiny": (
        ["recon", "--steps", "100000", "--device", "cuda", "--num-workers",
         str(max(0, min(8, (os.cpu_count() or 2) - 2)))], ["recon", *_TINY_TRAIN]),
}
ONLY: list[str] = []  # --part: run only these


def plan(out: Path, scratch: Path, dry_run: bool) -> list[Part]:
    """The parts in priority order; budgets are ceilings, the total budget clips them."""
    parts_dir = out / "parts"
    pick = 1 if dry_run else 0

    def json_flag(name: str) -> list[str]:
        return ["--json", str(parts_dir / f"{name}.json")]

    def bench(name: str, kind: str, budget: float, after: tuple[str, ...] = (),
              figures=_read_json) -> Part:
        return Part(name, ["-m", "backend.tools.bench", kind, *SIZES[name][pick],
                           *json_flag(name)], budget, figures, after=after)

    def train(name: str, budget: float, after: tuple[str, ...] = (), weights: str = "",
              min_s: float = 10.0) -> Part:
        extra = ["--from-weights", weights, "--export", str(out / "export" / weights)] \
            if weights else []
        argv = ["-m", "backend.tools.gpu_check", "train", *json_flag(name), "--train-dir",
                str(scratch / name), *extra, "--", *TRAIN_SIZES[name][pick]]
        return Part(name, argv, budget, _read_json, after=after, min_s=min_s,
                    soft_stop_margin_s=45.0 if weights else 30.0)

    gsplat = ("gsplat_build",)
    parts = [
        Part("environment", ["-m", "backend.tools.gpu_check", "environment",
                             *json_flag("environment")], 30, _read_json, min_s=5),
        Part("gsplat_build", ["-m", "backend.tools.gpu_check", "gsplat-build",
                              *SIZES["gsplat_build"][pick], *json_flag("gsplat_build")],
             300, _read_json, background=True),
        bench("attention_8x16x256", "attention", 45, figures=attention_figures),
        bench("attention_8x16x2304", "attention", 75, figures=attention_figures),
        train("train_diffusion_small", 75),
        Part("gpu_tests", ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={parts_dir / 'gpu_tests.xml'}", *gpu_test_files()],
             100, pytest_figures, after=gsplat),
        bench("render", "render", 50, gsplat, figures=render_figures),
        bench("fit", "fit", 60, gsplat),
        train("train_recon_small", 75, gsplat),
        train("continue_diffusion_tiny", 120, weights="diffusion-tiny", min_s=60),
        train("continue_recon_tiny", 120, gsplat, weights="recon-tiny", min_s=60),
    ]
    return [p for p in parts if not ONLY or p.name in ONLY or p.name == "environment"]


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """State of one gpu-check run: where it writes, its clock and its report."""

    out: Path
    dry_run: bool
    budget_s: float
    python: str = sys.executable
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)
    plan: list[Part] = field(default_factory=list)
    background: dict = field(default_factory=dict)  # part name -> (Popen, deadline, started)

    def left(self) -> float:
        return self.budget_s - RESERVE_S - (time.monotonic() - self.started)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        with (self.out / "gpu_check.log").open("a") as handle:
            handle.write(line + "\n")

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        target = self.out / "gpu_check.json"
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        temporary.replace(target)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var, sub in [("TORCHINDUCTOR_CACHE_DIR", "torchinductor"), ("TRITON_CACHE_DIR",
                         "triton"), ("XDG_CACHE_HOME", "xdg"), ("NUMBA_CACHE_DIR", "numba"),
                         ("HYPOTHESIS_STORAGE_DIRECTORY", "hypothesis"),
                         ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
                         ("MPLCONFIGDIR", "matplotlib")]:
            env.setdefault(var, str(CACHE / sub))
        env.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 2) - 2)))  # gsplat's build
        paths = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() and not self.dry_run else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        if (SITE / "bin").is_dir() and not self.dry_run:
            env["PATH"] = os.pathsep.join([str(SITE / "bin"), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        return env


def _stop(process: subprocess.Popen) -> None:
    """End a part and the processes it started (its own session), gently then not."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _launch(run: Run, part: Part) -> subprocess.Popen:
    log = (run.out / "logs" / f"{part.name}.log").open("w")
    command = [run.python, *part.argv]
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    process = subprocess.Popen(command, cwd=ROOT, env=run.env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return process


def _finish(run: Run, part: Part, process: subprocess.Popen, deadline: float,
            started: float) -> None:
    """Wait for a launched part until its deadline, then record its status and figures."""
    entry = run.report["parts"][part.name]
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        entry["returncode"] = process.returncode
        entry["status"] = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(process)
        entry["status"] = "timeout"
        entry["reason"] = f"stopped after {entry['timeout_s']:.0f} s"
    entry["seconds"] = round(time.monotonic() - started, 1)
    try:  # what the part wrote, also when it failed (failing tests are figures too)
        entry["figures"] = part.figures(run.out / "parts", part.name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        entry["figures"] = {}
        if entry["status"] == "ok":
            entry["status"], entry["reason"] = "failed", f"reading its figures: {error!r}"
    if entry["status"] != "ok" and not entry.get("reason"):
        entry["reason"] = _last_line(run.out / "logs" / f"{part.name}.log")
    run.log(f"{part.name}: {entry['status']} in {entry['seconds']} s"
            + (f" ({entry['reason']})" if entry.get("reason") else ""))
    run.write()


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"


def _skip(run: Run, part: Part, reason: str) -> None:
    run.report["parts"][part.name].update(status="skipped", reason=reason)
    run.log(f"{part.name}: skipped ({reason})")
    run.write()


def run_part(run: Run, part: Part, cuda: bool) -> None:
    """Run one part (or start it in the background) within its budget and the time left."""
    if not (cuda or run.dry_run or part.name == "environment"):
        return _skip(run, part, "CUDA is not available (see environment)")
    for name in part.after:  # a background part this one needs: wait for it, within budget
        if name in run.background:
            _finish(run, part_by_name(run, name), *run.background.pop(name))
    timeout = min(part.budget_s, run.left())
    if timeout < part.min_s:
        return _skip(run, part, f"no time left ({max(0, run.left()):.0f} s of the total)")
    entry = run.report["parts"][part.name]
    entry.update(status="running", timeout_s=round(timeout, 1))
    run.write()
    started = time.monotonic()
    process = _launch(run, part.with_time(timeout))
    run.log(f"{part.name}: started (budget {timeout:.0f} s)")
    if part.background:
        run.background[part.name] = (process, started + timeout, started)
        return None
    return _finish(run, part, process, started + timeout, started)


def part_by_name(run: Run, name: str) -> Part:
    return next(p for p in run.plan if p.name == name)


def install(run: Run) -> None:
    """Install the prepared wheels into SITE (pip --no-index; unzipped if pip is missing);
    in a dry run, only check the set is complete."""
    entry = run.report["parts"]["install"]
    started = time.monotonic()
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        entry.update(status="skipped" if run.dry_run else "failed",
                     reason=f"no wheels in {WHEELS} (run `python3 build.py gpu-check "
                            f"--prepare` where there is network, and carry that folder)")
    else:
        figures = {"wheels": [w.name for w in wheels], "missing": missing_requirements(wheels),
                   "site": str(SITE)}
        entry.update(status="ok", figures=figures)
        if run.dry_run:
            figures["method"] = "dry run: dependency closure checked, nothing installed"
        else:
            _install_wheels(run, entry, wheels)
    entry["seconds"] = round(time.monotonic() - started, 1)
    run.log(f"install: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason")
                                             else ""))
    run.write()


def _install_wheels(run: Run, entry: dict, wheels: list[Path]) -> None:
    stamp = SITE / ".wheels.json"
    names = [w.name for w in wheels]
    if stamp.exists() and json.loads(stamp.read_text()) == names:
        entry["figures"]["method"] = "already installed"
        return
    shutil.rmtree(SITE, ignore_errors=True)
    pip = [run.python, "-m", "pip", "--disable-pip-version-check"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode == 0:
        command = [*pip, "install", "--no-index", "--find-links", str(WHEELS), "--no-deps",
                   "--target", str(SITE), *map(str, wheels)]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=min(120.0, run.left()))
        except subprocess.TimeoutExpired:
            entry.update(status="timeout", reason="pip install ran past its budget")
            return
        (run.out / "logs" / "install.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            entry.update(status="failed", reason=_last_line(run.out / "logs" / "install.log"))
            return
        entry["figures"]["method"] = "pip install --no-index --no-deps --target"
    else:
        SITE.mkdir(parents=True)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(SITE)
        entry["figures"]["method"] = "unzipped (no pip on this python)"
    stamp.write_text(json.dumps(names))


def cuda_available(run: Run) -> bool:
    env_figures = run.report["parts"].get("environment", {}).get("figures", {})
    return bool(env_figures.get("cuda_available")) and not run.dry_run


def execute(run: Run) -> int:
    (run.out / "logs").mkdir(parents=True, exist_ok=True)
    (run.out / "parts").mkdir(parents=True, exist_ok=True)
    (run.out / "gpu_check.log").write_text("")
    run.plan = plan(run.out, SCRATCH, run.dry_run)
    run.report.update(command=["gpu-check", *sys.argv[1:]], dry_run=run.dry_run,
                      device="cpu" if run.dry_run else "cuda", budget_s=run.budget_s,
                      python=run.python, finished=False,
                      parts={"install": {"status": "pending", "figures": {}}})
    for part in run.plan:
        run.report["parts"][part.name] = {"status": "pending", "budget_s": part.budget_s,
                                          "figures": {}, "command": part.argv}
    run.log(f"gpu-check {'dry run on the CPU' if run.dry_run else 'on CUDA'}, "
            f"budget {run.budget_s:.0f} s, out {run.out}")
    install(run)
    for part in run.plan:
        run_part(run, part, cuda_available(run))
    for name in list(run.background):
        _finish(run, part_by_name(run, name), *run.background.pop(name))
    run.report["finished"] = True
    run.log("done")
    run.write()
    return 0


# ----------------------------------------------------------------------------- part commands
# `python -m backend.tools.gpu_check environment|gsplat-build|train ...`: run by the plan in
# their own processes (the machine's python3, PYTHONPATH with the wheels' folder).


def _version_of(module: str) -> dict:
    import importlib

    try:
        imported = importlib.import_module(module)
    except Exception as error:  # a broken wheel is a finding, not a crash
        return {"importable": False, "error": repr(error)[:300]}
    location = str(Path(getattr(imported, "__file__", "") or "").resolve())
    return {"importable": True, "version": str(getattr(imported, "__version__", "?")),
            "from_gpu_site": location.startswith(str(SITE))}


def _tool_output(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines else None


def environment_command(argv: list[str]) -> int:
    """What the machine is: python, torch/CUDA, the GPU, the tools and the modules."""
    parser = argparse.ArgumentParser(prog="gpu_check environment")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    import platform

    import torch

    cuda = torch.cuda.is_available()
    facts = {"python": sys.version.split()[0], "executable": sys.executable,
             "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": cuda, "nvcc": _tool_output(["nvcc", "--version"]),
             "ninja": _tool_output(["ninja", "--version"]),
             "nvidia_smi": _tool_output(["nvidia-smi", "--query-gpu=name,driver_version,"
                                         "memory.total", "--format=csv,noheader"])}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     gpu_memory_bytes=props.total_memory, gpus=torch.cuda.device_count())
    facts["modules"] = {name: _version_of(name) for name in (
        "numpy", "safetensors", "imageio", "gsplat", "numba", "zmq", "pytest", "hypothesis",
        "packaging", "jaxtyping", "rich")}
    args.json.write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
    return 0


def gsplat_build_command(argv: list[str]) -> int:
    """Render a small scene twice with one backend; with gsplat the first call builds its CUDA
    kernels (into TORCH_EXTENSIONS_DIR), so the later parts find them built."""
    parser = argparse.ArgumentParser(prog="gpu_check gsplat-build")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--backend", choices=("gsplat", "cpu"), default="gsplat")
    args = parser.parse_args(argv)
    import torch

    from backend.render import rasterize
    from backend.tools.bench.render import GAUSSIAN_KEYS, RenderBenchCase, make_scene

    device = torch.device("cuda" if args.backend == "gsplat" else "cpu")
    scene = {k: v.to(device) for k, v in make_scene(RenderBenchCase("w", 64, 2000)).items()}
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        out = rasterize(*(scene[k] for k in GAUSSIAN_KEYS), scene["viewmats"], scene["Ks"],
                        64, 64, backend=args.backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(round(time.perf_counter() - started, 3))
    figures = {"backend": args.backend, "first_call_s": seconds[0], "second_call_s": seconds[1],
               "mean_alpha": float(out.alpha.mean())}
    if args.backend == "gsplat":
        import gsplat

        figures["gsplat"] = gsplat.__version__
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


def _continued_config(weights: str, folder: Path) -> Path:
    """The shipped model's own training config (training.json), for a new sitting here."""
    config = json.loads((ROOT / "backend" / "weights" / weights / "training.json").read_text())
    config = dict(config["train_config"], use_pool=False, max_minutes=None, resume="none",
                  checkpoint_every=10**6, keep_checkpoints=1, init_weights=None)
    path = folder / "continued_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _training_figures(folder: Path) -> dict:
    """Loss and throughput from the run's log.jsonl (the first window holds the warm-up)."""
    log = folder / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()
               if line.strip()] if log.exists() else []
    start = next((r for r in records if r.get("event") == "start"), {})
    windows = [r for r in records if "loss" in r and "step" in r]
    if not windows:
        return {"steps_done": 0, "parameters": start.get("parameters")}
    rates = [r["samples_per_s"] for r in windows]
    steady = sorted(rates[1:]) or rates
    return {"steps_done": windows[-1]["step"], "parameters": start.get("parameters"),
            "initialised_from": start.get("initialised_from"),
            "loss_first_window": windows[0]["loss"], "loss_last_window": windows[-1]["loss"],
            "loss_curve": [[r["step"], r["loss"]] for r in windows],
            "samples_per_s_windows": rates,
            "samples_per_s_median_after_first_window": steady[len(steady) // 2],
            "train_seconds": windows[-1].get("elapsed_s")}


def _device_of(train_args: list[str]) -> str | None:
    flags = [i for i, arg in enumerate(train_args[:-1]) if arg == "--device"]
    return train_args[flags[-1] + 1] if flags else None


def train_command(argv: list[str]) -> int:
    """`train --json F --train-dir D [--from-weights NAME --export E] -- ARGS`: one training
    run in this process (backend.train's command line), then its figures and peak memory."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="gpu_check train")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--from-weights", help="a shipped model: continue its training")
    parser.add_argument("--export", type=Path, help="export the result here (float16)")
    args, train_args = parser.parse_args(argv[:split]), argv[split + 1:]
    import resource

    import torch

    from backend.train.__main__ import main as train_main

    shutil.rmtree(args.train_dir, ignore_errors=True)
    args.train_dir.mkdir(parents=True)
    if args.from_weights:
        config = _continued_config(args.from_weights, args.train_dir)
        train_args = [*train_args, "--config", str(config), "--set",
                      f"init_weights={ROOT / 'backend' / 'weights' / args.from_weights}"]
    train_args += ["--output-dir", str(args.train_dir), "--resume", "none"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    returncode = train_main(train_args)
    figures = {"returncode": returncode, "arguments": train_args,
               "wall_seconds": round(time.perf_counter() - started, 1),
               "precision": "bf16 autocast" if _device_of(train_args) == "cuda" else "float32",
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        figures["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
        figures["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
    figures.update(_training_figures(args.train_dir))
    if args.from_weights:
        shipped = json.loads((ROOT / "backend" / "weights" / args.from_weights /
                              "training.json").read_text())
        figures["shipped_loss_last_windows_mean"] = shipped.get("loss_last_windows_mean")
    if args.export and returncode == 0:
        returncode = train_main(["export", "--weights", str(args.train_dir / "model"),
                                 "--output", str(args.export), "--dtype", "float16"])
        figures["exported_to"] = str(args.export) if returncode == 0 else None
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return returncode


PART_COMMANDS = {"environment": environment_command, "gsplat-build": gsplat_build_command,
                 "train": train_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PART_COMMANDS:
        return PART_COMMANDS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="build.py gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, the log, part "
                        "outputs and exported weights")
    parser.add_argument("--prepare", action="store_true",
                        help=f"download the wheels into {WHEELS.relative_to(ROOT)} and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same plan on the CPU with tiny sizes (installs nothing)")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S,
                        help="total seconds for the run (default %(default)s)")
    parser.add_argument("--part", action="append", metavar="NAME",
                        help="run only these parts (repeatable)")
    parser.add_argument("--skip", action="append", metavar="NAME", default=None,
                        help="with --prepare: a package the GPU machine has or the run does "
                        f"not need (repeatable; default: {', '.join(SKIP_BY_DEFAULT)})")
    parser.add_argument("--machine-has-numba", action="store_true",
                        help="with --prepare: the machine's image holds numba, pytest and "
                        "their dependencies (as the device lab's does): carry only gsplat, "
                        "pyzmq and what they need, under 64 MiB")
    args = parser.parse_args(argv)
    if args.prepare:
        skip = tuple(args.skip if args.skip is not None else SKIP_BY_DEFAULT)
        return prepare(skip=skip + (NUMBA_STACK if args.machine_has_numba else ()))
    if args.out is None:
        parser.error("--out DIR is needed (or --prepare)")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(out=args.out.resolve(), dry_run=args.dry_run, budget_s=args.budget_s)
    ONLY[:] = args.part or []
    return execute(run)


if __name__ == "__main__":
    sys.exit(main())
