"""The built-in job kinds that need no trained model: `render` and `convert`.

render:  one set of Gaussians + cameras -> one image per camera (rgb, alpha, depth).
convert: `ply_to_gaussians`: PLY files (as bytes) -> Gaussians per timestep;
         `gaussians_to_ply`: Gaussians per timestep -> PLY files (as bytes).
Both write their outputs into the job's cache folder too (a PLY sequence under gaussians/)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend import protocol
from backend.gaussians import Gaussians, GaussianSequence, ply_bytes, read_ply_bytes
from backend.jobs import JobContext, register

GAUSSIAN_FIELDS = ("means", "quats", "log_scales", "opacity_logits", "sh0", "sh_rest")
MAX_RENDER_PIXELS = 4096 * 4096


def gaussians_from_message(arrays: dict[str, np.ndarray], where: str = "") -> Gaussians:
    """Build a Gaussians container from wire arrays; ProtocolError naming what is wrong."""
    present = {k: v for k, v in arrays.items() if k in GAUSSIAN_FIELDS}
    try:
        return Gaussians.from_arrays(present)
    except (ValueError, KeyError, TypeError) as exc:
        raise protocol.ProtocolError("bad_input", f"{where}Gaussians: {exc}", "arrays") from None


# ----------------------------------------------------------------------------- render

def validate_render(msg: protocol.Message) -> dict[str, Any]:
    gaussians = gaussians_from_message(msg.arrays)
    c2w = protocol.require_array(msg, "c2w", ndim=3, trailing=(4, 4), kinds="f")
    intr = protocol.require_array(msg, "intrinsics", ndim=2, trailing=(6,), kinds="f")
    protocol.validate_rig(c2w, intr)
    sizes = {(int(w), int(h)) for w, h in intr[:, 4:6]}
    if len(sizes) != 1:
        raise protocol.ProtocolError("bad_camera", "all cameras of a render job must share one "
                                     f"image size, got {sorted(sizes)}", "intrinsics")
    (width, height), = sizes
    if width * height > MAX_RENDER_PIXELS:
        raise protocol.ProtocolError("too_large", f"image size {width}x{height} exceeds "
                                     f"{MAX_RENDER_PIXELS} pixels", "intrinsics")
    params = protocol.require(msg, "params", dict, {})
    near, far = params.get("near", 0.01), params.get("far", 1e10)
    if not (isinstance(near, int | float) and isinstance(far, int | float) and 0 < near < far):
        raise protocol.ProtocolError("bad_camera", "params near/far must be numbers with "
                                     "0 < near < far", "params")
    background = msg.arrays.get("background")
    if background is not None and (background.shape != (3,) or background.dtype.kind != "f"):
        raise protocol.ProtocolError("bad_array", "background must be 3 floats", "background")
    return {"gaussians": gaussians, "c2w": np.array(c2w, np.float32),
            "intrinsics": np.array(intr, np.float32), "near": float(near), "far": float(far),
            "background": None if background is None else np.array(background, np.float32)}


@register("render", "Gaussians + cameras (c2w [C,4,4], intrinsics [C,6]) -> rgb/alpha/depth "
          "per camera", validate_render)
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
                background=None if background is None else torch.from_numpy(background))
        ctx.result({"rgb": out.rgb[0].float().cpu().numpy(),
                    "alpha": out.alpha[0].float().cpu().numpy(),
                    "depth": out.depth[0].float().cpu().numpy()},
                   content="image", index=i, of=num_cams)
    ctx.progress("render", num_cams, num_cams, "done")


# ----------------------------------------------------------------------------- convert

def validate_convert(msg: protocol.Message) -> dict[str, Any]:
    params = protocol.require(msg, "params", dict, {})
    direction = params.get("direction")
    if direction == "ply_to_gaussians":
        names = sorted(k for k in msg.arrays if k.startswith("ply_"))
        if not names:
            raise protocol.ProtocolError("bad_input", "convert ply_to_gaussians needs arrays "
                                         "ply_0000, ply_0001, ... (uint8 PLY file bytes)",
                                         "arrays")
        for name in names:
            protocol.require_array(msg, name, ndim=1, kinds="u")
        return {"direction": direction, "plys": [msg.arrays[n] for n in names]}
    if direction == "gaussians_to_ply":
        steps = protocol.unpack_sequence(msg.arrays)
        if not steps:
            raise protocol.ProtocolError("bad_input", "convert gaussians_to_ply needs arrays "
                                         "t0000.means, t0000.quats, ... per timestep", "arrays")
        seq = [gaussians_from_message(a, f"timestep {t}: ") for t, a in enumerate(steps)]
        return {"direction": direction, "gaussians": seq}
    raise protocol.ProtocolError("bad_field", "params.direction must be 'ply_to_gaussians' or "
                                 f"'gaussians_to_ply', got {direction!r}", "params")


@register("convert", "PLY sequence <-> Gaussians per timestep (params.direction)",
          validate_convert)
def run_convert(ctx: JobContext, inputs: dict[str, Any]) -> None:
    from backend.gaussians import write_ply_sequence

    if inputs["direction"] == "ply_to_gaussians":
        plys = inputs["plys"]
        seq = []
        for t, data in enumerate(plys):
            ctx.progress("convert", t, len(plys), f"reading PLY {t + 1} of {len(plys)}")
            try:
                g = read_ply_bytes(bytes(data))
            except ValueError as exc:
                raise protocol.ProtocolError("bad_input", f"ply_{t:04d}: {exc}", "arrays") \
                    from None
            seq.append(g)
            ctx.result(g.to_arrays(), content="gaussians", index=t, of=len(plys), frame=t)
    else:
        seq = inputs["gaussians"]
        for t, g in enumerate(seq):
            ctx.progress("convert", t, len(seq), f"writing PLY {t + 1} of {len(seq)}")
            data = np.frombuffer(ply_bytes(g), dtype=np.uint8)
            ctx.result({"ply": data}, content="ply", index=t, of=len(seq), frame=t)
    write_ply_sequence(ctx.out_dir / "gaussians",
                       GaussianSequence(list(seq), list(range(len(seq)))))
    ctx.progress("convert", len(seq), len(seq), "done")
