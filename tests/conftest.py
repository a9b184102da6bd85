"""Shared test set-up: caches in the repo's ignored folders, the `gpu` marker, seeded inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
for _var, _sub in [("TORCHINDUCTOR_CACHE_DIR", "torchinductor"), ("XDG_CACHE_HOME", "xdg"),
                   ("BLENDER_USER_RESOURCES", "blender"),
                   ("HYPOTHESIS_STORAGE_DIRECTORY", "hypothesis"), ("NUMBA_CACHE_DIR", "numba")]:
    os.environ.setdefault(_var, str(CACHE / _sub))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread avoids OpenMP stalls when the cores are shared.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
