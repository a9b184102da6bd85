"""Install, Update and Remove Backend (Preferences > Add-ons > 4Real): thin operators over
installer.py. One install runs at a time as child processes, polled from a `bpy.app.timers`
callback; the preferences draw its progress, its error and a Cancel button."""

from __future__ import annotations

from pathlib import Path

import bpy

from . import installer, runtime
from .install_task import InstallTask
from .installer import InstallError
from .preferences import preference_values, resolve_install_folder

POLL_INTERVAL_S = 0.2

_task: InstallTask | None = None
_refused: InstallError | None = None  # why the last Install/Update/Remove did not start


def install_state() -> tuple[InstallTask | None, InstallError | None]:
    """(the current or last install, the error to show: its failure or the last refusal)."""
    return _task, _refused or (_task.error if _task is not None else None)


def current_task() -> InstallTask | None:
    return _task


def chosen_folder(context: bpy.types.Context) -> Path:
    return resolve_install_folder(preference_values(context).install_folder)


def start_install(context: bpy.types.Context) -> InstallTask:
    """Find a Python, choose torch, check the disk, then start the install."""
    prefs = preference_values(context)
    folder = chosen_folder(context)
    python = installer.find_python(prefs.install_python)
    gpu = prefs.install_torch == "AUTO" and installer.nvidia_gpu_present()
    variant = installer.torch_variant(prefs.install_torch, gpu)
    return _run(installer.plan_install(folder, python, variant, prefs.torch_index))


def start_update(context: bpy.types.Context) -> InstallTask:
    folder = chosen_folder(context)
    plan = installer.plan_update(folder)
    _stop_backend_using(context, installer.env_dir(folder))
    return _run(plan)


def remove_backend(context: bpy.types.Context) -> Path:
    """Delete the environment (after stopping a backend that runs from it)."""
    _refuse_while_running()
    folder = chosen_folder(context)
    _stop_backend_using(context, installer.env_dir(folder))
    return installer.remove_environment(folder)


def cancel_install() -> None:
    if _task is not None:
        _task.cancel()
        _redraw()


def _refuse_while_running() -> None:
    if _task is not None and _task.running:
        raise InstallError("busy", "An install is running: wait for it or Cancel it first.")


def _run(plan: installer.InstallPlan) -> InstallTask:
    global _task
    _refuse_while_running()
    _task = InstallTask(plan).start()
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=POLL_INTERVAL_S, persistent=True)
    return _task


def _stop_backend_using(context: bpy.types.Context, env: Path) -> None:
    local = runtime.runner().local
    if local is not None and local.config.python and \
            installer.environment_of(local.config.python) == env:
        runtime.stop_backend(context)


def tick() -> float | None:
    """The timer callback: read the install's output; stops once the install has ended."""
    if _task is None:
        return None
    changed = _task.poll()
    if changed:
        _redraw()
    if _task.running:
        return POLL_INTERVAL_S
    print(f"4Real: backend install {_task.state}"
          f"{': ' + _task.error.message if _task.error else ''}")
    return None


def _redraw() -> None:
    wm = bpy.context.window_manager
    for window in wm.windows if wm is not None else []:
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def _attempt(op: bpy.types.Operator, action) -> set[str]:
    """Run `action`; a refusal is reported and kept for the preferences to show."""
    global _refused
    _refused = None
    try:
        result = action()
    except (InstallError, OSError) as exc:
        _refused = exc if isinstance(exc, InstallError) else InstallError("failed", str(exc))
        op.report({"ERROR"}, _refused.message)
        return {"CANCELLED"}
    if isinstance(result, Path):
        op.report({"INFO"}, f"removed {result}")
    return {"FINISHED"}


class FOURREAL_OT_install_backend(bpy.types.Operator):
    """Make a Python environment with the backend and PyTorch (downloads about 0.3 GB for CPU,
    several GB for CUDA)"""

    bl_idname = "fourreal.install_backend"
    bl_label = "Install Backend"

    def execute(self, context):
        return _attempt(self, lambda: start_install(context))


class FOURREAL_OT_update_backend(bpy.types.Operator):
    """Replace the installed backend with the one this add-on carries (same or newer version)"""

    bl_idname = "fourreal.update_backend"
    bl_label = "Update Backend"

    def execute(self, context):
        return _attempt(self, lambda: start_update(context))


class FOURREAL_OT_remove_backend(bpy.types.Operator):
    """Delete the backend's environment (job results in the cache folder stay)"""

    bl_idname = "fourreal.remove_backend"
    bl_label = "Remove Backend"

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(
            self, event, title="Remove the backend environment?", confirm_text="Remove")

    def execute(self, context):
        return _attempt(self, lambda: remove_backend(context))


class FOURREAL_OT_cancel_install(bpy.types.Operator):
    """Stop the running install"""

    bl_idname = "fourreal.cancel_install"
    bl_label = "Cancel Install"

    def execute(self, context):
        cancel_install()
        return {"FINISHED"}


class FOURREAL_OT_open_install_log(bpy.types.Operator):
    """Open the install log (every command and pip's output)"""

    bl_idname = "fourreal.open_install_log"
    bl_label = "Open Install Log"

    def execute(self, context):
        log = chosen_folder(context) / installer.LOG_NAME
        if not log.exists():
            self.report({"ERROR"}, f"no install log at {log}")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=str(log))
        return {"FINISHED"}


CLASSES = (FOURREAL_OT_install_backend, FOURREAL_OT_update_backend, FOURREAL_OT_remove_backend,
           FOURREAL_OT_cancel_install, FOURREAL_OT_open_install_log)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    if _task is not None:
        _task.cancel()
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
