"""Add-on preferences: how the backend is reached (a local child process or an address) and
the environment Install Backend makes for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from . import installer
from .backend_process import default_python, default_repo

ADDON_ID = "fourreal_4d"
TORCH_CHOICES = [
    ("AUTO", "Automatic", "CUDA when an NVIDIA GPU is found, else the CPU build"),
    ("CPU", "CPU", "The CPU build of PyTorch (smaller download)"),
    ("CUDA", "CUDA", "The CUDA build of PyTorch, for NVIDIA GPUs"),
]

BACKEND_MODES = [
    ("LOCAL", "Start Local Backend", "Start the backend as a child process of Blender"),
    ("REMOTE", "Connect to Address", "Connect to a backend that is already running"),
]


class FOURREAL_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_mode: EnumProperty(name="Backend", items=BACKEND_MODES, default="LOCAL")
    python_path: StringProperty(
        name="Python", subtype="FILE_PATH",
        description="Interpreter with the backend's dependencies (empty: the repository's "
                    ".venv)")
    repo_path: StringProperty(
        name="Repository", subtype="DIR_PATH",
        description="Folder holding the `backend` package (empty: the checkout around this "
                    "add-on)")
    device: StringProperty(name="Device", default="auto",
                           description="auto, cpu, cuda or cuda:N")
    address: StringProperty(name="Address", default="tcp://127.0.0.1:5555",
                            description="ZeroMQ address of a running backend")
    curve_server_public: StringProperty(
        name="Server Public Key", subtype="FILE_PATH",
        description="CURVE public key file of the backend (needed for remote backends)")
    curve_client_secret: StringProperty(
        name="Client Secret Key", subtype="FILE_PATH",
        description="CURVE secret key file of this client (needed for remote backends)")
    cache_dir: StringProperty(
        name="Cache Folder", subtype="DIR_PATH",
        description="Where the local backend keeps job results (empty: the install folder's "
                    "cache, or <repository>/.cache)")
    install_folder: StringProperty(
        name="Install Folder", subtype="DIR_PATH",
        description="Where Install Backend makes the backend's environment (empty: this "
                    "extension's user folder)")
    install_torch: EnumProperty(name="PyTorch", items=TORCH_CHOICES, default="AUTO")
    install_python: StringProperty(
        name="Python for the Environment", subtype="FILE_PATH",
        description="Python 3.11+ to create the environment with (empty: Blender's own if it "
                    "can, else one on PATH)")
    torch_index: StringProperty(
        name="PyTorch Index", description="Package index to install torch from (empty: "
                                          "automatic, PyTorch's CPU index for CPU on Linux)")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        col = layout.column()
        if self.backend_mode == "LOCAL":
            self.draw_install(context, col.box())
            col.prop(self, "device")
            col.prop(self, "cache_dir")
            box = col.box()
            box.label(text="Developers: run the backend from a checkout")
            box.prop(self, "python_path")
            box.prop(self, "repo_path")
            repo, python = default_repo(), default_python()
            box.label(text=f"Defaults: {python or 'no .venv found'} in {repo or 'no checkout'}")
        else:
            col.prop(self, "address")
            col.prop(self, "curve_server_public")
            col.prop(self, "curve_client_secret")

    def draw_install(self, context, box) -> None:
        from .install_operators import install_state

        folder = resolve_install_folder(self.install_folder)
        status = installer.environment_status(folder)
        box.label(text="Backend environment", icon="PACKAGE")
        box.label(text=status.describe(), icon="CHECKMARK" if status.state == "installed"
                  else "INFO")
        task, error = install_state()
        if task is not None and task.running:
            box.progress(factor=task.fraction, type="BAR", text=task.text)
            box.operator("fourreal.cancel_install", icon="CANCEL")
            return
        if error is not None:
            sub = box.box()
            sub.alert = error.code != "cancelled"
            for line in _wrap(error.message):
                sub.label(text=line)
        if task is not None:
            box.operator("fourreal.open_install_log", icon="TEXT")
        box.prop(self, "install_folder")
        box.prop(self, "install_torch")
        box.prop(self, "install_python")
        box.prop(self, "torch_index")
        row = box.row(align=True)
        if status.state == "installed":
            sub = row.row(align=True)
            sub.enabled = bool(status.update)
            sub.operator("fourreal.update_backend", icon="FILE_REFRESH")
        else:
            row.operator("fourreal.install_backend", icon="IMPORT")
        sub = row.row(align=True)
        sub.enabled = status.state != "missing"
        sub.operator("fourreal.remove_backend", icon="TRASH")


def _wrap(text: str, width: int = 90) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)[:10]


def default_install_folder(create: bool = False) -> Path:
    """The extension's user folder (kept across updates of the extension); for an add-on run
    from a checkout, Blender's user data folder."""
    try:
        return Path(bpy.utils.extension_path_user(__package__, create=create))
    except ValueError:  # not installed as an extension
        return Path(bpy.utils.user_resource("DATAFILES", path=ADDON_ID, create=create))


def resolve_install_folder(value: str = "") -> Path:
    return Path(bpy.path.abspath(value)) if value else default_install_folder()


@dataclass
class PreferenceValues:
    """The preferences as plain values (defaults when the add-on runs unregistered)."""

    backend_mode: str = "LOCAL"
    python_path: str = ""
    repo_path: str = ""
    device: str = "auto"
    address: str = "tcp://127.0.0.1:5555"
    curve_server_public: str = ""
    curve_client_secret: str = ""
    cache_dir: str = ""
    install_folder: str = ""
    install_torch: str = "AUTO"
    install_python: str = ""
    torch_index: str = ""


def preference_values(context: bpy.types.Context | None = None) -> PreferenceValues:
    """The preferences; an empty Python (and no repository) means the environment Install
    Backend made, when there is one."""
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    if addon is None:
        return PreferenceValues()
    prefs = addon.preferences
    values = PreferenceValues(**{name: bpy.path.abspath(getattr(prefs, name))
                                 if name.endswith(("_path", "_dir", "_public", "_secret",
                                                   "_folder", "_python"))
                                 else getattr(prefs, name)
                                 for name in PreferenceValues.__dataclass_fields__})
    if not values.python_path and not values.repo_path:
        status = installer.environment_status(resolve_install_folder(values.install_folder))
        if status.state == "installed":
            values.python_path = str(status.python)
    return values


def register() -> None:
    bpy.utils.register_class(FOURREAL_AP_preferences)


def unregister() -> None:
    bpy.utils.unregister_class(FOURREAL_AP_preferences)
