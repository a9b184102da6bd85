"""Checkpoint I/O: `model.safetensors` + `config.json` in one folder, and `PretrainedModel`,
the base of every model the backend serves (`from_pretrained`, `save_pretrained`).

`config.json` holds `{"format_version": 1, "model": <class name>, "config": {...}}`, where
the inner dict is the component's `@dataclass` config. Every problem with a folder (missing
file, corrupt or truncated safetensors, bad JSON, a config of another model class, tensors
whose names or shapes disagree with the model) is reported as one ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

ConfigT = TypeVar("ConfigT")
ModelT = TypeVar("ModelT", bound=nn.Module)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"expected a dataclass config instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _is_tuple_field(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    origins = {typing.get_origin(hint)}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        origins |= {typing.get_origin(arg) or arg for arg in typing.get_args(hint)}
    return tuple in origins or hint is tuple


def config_from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
    """Build dataclass `cls` from `values`; unknown keys raise ValueError, missing ones default."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ValueError(f"{cls!r} is not a dataclass type")
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} config must be a dict, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, list) and _is_tuple_field(cls, key):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors sharing storage are cloned so safetensors accepts them."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen:
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        state[name] = tensor
    return state


def save_pretrained(folder: str | Path, model: nn.Module, config: Any,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` and `config.json` into `folder` (created if needed).

    `dtype` (e.g. torch.float16) stores the floating-point tensors at that precision to
    halve the file; loading casts them back to the model's own dtype."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format_version": FORMAT_VERSION, "model": type(model).__name__,
              "config_class": type(config).__name__, "config": config_to_dict(config)}
    state = _state_for_saving(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return folder


def read_config(folder: str | Path, model_cls: type, config_cls: type[ConfigT]) -> ConfigT:
    """Parse and check `config.json` in `folder` for a model of class `model_cls`."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise ValueError(f"{path}: expected an object with a 'config' object")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {header.get('format_version')!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
    if header.get("model") != model_cls.__name__:
        raise ValueError(f"{path}: holds a {header.get('model')!r} model, "
                         f"expected {model_cls.__name__!r}")
    try:
        return config_from_dict(config_cls, header["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid {config_cls.__name__}: {error}") from error


def state_dict_mismatches(expected: dict[str, torch.Size], found: dict[str, torch.Size]
                          ) -> list[str]:
    """Human-readable list of missing keys, unexpected keys and shape mismatches."""
    problems = [f"missing key: {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected key: {k}" for k in sorted(set(found) - set(expected))]
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key]) != tuple(found[key]):
            problems.append(f"shape mismatch {key}: expected {tuple(expected[key])}, "
                            f"got {tuple(found[key])}")
    return problems


def _read_safetensors(path: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Load every tensor of `path` after checking names and shapes against `expected`."""
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            found = {k: torch.Size(handle.get_slice(k).get_shape()) for k in names}
            problems = state_dict_mismatches(expected, found)
            state = {} if problems else {k: handle.get_tensor(k) for k in names}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from error
    if problems:
        raise ValueError(f"{path}: weights do not match the model:\n  " + "\n  ".join(problems))
    return state


def load_pretrained(folder: str | Path, model_cls: type[ModelT], config_cls: type[ConfigT],
                    device: str | torch.device = "cpu") -> tuple[ModelT, ConfigT]:
    """Rebuild `model_cls(config)` from `folder`, load its weights onto `device`, eval mode."""
    folder = Path(folder)
    config = read_config(folder, model_cls, config_cls)
    try:
        with torch.device("meta"):
            skeleton = model_cls(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / CONFIG_NAME}: invalid {config_cls.__name__} for "
                         f"{model_cls.__name__} ({error})") from error
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    state = _read_safetensors(folder / WEIGHTS_NAME, expected)
    with torch.device(device):
        model = model_cls(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config


class PretrainedModel(nn.Module):
    """A model that loads and saves itself as a checkpoint folder.

    Subclasses set `config_class` (their `@dataclass` config) and keep the config as
    `self.config`; the model registry (`backend.models`) maps the class name written into
    `config.json` back to the class.
    """

    config_class: ClassVar[type]
    config: Any

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu"):
        """This class rebuilt from its checkpoint `folder` on `device`, in eval mode;
        ValueError naming the file for anything wrong with the folder."""
        model, _config = load_pretrained(folder, cls, cls.config_class, device)
        return model

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write this model and its config into `folder` (see `save_pretrained`)."""
        return save_pretrained(folder, self, self.config, dtype=dtype)
