"""The local backend as a child process: `python -m backend serve` on a port the backend
picks itself (address tcp://127.0.0.1:0), read back from its ready file, run by the environment
Install Backend made or by a checkout's .venv. Every process started here is stopped when
Blender exits."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .installer import CACHE_NAME, environment_of

_RUNNING: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


class BackendStartError(RuntimeError):
    """The local backend could not be started or exited before it was ready."""


def default_repo() -> Path | None:
    """The repository this add-on sits in, when it is run from a checkout (the folder above
    the add-on that holds the `backend` package); None for an installed extension."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "backend" / "__init__.py").is_file() else None


def default_python(repo: Path | None = None) -> Path | None:
    """The repository's virtual environment interpreter, if there is one."""
    repo = repo or default_repo()
    if repo is None:
        return None
    exe = repo / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    return exe if exe.exists() else None


@dataclass
class LocalBackendConfig:
    """How to start the local backend: an environment made by Install Backend (`python` set,
    `repo` empty), or a checkout (`repo` and its .venv, the developers' way)."""

    python: str = ""  # interpreter with the backend's dependencies; "" = the repo's .venv
    repo: str = ""  # folder holding the `backend` package; "" = the repo around the add-on
    cache_dir: str = ""  # result cache; "" = <repo>/.cache/results or <install folder>/cache
    device: str = "auto"
    extra_args: list[str] = field(default_factory=list)

    def resolved(self) -> tuple[Path, Path | None, Path]:
        """(python, repo, cache_dir) with defaults filled in; repo is None for an installed
        environment (the backend is a package in it). ValueError says what is missing."""
        env = environment_of(self.python) if self.python and not self.repo else None
        if env is not None and Path(self.python).exists():
            cache = Path(self.cache_dir) if self.cache_dir else env.parent / CACHE_NAME
            return Path(self.python), None, cache
        repo = Path(self.repo) if self.repo else default_repo()
        if repo is None and not self.python:
            raise ValueError("the backend is not installed: press Install Backend in the "
                             "add-on's preferences (Edit > Preferences > Add-ons > 4Real)")
        if repo is None or not (repo / "backend" / "__init__.py").is_file():
            raise ValueError(f"backend repository not found ({self.repo or 'not set'}): set "
                             "the repository folder in the add-on preferences, or clear the "
                             "Python field to use the environment Install Backend made")
        python = Path(self.python) if self.python else default_python(repo)
        if python is None or not python.exists():
            raise ValueError(f"Python interpreter not found ({self.python or 'no .venv'}): "
                             "press Install Backend in the add-on preferences, or run "
                             "`python3 build.py setup` in the repository")
        cache = Path(self.cache_dir) if self.cache_dir else repo / ".cache" / "results"
        return python, repo, cache


class LocalBackend:
    """One backend child process. `start` returns at once; `poll_ready` says when it is up."""

    def __init__(self, config: LocalBackendConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.address: str | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="fourreal-backend-"))
        self.ready_file = self._folder / "ready.json"
        self.log_path = self._folder / "backend.log"

    def start(self) -> None:
        if self.alive:
            return
        python, repo, cache = self.config.resolved()
        self.ready_file.unlink(missing_ok=True)
        self.address = None
        cmd = [str(python), "-m", "backend", "serve", "--address", "tcp://127.0.0.1:0",
               "--ready-file", str(self.ready_file), "--cache-dir", str(cache),
               "--device", self.config.device, *self.config.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if repo is None:  # an installed environment: its own backend, nothing from outside
            env.pop("PYTHONPATH", None)
            cwd = python.parent.parent
        else:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH"))
                                                if p)
            cwd = repo
        flags = subprocess.CREATE_NEW_PROCESS_GROUP if sys.platform == "win32" else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            creationflags=flags)
        _RUNNING.add(self)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def poll_ready(self) -> str | None:
        """The backend's address once its ready file is there, else None. Raises
        BackendStartError if the process has exited."""
        if self.address is not None:
            return self.address
        if self.process is None:
            raise BackendStartError("the local backend was not started")
        if self.ready_file.exists():
            try:
                self.address = json.loads(self.ready_file.read_text())["address"]
                return self.address
            except (OSError, ValueError, KeyError):
                return None  # being written; read it on the next poll
        if self.process.poll() is not None:
            raise BackendStartError(f"the local backend exited with code "
                                    f"{self.process.returncode}:\n{self.log_tail()}")
        return None

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Block until ready (for scripts and tests; the UI uses poll_ready)."""
        deadline = time.monotonic() + timeout
        while (address := self.poll_ready()) is None:
            if time.monotonic() > deadline:
                raise BackendStartError(f"the local backend was not ready within {timeout} s:"
                                        f"\n{self.log_tail()}")
            time.sleep(0.05)
        return address

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (it shuts down cleanly on SIGTERM), killing it if needed."""
        process, self.process, self.address = self.process, None, None
        _RUNNING.discard(self)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_all() -> None:
    """Stop every backend this Blender process started."""
    for backend in list(_RUNNING):
        backend.stop()


atexit.register(stop_all)
