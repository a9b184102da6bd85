"""Job kind `convert`: `ply_to_gaussians`: PLY files (as bytes) -> Gaussians per timestep;
`gaussians_to_ply`: Gaussians per timestep -> PLY files (as bytes). The PLY sequence is written
into the job's cache folder too (gaussians/)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend import protocol
from backend.gaussians import GaussianSequence, ply_bytes, read_ply_bytes
from backend.kinds.base import JobKind
from backend.kinds.common import gaussians_from_message
from backend.worker import JobContext


def validate_convert(msg: protocol.Message, params: dict[str, Any]) -> dict[str, Any]:
    direction = params["direction"]
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
    raise protocol.ProtocolError("bad_field", "convert needs params.direction: "
                                 "'ply_to_gaussians' or 'gaussians_to_ply'", "params.direction")


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


KIND = JobKind("convert", "PLY sequence <-> Gaussians per timestep (params.direction)",
               validate_convert, run_convert)
