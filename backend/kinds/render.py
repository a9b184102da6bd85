"""Job kind `render`: one set of Gaussians + cameras -> one image per camera (rgb, alpha,
depth)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend import protocol
from backend.kinds.base import JobKind
from backend.kinds.common import gaussians_from_message
from backend.worker import JobContext

MAX_RENDER_PIXELS = 4096 * 4096


def validate_render(msg: protocol.Message, params: dict[str, Any]) -> dict[str, Any]:
    gaussians = gaussians_from_message(msg.arrays)
    c2w = protocol.require_array(msg, protocol.C2W, ndim=3, trailing=(4, 4), kinds="f")
    intr = protocol.require_array(msg, protocol.INTRINSICS, ndim=2, trailing=(6,), kinds="f")
    protocol.validate_rig(c2w, intr)
    sizes = {(int(w), int(h)) for w, h in intr[:, 4:6]}
    if len(sizes) != 1:
        raise protocol.ProtocolError("bad_camera", "all cameras of a render job must share one "
                                     f"image size, got {sorted(sizes)}", protocol.INTRINSICS)
    (width, height), = sizes
    if width * height > MAX_RENDER_PIXELS:
        raise protocol.ProtocolError("too_large", f"image size {width}x{height} exceeds "
                                     f"{MAX_RENDER_PIXELS} pixels", protocol.INTRINSICS)
    near, far = params["near"], params["far"]
    if not near < far:
        raise protocol.ProtocolError("bad_camera", f"params.near ({near:g}) must be less than "
                                     f"params.far ({far:g})", "params.near")
    background = msg.arrays.get("background")
    if background is not None and (background.shape != (3,) or background.dtype.kind != "f"):
        raise protocol.ProtocolError("bad_array", "background must be 3 floats", "background")
    return {"gaussians": gaussians, "c2w": np.array(c2w, np.float32),
            "intrinsics": np.array(intr, np.float32), "near": near, "far": far,
            "rasterize_mode": params["rasterize_mode"],
            "background": None if background is None else np.array(background, np.float32)}


def run_render(ctx: JobContext, inputs: dict[str, Any]) -> None:
    import torch

    from backend.render import rasterize_gaussians

    num_cams = len(inputs["c2w"])
    background = inputs["background"]
    for i in range(num_cams):
        ctx.progress("render", i, num_cams, f"camera {i + 1} of {num_cams}")
        with torch.no_grad():
            out = rasterize_gaussians(
                inputs["gaussians"], inputs["c2w"][i:i + 1], inputs["intrinsics"][i:i + 1],
                near=inputs["near"], far=inputs["far"], device=ctx.device,
                rasterize_mode=inputs["rasterize_mode"],
                background=None if background is None else torch.from_numpy(background))
        ctx.result({"rgb": out.rgb[0].float().cpu().numpy(),
                    "alpha": out.alpha[0].float().cpu().numpy(),
                    "depth": out.depth[0].float().cpu().numpy()},
                   content="image", index=i, of=num_cams)
    ctx.progress("render", num_cams, num_cams, "done")


KIND = JobKind("render", "Gaussians + cameras (c2w [C,4,4], intrinsics [C,6]) -> rgb/alpha/depth "
               "per camera", validate_render, run_render)
