"""4Real 4D generation for Blender: camera rigs out, animated Gaussian point clouds in.

Registration only; the work lives in the submodules."""

from __future__ import annotations

import importlib

# Registered in this order, unregistered in reverse.
_MODULE_NAMES = ("preferences", "props", "operators", "install_operators", "panels")


def _modules():
    return [importlib.import_module(f"{__package__}.{name}") for name in _MODULE_NAMES]


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
