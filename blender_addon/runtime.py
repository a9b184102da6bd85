"""The add-on's one job runner, polled from a `bpy.app.timers` callback, with its state
mirrored into `WindowManager.fourreal_status` for the panel and the status bar."""

from __future__ import annotations

import bpy

from .backend_process import LocalBackend, LocalBackendConfig
from .jobs import JobRunner
from .preferences import preference_values

BUSY_INTERVAL_S = 0.1  # while starting, connecting or running jobs
IDLE_INTERVAL_S = 1.0  # otherwise: still notice a backend that dies

_runner: JobRunner | None = None


def runner() -> JobRunner:
    global _runner
    if _runner is None:
        _runner = JobRunner()
    return _runner


def start_backend(context: bpy.types.Context) -> JobRunner:
    """Start the local backend or connect to the remote one, as the preferences say."""
    prefs = preference_values(context)
    run = runner()
    if prefs.backend_mode == "LOCAL":
        config = LocalBackendConfig(python=prefs.python_path, repo=prefs.repo_path,
                                    cache_dir=prefs.cache_dir, device=prefs.device or "auto")
        if run.local is not None and run.local.config == config:
            if run.backend_state in ("dead", "unreachable"):
                run.restart_local()
            else:
                run.start_local(run.local)
        else:
            if run.local is not None:
                run.local.stop()
            run.start_local(LocalBackend(config))
    else:
        run.connect(prefs.address, prefs.curve_server_public or None,
                    prefs.curve_client_secret or None)
    ensure_polling()
    mirror(context.window_manager)
    return run


def stop_backend(context: bpy.types.Context) -> None:
    runner().stop_local()
    mirror(context.window_manager)


def ensure_polling() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=BUSY_INTERVAL_S, persistent=True)


def tick() -> float | None:
    """The timer callback: poll, mirror, report; returns the next interval."""
    run = runner()
    changed = run.poll()
    wm = bpy.context.window_manager
    if wm is not None and (changed or run.notices):
        mirror(wm)
        _report(wm, run)
        _redraw(wm)
    if run.client is None and run.local is None:
        return None
    return BUSY_INTERVAL_S if run.busy else IDLE_INTERVAL_S


def mirror(wm: bpy.types.WindowManager) -> None:
    """Copy the runner's backend and latest-job state into the status properties."""
    run, status = runner(), wm.fourreal_status
    status.backend_state = run.backend_state
    status.backend_address = run.address or ""
    status.backend_device = str(run.backend_info.get("device", ""))
    status.backend_kinds = ", ".join(sorted(run.backend_info.get("job_kinds", {}) or {}))
    status.backend_error = run.backend_error
    status.active_jobs = len(run.active_jobs())
    status.lost_jobs = sum(j.state == "lost" for j in run.jobs.values())
    job = run.latest()
    status.job_id = job.id if job else ""
    status.job_kind = job.kind if job else ""
    status.job_state = job.state if job else ""
    status.stage = job.stage if job else ""
    status.step, status.of = (job.step, job.of) if job else (0, 0)
    status.progress = job.fraction if job else 0.0
    status.message = job.message if job else ""
    status.job_error = job.error_text if job else ""


def _report(wm: bpy.types.WindowManager, run: JobRunner) -> None:
    """Show pending notices: printed, and as a popup where there is a window (none when
    Blender runs in the background)."""
    notices, run.notices = run.notices, []
    for level, text in notices:
        print(f"4Real {level.lower()}: {text}")
        for window in [] if bpy.app.background else wm.windows:
            def draw(menu, _context, text=text):
                for line in text.splitlines()[:12]:
                    menu.layout.label(text=line)
            icon = "ERROR" if level == "ERROR" else "INFO"
            with bpy.context.temp_override(window=window):
                wm.popup_menu(draw, title="4Real backend", icon=icon)
            break


def _redraw(wm: bpy.types.WindowManager) -> None:
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PROPERTIES", "STATUSBAR"):
                area.tag_redraw()


def shutdown() -> None:
    """Stop polling and the local backend (when the add-on is disabled)."""
    global _runner
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    if _runner is not None:
        _runner.close()
        _runner = None
