"""Job parameters: one schema per job kind, declared once, checked on every submit.

Each job kind declares its `params` as a `ParamSchema` of `Param`s (name, type, default,
bounds or choices, a one-line doc). The server validates every submit against it: an unknown
name (a typo like `guidence`), a wrong type or a value out of bounds is an error reply naming
the field and what it allows; nothing is silently ignored. The add-on builds its property
bounds from the same schemas and the README's parameter table is generated from them.

Standard library only (and the protocol module beside it): the add-on vendors this file.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from . import protocol

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class Param:
    """One job parameter. `default` None means "not given" (the job decides, e.g. the first
    shipped model); `low`/`high` bound numbers (inclusive); `choices` lists allowed strings."""

    name: str
    type: str  # "int" | "float" | "str" | "bool"
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"Param {self.name}: type must be one of {sorted(TYPES)}")
        if self.default is not None:
            self.check(self.default)

    def allowed(self) -> str:
        """What the parameter accepts, in words ("an integer in [1, 1000]")."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        noun = {"int": "an integer", "float": "a number", "str": "a non-empty string",
                "bool": "true or false"}[self.type]
        low, high = (None if v is None else self.show(v) for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"{noun} in [{low}, {high}]"
        if low is not None:
            return f"{noun} >= {low}"
        if high is not None:
            return f"{noun} <= {high}"
        return noun

    def show(self, value: Any) -> str:
        """A value of this parameter as the README and error messages write it."""
        if self.type == "int":
            return str(int(value))
        if self.type == "float":
            return f"{float(value):g}"
        return repr(value)

    def check(self, value: Any) -> Any:
        """`value` as this parameter's type; ProtocolError naming the field otherwise."""
        given = value
        if self.type == "bool":
            ok = isinstance(value, bool)
        elif self.type == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type == "float":
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str) and bool(value)
        if ok and self.low is not None and value < self.low:
            ok = False
        if ok and self.high is not None and value > self.high:
            ok = False
        if ok and self.choices is not None and value not in self.choices:
            ok = False
        if not ok:
            raise protocol.ProtocolError("bad_field", f"params.{self.name} must be "
                                         f"{self.allowed()}, got {given!r}", f"params.{self.name}")
        return value


@dataclass(frozen=True)
class ParamSchema:
    """The parameters of one job kind."""

    params: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")

    def __getitem__(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(name)

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, given: Any, kind: str = "this job kind") -> dict[str, Any]:
        """Every declared parameter: the given value (checked) or its default. ProtocolError
        for a non-object, an unknown name (with the nearest known one) or a bad value."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise protocol.ProtocolError("bad_field", f"params must be an object, got "
                                         f"{type(given).__name__}", "params")
        known = self.names()
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise protocol.ProtocolError(
                    "bad_field", f"params.{name}: unknown parameter for {kind}{hint}; it takes "
                    f"{', '.join(known) if known else 'no parameters'}", f"params.{name}")
        out = self.defaults()
        for name, value in given.items():
            out[name] = self[name].check(value)
        return out


def markdown_table(schemas: dict[str, ParamSchema]) -> str:
    """The parameter table of the README: one row per (job kind, parameter)."""
    rows = ["| kind | parameter | type | default | allowed | what it does |",
            "| --- | --- | --- | --- | --- | --- |"]
    for kind, schema in schemas.items():
        for p in schema.params:
            default = "-" if p.default is None else f"`{p.show(p.default)}`"
            rows.append(f"| `{kind}` | `{p.name}` | {p.type} | {default} | {p.allowed()} | "
                        f"{p.doc} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ the job kinds' schemas

_MODEL_PARAMS = {
    "diffusion_model": Param("diffusion_model", "str", None, "diffusion checkpoint by name "
                             "(`hello` lists them); default: the first shipped one"),
    "recon_model": Param("recon_model", "str", None, "reconstruction checkpoint by name; "
                         "default: the first shipped one"),
}
_SEED = Param("seed", "int", 0, "seed of the sampler's noise and of the fit", 0, 2**63 - 1)
_FIT_PARAMS = (
    Param("fit", "str", "default", "the fitting stage's preset: Gaussians optimised against "
          "the frames (`off`: the feed-forward reconstruction alone)",
          choices=("off", "fast", "default", "quality")),
    Param("fit_seconds", "float", 0.0, "time budget of the fitting stage (0: the preset's "
          "step counts)", 0.0, 86400.0),
    Param("fit_resolution", "int", 512, "longest side the frames are fitted at (larger "
          "frames are downsampled)", 16, 4096),
    Param("min_opacity", "float", 0.0, "drop Gaussians below this opacity", 0.0, 0.99),
    Param("fit_init", "str", "stereo", "where the fit's first Gaussians come from: plane-sweep "
          "stereo on the rig (`stereo`), plus the feed-forward reconstruction's Gaussians "
          "where they agree with the frames (`stereo+recon`)",
          choices=("stereo", "stereo+recon")),
)
_RECON_PARAMS = (*_FIT_PARAMS, _MODEL_PARAMS["recon_model"])

JOB_PARAMS: dict[str, ParamSchema] = {
    "generate": ParamSchema((
        _SEED,
        Param("steps", "int", 1, "denoising steps (the shipped tiny model is best at 1)",
              1, 1000),
        Param("guidance", "float", 1.0, "classifier-free guidance scale (1 = off)", 0.0, 100.0),
        Param("shift", "float", 1.0, "timestep shift of the sampler's schedule", 1e-3, 1e3),
        *_RECON_PARAMS,
        Param("generated_weight", "float", 0.25, "weight of the generated frames in the fit "
              "(the given frames weigh 1)", 0.0, 1.0),
        _MODEL_PARAMS["diffusion_model"],
        Param("video_path", "str", None, "a movie file on the backend's machine to read the "
              "input video from, instead of the `video` array"),
        Param("fps", "float", 8.0, "frame rate of the grid preview video", 0.1, 1000.0),
    )),
    "reconstruct": ParamSchema((_SEED, *_RECON_PARAMS)),
    "render": ParamSchema((
        Param("near", "float", 0.01, "near clipping distance", 1e-9, 1e12),
        Param("far", "float", 1e10, "far clipping distance (greater than near)", 1e-9, 1e12),
        Param("rasterize_mode", "str", "classic",
              "the 0.3 px screen-space blur at full opacity (classic, as 3DGS) or with its "
              "opacity compensation (antialiased: how the fitting stage renders; a job's "
              "fit.json names the mode of its Gaussians)", choices=("classic", "antialiased")),
    )),
    "convert": ParamSchema((
        Param("direction", "str", None, "what to convert (required)",
              choices=("ply_to_gaussians", "gaussians_to_ply")),
    )),
}
