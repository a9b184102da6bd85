"""The model registry: the one place that knows which model classes exist, what role each
plays in the pipeline, and where trained checkpoints are.

A checkpoint is a folder with `config.json` + `model.safetensors` (`backend.checkpoint`);
`config.json`'s "model" field names its class. `MODEL_CLASSES` maps that name to the class
(imported only when a model is loaded, so listing checkpoints needs no torch) and to its role:

- "diffusion": fills a views x timesteps grid (`VideoDiT`);
- "reconstruction": turns a grid into Gaussians per timestep (`ReconModel`).

Adding an architecture is its own package plus one `ModelClass` line here; the pipeline, the
job kinds, evaluation and export all find and load models through `find_model` and
`load_model`.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("diffusion", "reconstruction")
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
WEIGHTS_ENV = "FOURREAL_WEIGHTS"  # a folder of checkpoint folders that replaces the shipped


@dataclass(frozen=True)
class ModelClass:
    """One architecture: its class and config class as "module:attribute" paths."""

    name: str  # the class name that config.json's "model" field holds
    role: str  # one of ROLES
    model: str  # "package.module:Class"
    config: str  # "package.module:ConfigClass"

    def load_class(self) -> type:
        return _import(self.model)

    def load_config_class(self) -> type:
        return _import(self.config)


MODEL_CLASSES: dict[str, ModelClass] = {m.name: m for m in (
    ModelClass("VideoDiT", "diffusion", "backend.diffusion.model:VideoDiT",
               "backend.diffusion.config:DiffusionConfig"),
    ModelClass("ReconModel", "reconstruction", "backend.recon.model:ReconModel",
               "backend.recon.config:ReconConfig"),
)}


class ModelNotFound(ValueError):
    """No checkpoint fits the request; the message lists what there is."""


def _import(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def weights_dirs() -> list[Path]:
    """Where checkpoints are looked for: $FOURREAL_WEIGHTS when set, else the shipped ones."""
    extra = os.environ.get(WEIGHTS_ENV)
    return [Path(extra)] if extra else [SHIPPED_WEIGHTS]


def model_class_of(folder: str | Path) -> ModelClass:
    """The registered architecture of checkpoint `folder`, from its config.json; ValueError
    naming the file when it is unreadable or names an unknown class."""
    path = Path(folder) / "config.json"
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: cannot read the model's config ({error})") from error
    if name not in MODEL_CLASSES:
        raise ValueError(f"{path}: unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def available_models(role: str | None = None) -> dict[str, dict[str, str]]:
    """{checkpoint name: {"model": class name, "role": role, "path": folder}} for every
    complete checkpoint of a registered class (of `role`, when given)."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    found: dict[str, dict[str, str]] = {}
    for root in weights_dirs():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = (folder / "config.json", folder / "model.safetensors")
            if not all(f.is_file() for f in files):
                continue
            try:
                entry = model_class_of(folder)
            except ValueError:
                continue
            if role is None or entry.role == role:
                found[folder.name] = {"model": entry.name, "role": entry.role,
                                      "path": str(folder)}
    return found


def find_model(role: str, name: str | None = None) -> tuple[str, Path]:
    """(name, folder) of the checkpoint of `role` called `name`, or the first one found;
    ModelNotFound listing the available ones when none fits."""
    fitting = {n: Path(m["path"]) for n, m in available_models(role).items()}
    if name is not None:
        if name not in fitting:
            raise ModelNotFound(f"no {role} model named {name!r}; available: "
                                f"{sorted(fitting) or 'none'}")
        return name, fitting[name]
    if not fitting:
        raise ModelNotFound(f"no trained {role} model found (looked for config.json + "
                            f"model.safetensors folders in {', '.join(map(str, weights_dirs()))})")
    first = sorted(fitting)[0]
    return first, fitting[first]


def load_model(folder: str | Path, device: Any = "cpu", role: str | None = None,
               attention_impl: str | None = None):
    """The model of checkpoint `folder` on `device`, in eval mode, through its class's
    `from_pretrained`. `role`, when given, must match the checkpoint's; `attention_impl`
    chooses the attention kernel of models that have one (`set_attention_impl`)."""
    entry = model_class_of(folder)
    if role is not None and entry.role != role:
        raise ValueError(f"{folder}: holds a {entry.role} model ({entry.name}), "
                         f"expected a {role} model")
    model = entry.load_class().from_pretrained(folder, device=device)
    if attention_impl is not None:
        if not hasattr(model, "set_attention_impl"):
            raise ValueError(f"{entry.name} has no choice of attention kernel")
        model.set_attention_impl(attention_impl)
    return model.eval()
