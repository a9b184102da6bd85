"""Add-on preferences: how the backend is reached (a local child process or an address)."""

from __future__ import annotations

from dataclasses import dataclass

import bpy
from bpy.props import EnumProperty, StringProperty

from .backend_process import default_python, default_repo

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
        description="Where the local backend keeps job results (empty: <repository>/.cache)")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        col = layout.column()
        if self.backend_mode == "LOCAL":
            col.prop(self, "python_path")
            col.prop(self, "repo_path")
            col.prop(self, "device")
            col.prop(self, "cache_dir")
            repo, python = default_repo(), default_python()
            col.label(text=f"Defaults: {python or 'no .venv found'} in {repo or 'no checkout'}")
        else:
            col.prop(self, "address")
            col.prop(self, "curve_server_public")
            col.prop(self, "curve_client_secret")


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


def preference_values(context: bpy.types.Context | None = None) -> PreferenceValues:
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    if addon is None:
        return PreferenceValues()
    prefs = addon.preferences
    return PreferenceValues(**{name: bpy.path.abspath(getattr(prefs, name))
                               if name.endswith(("_path", "_dir", "_public", "_secret"))
                               else getattr(prefs, name)
                               for name in PreferenceValues.__dataclass_fields__})


def register() -> None:
    bpy.utils.register_class(FOURREAL_AP_preferences)


def unregister() -> None:
    bpy.utils.unregister_class(FOURREAL_AP_preferences)
