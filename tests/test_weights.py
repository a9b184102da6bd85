"""Weights and config I/O: round trips, mismatch reports, corrupt files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from backend.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    config_from_dict,
    config_to_dict,
    count_parameters,
    load_pretrained,
    save_pretrained,
)
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.model import VideoDiT


@dataclass
class ToyConfig:
    width: int = 4
    depth: int = 2
    sizes: tuple[int, int] = (2, 3)


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(config.width, config.width)
                                    for _ in range(config.depth))
        self.register_buffer("scale", torch.ones(config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, width]
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


class OtherModel(ToyModel):
    pass


@pytest.fixture
def toy_folder(tmp_path):
    torch.manual_seed(0)
    save_pretrained(tmp_path / "toy", ToyModel(ToyConfig()), ToyConfig())
    return tmp_path / "toy"


def test_config_dict_helpers():
    values = config_to_dict(ToyConfig(width=8))
    assert values == {"width": 8, "depth": 2, "sizes": [2, 3]}
    assert config_from_dict(ToyConfig, values) == ToyConfig(width=8)
    assert config_from_dict(ToyConfig, {"depth": 5}) == ToyConfig(depth=5)
    with pytest.raises(ValueError, match="unknown ToyConfig keys: colour, height"):
        config_from_dict(ToyConfig, {"width": 8, "height": 3, "colour": 1})
    with pytest.raises(ValueError, match="dataclass"):
        config_to_dict({"width": 8})


def test_count_parameters():
    model = ToyModel(ToyConfig(width=4, depth=3))
    assert count_parameters(model) == 3 * (16 + 4)
    model.layers[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 * (16 + 4) - 16
    with torch.device("meta"):
        assert count_parameters(ToyModel(ToyConfig(width=1000, depth=4))) == 4 * 1_001_000


def test_video_model_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = DiffusionConfig(patch_size=4, width=32, depth=2, num_heads=2, t_max=4,
                             max_views=4, use_camera_rays=True, attention_impl="reference",
                             image_size=(16, 16))
    model = VideoDiT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    save_pretrained(tmp_path / "dit", model, config)
    header = json.loads((tmp_path / "dit" / CONFIG_NAME).read_text())
    assert header["model"] == "VideoDiT" and header["format_version"] == 1
    assert header["config"]["width"] == 32
    loaded, loaded_config = load_pretrained(tmp_path / "dit", VideoDiT, DiffusionConfig)
    assert loaded_config == config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 3, 16, 16, generator=generator)
    rays = torch.randn(1, 2, 3, 6, 16, 16, generator=generator)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 0] = True
    s = torch.tensor([0.4])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, s, x, mask, rays=rays), loaded(x, s, x, mask, rays=rays))


def test_toy_round_trip_keeps_buffers(toy_folder):
    model, config = load_pretrained(toy_folder, ToyModel, ToyConfig)
    assert config == ToyConfig() and isinstance(config.sizes, tuple)
    assert torch.equal(model.scale, torch.ones(4))
    assert not model.training


def test_every_mismatch_is_reported_at_once(toy_folder):
    state = ToyModel(ToyConfig()).state_dict()
    del state["layers.0.bias"]
    state["layers.9.weight"] = torch.zeros(4, 4)
    state["layers.1.weight"] = torch.zeros(4, 5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(toy_folder / WEIGHTS_NAME))
    with pytest.raises(ValueError) as error:
        load_pretrained(toy_folder, ToyModel, ToyConfig)
    message = str(error.value)
    assert str(toy_folder / WEIGHTS_NAME) in message
    assert "missing key: layers.0.bias" in message
    assert "unexpected key: layers.9.weight" in message
    assert "shape mismatch layers.1.weight: expected (4, 4), got (4, 5)" in message


def test_config_that_builds_a_different_shape_is_reported(toy_folder):
    path = toy_folder / CONFIG_NAME
    header = json.loads(path.read_text())
    header["config"]["depth"] = 3
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"missing key: layers\.2\.weight"):
        load_pretrained(toy_folder, ToyModel, ToyConfig)


def test_truncated_weights_are_a_clear_error(toy_folder):
    path = toy_folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(toy_folder, ToyModel, ToyConfig)


def test_garbage_weights_are_a_clear_error(toy_folder):
    (toy_folder / WEIGHTS_NAME).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(toy_folder, ToyModel, ToyConfig)


def test_missing_weights_file_is_a_clear_error(toy_folder):
    (toy_folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: weights file not found"):
        load_pretrained(toy_folder, ToyModel, ToyConfig)


@pytest.mark.parametrize(("text", "message"), [
    ('{"format_version": 1, "model": "ToyModel", "config": {', "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"format_version": 2, "model": "ToyModel", "config": {}}', "format_version 2"),
    ('{"format_version": 1, "model": "ToyModel", "config": {"height": 2}}',
     "unknown ToyConfig keys: height"),
    ('{"format_version": 1, "model": "ToyModel", "config": {"width": "four"}}',
     "invalid ToyConfig"),
])
def test_bad_config_json_is_a_clear_error(toy_folder, text, message):
    (toy_folder / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_pretrained(toy_folder, ToyModel, ToyConfig)
    assert "config.json" in str(error.value)


def test_config_of_another_model_class_is_rejected(toy_folder):
    with pytest.raises(ValueError, match="holds a 'ToyModel' model, expected 'OtherModel'"):
        load_pretrained(toy_folder, OtherModel, ToyConfig)


def test_binary_config_is_a_clear_error(toy_folder):
    (toy_folder / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_pretrained(toy_folder, ToyModel, ToyConfig)


def test_half_precision_file_loads_into_a_float32_model(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(width=64))
    save_pretrained(tmp_path / "full", model, ToyConfig(width=64))
    save_pretrained(tmp_path / "half", model, ToyConfig(width=64), dtype=torch.float16)
    full_size = (tmp_path / "full" / WEIGHTS_NAME).stat().st_size
    half_size = (tmp_path / "half" / WEIGHTS_NAME).stat().st_size
    assert half_size < 0.6 * full_size
    loaded, _ = load_pretrained(tmp_path / "half", ToyModel, ToyConfig)
    for (name, original), (_, restored) in zip(model.state_dict().items(),
                                               loaded.state_dict().items()):
        assert restored.dtype == torch.float32, name
        assert torch.equal(restored, original.half().float()), name
