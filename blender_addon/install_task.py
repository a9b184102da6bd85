"""The install running: each step of an InstallPlan as a child process writing into the install
log, read back by `poll()` (called from a `bpy.app.timers` callback) for the progress bar;
cancel ends the step's whole process tree; a failure becomes an InstallError saying what to do."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .installer import RECORD_NAME, InstallError, InstallPlan, child_env, env_dir

_RAW_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_COLLECTING = re.compile(r"^Collecting (\S+)")
_DOWNLOADING = re.compile(r"^Downloading (\S+)")
_INSTALLING = re.compile(r"^Installing collected packages: (.+)$")


class PipProgress:
    """pip's output read line by line: what it is doing (`text`) and how far its step has come
    (`fraction`, 0..1, never decreasing). Each download fills half of what is left before the
    install phase, so the bar keeps moving however many files there are."""

    DOWNLOADS_START, INSTALL_START = 0.1, 0.9

    def __init__(self):
        self.fraction, self.text, self.package = 0.0, "", ""
        self.downloads = 0  # downloads started so far

    def _download_span(self) -> tuple[float, float]:
        lo, hi = self.DOWNLOADS_START, self.INSTALL_START
        start = hi - (hi - lo) * 0.5 ** max(self.downloads - 1, 0)
        return start, start + (hi - start) / 2

    def _advance(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(fraction, 1.0))

    def feed(self, line: str) -> bool:
        """Take one line of output; True when `text` or `fraction` changed."""
        line = line.strip()
        before = (self.fraction, self.text)
        if match := _RAW_PROGRESS.match(line):
            current, total = int(match[1]), int(match[2])
            if total > 0:
                start, end = self._download_span()
                self._advance(start + (end - start) * current / total)
                self.text = f"Downloading {self.package}: {current / 1e6:.0f} of " \
                            f"{total / 1e6:.0f} MB"
        elif match := _COLLECTING.match(line):
            self.package = match[1]
            self.text = f"Collecting {self.package}"
            self._advance(min(self.fraction + 0.01, self.DOWNLOADS_START))
        elif match := _DOWNLOADING.match(line):
            self.package = match[1].rsplit("/", 1)[-1]
            self.downloads += 1
            self._advance(self._download_span()[0])
            self.text = f"Downloading {self.package}"
        elif match := _INSTALLING.match(line):
            names = match[1].split(", ")
            self.text = f"Installing {len(names)} packages ({', '.join(names[:3])}" \
                        f"{', ...' if len(names) > 3 else ''})"
            self._advance(self.INSTALL_START)
        elif line.startswith("Successfully installed"):
            self.text = line[:120]
            self._advance(1.0)
        return (self.fraction, self.text) != before


# (code, what the output says, what the user is told): the first match wins.
FAILURES = [
    ("no_space", ("No space left on device", "[Errno 28]", "There is not enough space"),
     "The disk ran out of space. Free some space or choose another Install Folder, then "
     "Install Backend again."),
    ("no_network", ("Failed to establish a new connection", "Temporary failure in name resolution",
                    "Name or service not known", "nodename nor servname", "getaddrinfo failed",
                    "Network is unreachable", "Connection refused", "ConnectTimeoutError",
                    "ReadTimeoutError", "Max retries exceeded", "Could not fetch URL",
                    "ProxyError", "CERTIFICATE_VERIFY_FAILED", "Connection reset"),
     "The package index could not be reached ({index}). Check the internet connection (pip "
     "reads HTTPS_PROXY for a proxy), then Install Backend again: finished downloads are "
     "reused."),
    ("no_venv", ("ensurepip is not available", "No module named venv",
                 "No module named ensurepip"),
     "{python} cannot create virtual environments. On Debian/Ubuntu install the python3-venv "
     "package, or set another 'Python for the Environment'."),
    ("failed_wheel", ("No matching distribution found", "Could not find a version that satisfies",
                      "Failed building wheel", "Failed to build", "is not a supported wheel",
                      "ResolutionImpossible", "subprocess-exited-with-error"),
     "pip could not install {package} for Python {python_version} on this system (no wheel "
     "fits). Choose a Python 3.11 or 3.12 in 'Python for the Environment' and Install again."),
]
_PACKAGE_PATTERNS = (re.compile(r"No matching distribution found for (\S+)"),
                     re.compile(r"Failed building wheel for (\S+)"),
                     re.compile(r"Could not find a version that satisfies the requirement (\S+)"))


def classify_failure(lines: list[str], returncode: int, step: str, log_path: Path,
                     record: dict | None = None) -> InstallError:
    """The InstallError for a step that exited with `returncode`, from its output."""
    text = "\n".join(lines)
    record = record or {}
    package = next((m[1] for p in _PACKAGE_PATTERNS if (m := p.search(text))), "a package")
    values = {"index": record.get("torch_index") or "pypi.org",
              "python": record.get("python", "this Python"),
              "python_version": record.get("python_version", "?"), "package": package}
    for code, needles, advice in FAILURES:
        if any(needle in text for needle in needles):
            return InstallError(code, f"{step} failed. {advice.format(**values)} "
                                      f"Log: {log_path}")
    return InstallError("failed", f"{step} failed (exit code {returncode}). The log has the "
                                  f"details: {log_path}")


class InstallTask:
    """Runs a plan's steps one after another; `poll()` never blocks."""

    def __init__(self, plan: InstallPlan):
        self.plan = plan
        self.state = "idle"  # running, done, failed, cancelled
        self.error: InstallError | None = None
        self.index = -1
        self.process: subprocess.Popen | None = None
        self.progress = PipProgress()
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self._offset, self._partial = 0, ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def step(self):
        return self.plan.steps[self.index] if 0 <= self.index < len(self.plan.steps) else None

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        done = sum(s.weight for s in self.plan.steps[:max(self.index, 0)])
        total = sum(s.weight for s in self.plan.steps) or 1.0
        current = self.step.weight * self.progress.fraction if self.step else 0.0
        return min((done + current) / total, 1.0)

    @property
    def text(self) -> str:
        if self.state != "running" or self.step is None:
            return self.state
        detail = f": {self.progress.text}" if self.progress.text else ""
        return f"{self.step.label} ({self.index + 1}/{len(self.plan.steps)}){detail}"

    def start(self) -> InstallTask:
        self.plan.folder.mkdir(parents=True, exist_ok=True)
        with open(self.plan.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"{json.dumps(self.plan.record)}\n")
        self.state = "running"
        self._next_step()
        return self

    def _next_step(self) -> None:
        self.index += 1
        self.progress, self._partial = PipProgress(), ""
        self.tail.clear()
        step = self.step
        with open(self.plan.log_path, "ab") as log:
            log.write(f"$ {subprocess.list2cmdline(step.argv)}\n".encode())
            log.flush()
            self._offset = log.tell()
            posix = sys.platform != "win32"
            self.process = subprocess.Popen(
                step.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(), cwd=self.plan.folder, start_new_session=posix,
                creationflags=0 if posix else subprocess.CREATE_NEW_PROCESS_GROUP)

    def _read_output(self) -> bool:
        try:
            with open(self.plan.log_path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return False
        self._offset += len(data)
        lines = (self._partial + data.decode("utf-8", "replace")).split("\n")
        self._partial = lines.pop()
        changed = False
        for line in lines:
            for part in line.split("\r"):  # progress redrawn in place
                self.tail.append(part)
                changed |= self.progress.feed(part)
        return changed

    def poll(self) -> bool:
        """Read new output, advance to the next step when one ends; True when anything the
        progress bar shows changed."""
        if self.state != "running":
            return False
        returncode = self.process.poll()
        changed = self._read_output()
        if returncode is None:
            return changed
        self._read_output()
        if self._partial:
            self.tail.append(self._partial)
        if returncode != 0:
            self._finish("failed", classify_failure(list(self.tail), returncode, self.step.label,
                                                    self.plan.log_path, self.plan.record))
        elif self.index + 1 < len(self.plan.steps):
            self._next_step()
        else:
            env = env_dir(self.plan.folder)
            (env / RECORD_NAME).write_text(json.dumps(self.plan.record, indent=1))
            self._finish("done", None)
        return True

    def _finish(self, state: str, error: InstallError | None) -> None:
        self.state, self.error, self.process = state, error, None
        with open(self.plan.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {state}{': ' + error.message if error else ''}\n")

    def cancel(self, timeout: float = 10.0) -> None:
        """End the running step and everything it started; the environment stays incomplete
        (Install again starts it afresh, Remove Backend deletes it)."""
        if self.state != "running":
            return
        process = self.process
        stop_process_tree(process, timeout)
        self._read_output()
        self._finish("cancelled", InstallError("cancelled", "Install cancelled: Install "
                                               "Backend starts it again, Remove Backend "
                                               "deletes what was installed so far."))

    def wait(self, timeout: float, interval: float = 0.2) -> str:
        """Poll until the task ends (for scripts and tests; Blender polls from a timer)."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"install not finished within {timeout} s")
            self.poll()
            time.sleep(interval)
        return self.state


def stop_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process started in its own session / process group, and its children."""
    if process.poll() is not None:
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                       capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if sys.platform != "win32":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.wait(timeout)
