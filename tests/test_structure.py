"""One owner per concept: the model registry, job parameter schemas (and the add-on and
README that follow them), and serving code that stays free of training and tools."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend import models as registry
from backend import protocol
from backend.checkpoint import save_pretrained
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.model import SelfAttention, VideoDiT
from backend.job_params import JOB_PARAMS, Param, ParamSchema, markdown_table
from backend.kinds import JOB_KINDS
from backend.recon import ReconConfig, ReconModel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    dit = VideoDiT(DiffusionConfig.preset("tiny", image_size=(16, 16), width=64, depth=1,
                                          num_heads=1, t_max=4, max_views=4))
    dit.save_pretrained(root / "dit")
    recon_config = ReconConfig.preset("tiny", image_size=(16, 16), width=64, depth=2,
                                      num_heads=2, head_features=16, dense_layers=(0, 1, 1, 1))
    save_pretrained(root / "recon", ReconModel(recon_config), recon_config)
    (root / "stray").mkdir()  # not a checkpoint: ignored
    return root


# ------------------------------------------------------------------------ the registry

def test_registry_lists_checkpoints_by_role(checkpoints, monkeypatch):
    monkeypatch.setenv(registry.WEIGHTS_ENV, str(checkpoints))
    assert set(registry.available_models()) == {"dit", "recon"}
    assert registry.available_models("diffusion")["dit"]["model"] == "VideoDiT"
    assert list(registry.available_models("reconstruction")) == ["recon"]
    assert registry.find_model("reconstruction") == ("recon", checkpoints / "recon")
    with pytest.raises(registry.ModelNotFound, match=r"no diffusion model named 'recon'.*dit"):
        registry.find_model("diffusion", "recon")
    with pytest.raises(ValueError, match="role"):
        registry.available_models("generator")


def test_every_registered_class_loads_itself(checkpoints):
    for name, entry in registry.MODEL_CLASSES.items():
        assert entry.role in registry.ROLES
        cls = entry.load_class()
        assert cls.__name__ == name and cls.config_class is entry.load_config_class()
        assert hasattr(cls, "from_pretrained") and hasattr(cls, "save_pretrained")
    model = VideoDiT.from_pretrained(checkpoints / "dit")
    assert isinstance(model, VideoDiT) and not model.training
    loaded = registry.load_model(checkpoints / "dit", role="diffusion")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_load_model_checks_the_role_and_chooses_the_attention_kernel(checkpoints):
    with pytest.raises(ValueError, match="holds a reconstruction model"):
        registry.load_model(checkpoints / "recon", role="diffusion")
    model = registry.load_model(checkpoints / "dit", attention_impl="decomposed")
    impls = {m.impl for m in model.modules() if isinstance(m, SelfAttention)}
    assert impls == {"decomposed"} and model.config.attention_impl == "decomposed"
    with pytest.raises(ValueError, match="attention_impl"):
        model.set_attention_impl("fastest")
    with pytest.raises(ValueError, match="no choice of attention kernel"):
        registry.load_model(checkpoints / "recon", attention_impl="merged")


def test_unknown_or_unreadable_checkpoints_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "GPT"}))
    with pytest.raises(ValueError, match=r"config.json: unknown model class 'GPT'"):
        registry.model_class_of(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the model's config"):
        registry.load_model(tmp_path)


# ------------------------------------------------------------- serving stays serving

SERVING_IMPORTS = """
import sys
import backend.server, backend.kinds, backend.pipeline, backend.models, backend.render
import backend.diffusion.sampler, backend.recon
from backend.models import find_model, load_model
for role in ("diffusion", "reconstruction"):
    load_model(find_model(role)[1], "cpu", role=role)
print("\\n".join(sorted(sys.modules)))
"""


def test_serving_code_imports_no_training_data_tools_or_blender():
    out = subprocess.run([sys.executable, "-c", SERVING_IMPORTS], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert "backend.server" in loaded and "backend.diffusion.model" in loaded
    forbidden = [m for m in loaded if m.split(".")[0] == "bpy" or m.startswith(
        ("backend.train", "backend.data", "backend.tools", "torch.distributed.run"))]
    assert forbidden == []


def test_importing_the_server_loads_no_model_code():
    code = "import sys, backend.server; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert not [m for m in out.stdout.split() if m.startswith(("torch", "backend.diffusion",
                                                               "backend.recon", "bpy"))]


def test_packaging_leaves_training_data_and_tools_out():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'exclude = \["backend.train\*", "backend.data\*", "backend.tools\*"\]',
                     text)


# ---------------------------------------------------------------- job parameters

def test_every_job_kind_has_a_schema_and_every_schema_a_kind():
    assert set(JOB_KINDS) == set(JOB_PARAMS)
    for kind in JOB_KINDS.values():
        assert kind.params is JOB_PARAMS[kind.name]


def test_schema_fills_defaults_and_names_bad_fields():
    schema = JOB_PARAMS["generate"]
    values = schema.validate({"steps": 4, "guidance": 2})
    assert values["steps"] == 4 and values["guidance"] == 2.0
    assert values["seed"] == 0 and values["diffusion_model"] is None
    cases = [({"guidence": 2.0}, "params.guidence", "did you mean 'guidance'"),
             ({"steps": 0}, "params.steps", r"an integer in \[1, 1000\], got 0"),
             ({"steps": 2.5}, "params.steps", "an integer"),
             ({"steps": True}, "params.steps", "an integer"),
             ({"guidance": float("nan")}, "params.guidance", "a number"),
             ({"recon_model": ""}, "params.recon_model", "non-empty string"),
             ([1, 2], "params", "must be an object")]
    for given, field, words in cases:
        with pytest.raises(protocol.ProtocolError, match=words) as info:
            schema.validate(given, kind="generate")
        assert (info.value.code, info.value.field) == ("bad_field", field)
    with pytest.raises(protocol.ProtocolError, match="one of 'ply_to_gaussians'"):
        JOB_PARAMS["convert"].validate({"direction": "sideways"})
    with pytest.raises(ValueError, match="duplicate"):
        ParamSchema((Param("a", "int", 0, "x"), Param("a", "int", 0, "y")))
    with pytest.raises(protocol.ProtocolError):
        Param("b", "int", 5, "a default outside its bounds", 0, 1)


def test_readme_parameter_table_is_the_schema():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- job-params:begin -->\n(.*?)<!-- job-params:end -->", readme, re.S)
    assert match, "README.md needs the job-params block"
    assert match.group(1) == markdown_table(JOB_PARAMS), (
        "README's parameter table differs from backend/job_params.py: run "
        "`.venv/bin/python -m backend.tools.readme_params --write`")


# -------------------------------------------------------------------------- rig layouts

def test_ring_and_arc_spacing_is_one_definition():
    import math

    import numpy as np

    from backend import cameras, rigs

    np.testing.assert_allclose(rigs.ring_azimuths(4), np.arange(4) * math.pi / 2)
    np.testing.assert_allclose(rigs.ring_azimuths(3, math.pi, 1.0), [1.0, 1 + math.pi / 2,
                                                                      1 + math.pi])
    np.testing.assert_allclose(rigs.centred_ring_azimuths(3, math.pi / 2, 0.0),
                               [-math.pi / 4, 0.0, math.pi / 4])
    assert rigs.centred_ring_azimuths(1, math.pi, 0.5).tolist() == [0.5]
    c2w, _ = cameras.orbit_rig(3, radius=2.0, camera_height=0.0, arc=math.pi)
    np.testing.assert_allclose(np.arctan2(c2w[:, 1, 3], c2w[:, 0, 3]),
                               rigs.ring_azimuths(3, math.pi), atol=1e-12)
    with pytest.raises(ValueError, match="at least one camera"):
        rigs.ring_azimuths(0)
