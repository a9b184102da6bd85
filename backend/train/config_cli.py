"""Training and evaluation configs from the command line: defaults, then a JSON object
(`--config`, inline or a file), then dotted `--set KEY=VALUE` overrides, then named flags."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    """JSON when it parses ("32", "[32, 32]", "true"), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_json_argument(text: str) -> dict[str, Any]:
    """An inline JSON object or the path of a file holding one."""
    source = Path(text).read_text() if not text.lstrip().startswith("{") else text
    try:
        values = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config: not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError("--config: expected a JSON object")
    return values


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys ("data.height", "lr") in a nested config dict; returns a new dict.

    Keys under a field named `*overrides` may be new; every other key must exist."""
    result = copy.deepcopy(values)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"config override {dotted!r}: {key!r} is not a nested config")
            node = node[key]
        if leaf not in node and not (parents and parents[-1].endswith("overrides")):
            raise ValueError(f"config override {dotted!r}: unknown key {leaf!r}")
        node[leaf] = value
    return result


def build_config(cls: type, config_json: str | None, sets: list[str],
                 flags: dict[str, Any]) -> Any:
    """Defaults of `cls`, then --config (nested configs merged), then --set, then flags."""
    values = cls().to_dict() if hasattr(cls, "to_dict") else dataclasses.asdict(cls())
    if config_json:
        nested = {f.name for f in dataclasses.fields(cls)
                  if isinstance(values.get(f.name), dict) and not f.name.endswith(
                      ("overrides", "weights"))}
        for key, value in read_json_argument(config_json).items():
            if key in nested and isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    dotted = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        dotted[key.strip()] = parse_value(text)
    values = apply_overrides(values, dotted)
    values.update({k: v for k, v in flags.items() if v is not None})
    if hasattr(cls, "from_dict"):
        return cls.from_dict(values)
    from backend.checkpoint import config_from_dict

    return config_from_dict(cls, values)
