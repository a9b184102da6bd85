"""The trained models this backend ships or was given: folders holding config.json and
model.safetensors under backend/weights/ (or a folder named by $FOURREAL_WEIGHTS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"


def weights_dirs() -> list[Path]:
    extra = os.environ.get("FOURREAL_WEIGHTS")
    return [Path(extra)] if extra else [SHIPPED_WEIGHTS]


def available_models() -> dict[str, dict]:
    """{name: {"model": class name, "path": folder}} for every complete checkpoint found."""
    found: dict[str, dict] = {}
    for root in weights_dirs():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            config, weights = folder / "config.json", folder / "model.safetensors"
            if not (config.is_file() and weights.is_file()):
                continue
            try:
                model = json.loads(config.read_text()).get("model", "unknown")
            except (OSError, ValueError):
                continue
            found[folder.name] = {"model": model, "path": str(folder)}
    return found


def model_class_of(folder: str | Path) -> tuple[type, type]:
    """(model class, config class) of a save_pretrained folder, from its config.json."""
    from backend.diffusion.config import DiffusionConfig
    from backend.diffusion.model import VideoDiT
    from backend.recon import ReconConfig, ReconModel

    classes = {"VideoDiT": (VideoDiT, DiffusionConfig), "ReconModel": (ReconModel, ReconConfig)}
    path = Path(folder) / "config.json"
    try:
        name = json.loads(path.read_text()).get("model")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the model's config ({error})") from error
    if name not in classes:
        raise ValueError(f"{path}: unknown model class {name!r}; known: {sorted(classes)}")
    return classes[name]
