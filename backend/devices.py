"""Which torch device a name means: the one place "auto" is resolved (server, jobs, training,
evaluation and benchmarks all ask here)."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """"auto" is this process's CUDA device when there is one (the `local_rank`-th under
    torchrun), else the CPU; other names are checked. ValueError for CUDA without CUDA."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: {name!r} is not a torch device name ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: CUDA was requested but is not available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
    return device
