"""Gaussians per timestep, stored as the standard 3DGS PLY stores them, and PLY read/write.

Only numpy and the standard library are needed at import time; torch is imported inside the
methods that produce tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

SH_C0 = 0.28209479177387814
OPACITY_CLIP = 1e-6
FIELD_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh0", "sh_rest")
REST_COEFFS_TO_DEGREE = {3: 1, 8: 2, 15: 3}


def _as_float32(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Gaussians.{name}: expected a float array, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass
class Gaussians:
    """One timestep's 3D Gaussians in the raw (pre-activation) 3DGS parametrisation."""

    means: np.ndarray  # [N, 3] world positions
    quats: np.ndarray  # [N, 4] rotation (w, x, y, z), not necessarily normalised
    log_scales: np.ndarray  # [N, 3] natural log of the per-axis standard deviations
    opacity_logits: np.ndarray  # [N] inverse-sigmoid of the opacity
    sh0: np.ndarray  # [N, 3] DC spherical-harmonic coefficients (f_dc)
    sh_rest: np.ndarray | None = None  # [N, K, 3] higher SH bands, K = (deg+1)^2 - 1

    def __post_init__(self) -> None:
        for name in FIELD_NAMES:
            value = getattr(self, name)
            if name == "sh_rest" and value is None:
                continue
            setattr(self, name, _as_float32(name, value))
        if self.means.ndim != 2 or self.means.shape[1] != 3:
            raise ValueError(f"Gaussians.means: expected shape [N, 3], got {self.means.shape}")
        n = self.means.shape[0]
        expected = {"quats": (n, 4), "log_scales": (n, 3), "opacity_logits": (n,), "sh0": (n, 3)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"Gaussians.{name}: expected shape {list(shape)}, "
                    f"got {list(getattr(self, name).shape)}")
        if self.sh_rest is not None:
            rest = self.sh_rest
            if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3:
                raise ValueError(
                    f"Gaussians.sh_rest: expected shape [N={n}, K, 3], got {list(rest.shape)}")
            if rest.shape[1] == 0:
                self.sh_rest = None
            elif rest.shape[1] not in REST_COEFFS_TO_DEGREE:
                raise ValueError(
                    f"Gaussians.sh_rest: K={rest.shape[1]} is not 3, 8 or 15 (SH degree 1..3)")
        for name in FIELD_NAMES:
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                raise ValueError(f"Gaussians.{name}: contains NaN or infinite values")

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return 0 if self.sh_rest is None else REST_COEFFS_TO_DEGREE[self.sh_rest.shape[1]]

    @property
    def scales(self) -> np.ndarray:  # [N, 3]
        return np.exp(self.log_scales)

    @property
    def opacities(self) -> np.ndarray:  # [N]
        return (0.5 * (1.0 + np.tanh(0.5 * self.opacity_logits))).astype(np.float32)

    @property
    def colors(self) -> np.ndarray:  # [N, 3]
        return (0.5 + SH_C0 * self.sh0).astype(np.float32)

    @classmethod
    def from_activated(cls, means, quats, scales, opacities, colors, sh_rest=None) -> Gaussians:
        """Build from activated values: linear scales, opacities in [0, 1], RGB colours."""
        scales64 = _as_float32("scales", scales).astype(np.float64)
        if scales64.size and not (scales64 > 0).all():
            raise ValueError("Gaussians.scales: all scales must be positive")
        opac64 = _as_float32("opacities", opacities).astype(np.float64)
        opac64 = np.clip(opac64, OPACITY_CLIP, 1.0 - OPACITY_CLIP)
        colors64 = _as_float32("colors", colors).astype(np.float64)
        return cls(
            means=means,
            quats=quats,
            log_scales=np.log(scales64),
            opacity_logits=np.log(opac64) - np.log1p(-opac64),
            sh0=(colors64 - 0.5) / SH_C0,
            sh_rest=sh_rest,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Field name -> array; `sh_rest` is left out when there are no higher SH bands."""
        arrays = {name: getattr(self, name) for name in FIELD_NAMES}
        if self.sh_rest is None:
            del arrays["sh_rest"]
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Gaussians:
        unknown = sorted(set(arrays) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"Gaussians.from_arrays: unknown arrays {unknown}")
        missing = [name for name in FIELD_NAMES[:-1] if name not in arrays]
        if missing:
            raise ValueError(f"Gaussians.from_arrays: missing arrays {missing}")
        return cls(**{name: arrays.get(name) for name in FIELD_NAMES})

    def to_torch(self, device="cpu", dtype=None) -> dict:
        """Activated tensors for `rasterize`: means, quats (unit), scales, opacities, colors."""
        import torch

        dtype = torch.float32 if dtype is None else dtype

        def tensor(array: np.ndarray):
            return torch.as_tensor(np.ascontiguousarray(array), device=device).to(dtype)

        quats = tensor(self.quats)
        return {
            "means": tensor(self.means),
            "quats": torch.nn.functional.normalize(quats, dim=-1),
            "scales": torch.exp(tensor(self.log_scales)),
            "opacities": torch.sigmoid(tensor(self.opacity_logits)),
            "colors": 0.5 + SH_C0 * tensor(self.sh0),
        }

    def subset(self, mask_or_index) -> Gaussians:
        """The Gaussians selected by a boolean mask [N], an index array or a slice."""
        selector = mask_or_index
        if not isinstance(selector, slice):
            selector = np.asarray(selector)
            if selector.dtype == bool and selector.shape != (len(self),):
                raise ValueError(
                    f"Gaussians.subset: mask shape {list(selector.shape)} != [{len(self)}]")
            if selector.dtype != bool and not np.issubdtype(selector.dtype, np.integer):
                raise ValueError(f"Gaussians.subset: index dtype {selector.dtype} is not integer")
        return Gaussians(**{
            name: None if getattr(self, name) is None else getattr(self, name)[selector].copy()
            for name in FIELD_NAMES})

    @staticmethod
    def concat(items: Sequence[Gaussians]) -> Gaussians:
        """Concatenate Gaussians that share one SH degree."""
        items = list(items)
        if not items:
            raise ValueError("Gaussians.concat: empty list")
        degrees = {g.sh_degree for g in items}
        if len(degrees) != 1:
            raise ValueError(f"Gaussians.concat: mixed SH degrees {sorted(degrees)}")
        fields = {name: np.concatenate([getattr(g, name) for g in items])
                  for name in FIELD_NAMES[:-1]}
        if items[0].sh_rest is not None:
            fields["sh_rest"] = np.concatenate([g.sh_rest for g in items])
        return Gaussians(**fields)


# ---------------------------------------------------------------------------------------------
# PLY

PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
PLY_FORMATS = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "ascii"}


def _ply_property_names(num_rest: int) -> list[str]:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(num_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def ply_bytes(g: Gaussians) -> bytes:
    """The Gaussians as a binary little-endian 3DGS PLY file."""
    n = len(g)
    rest = np.zeros((n, 0), np.float32)
    if g.sh_rest is not None:  # channel-major: all K coefficients of R, then G, then B
        rest = g.sh_rest.transpose(0, 2, 1).reshape(n, -1)
    names = _ply_property_names(rest.shape[1])
    columns = np.concatenate([
        g.means, np.zeros((n, 3), np.float32), g.sh0, rest,
        g.opacity_logits[:, None], g.log_scales, g.quats], axis=1)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names]
    header.append("end_header\n")
    body = np.ascontiguousarray(columns, dtype="<f4").tobytes()
    return "\n".join(header).encode("ascii") + body


def write_ply(path: str | Path, g: Gaussians) -> Path:
    path = Path(path)
    path.write_bytes(ply_bytes(g))
    return path


@dataclass
class _PlyElement:
    name: str
    count: int
    properties: list[tuple[str, str]] = field(default_factory=list)  # (name, numpy type code)
    has_list: bool = False


def _parse_ply_header(data: bytes) -> tuple[str, list[_PlyElement], int]:
    """Format, elements and the byte offset where the body starts."""
    if not data:
        raise ValueError("PLY: the file is empty")
    if not data.startswith(b"ply"):
        raise ValueError("PLY: missing 'ply' magic at the start of the file")
    end = data.find(b"end_header")
    if end < 0:
        raise ValueError("PLY: header has no 'end_header' line")
    body_start = data.find(b"\n", end) + 1
    if body_start == 0:
        raise ValueError("PLY: truncated after 'end_header'")
    fmt, elements = None, []
    for line in data[:end].decode("latin-1").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] not in PLY_FORMATS:
                raise ValueError(f"PLY: unsupported format line {line!r}")
            fmt = PLY_FORMATS[words[1]]
        elif words[0] == "element" and len(words) == 3:
            if not words[2].isdigit():
                raise ValueError(f"PLY: bad element count in {line!r}")
            elements.append(_PlyElement(words[1], int(words[2])))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1].has_list = True
            elif len(words) == 3 and words[1] in PLY_TYPES:
                elements[-1].properties.append((words[2], PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"PLY: unsupported property line {line!r}")
        else:
            raise ValueError(f"PLY: unexpected header line {line!r}")
    if fmt is None:
        raise ValueError("PLY: header has no 'format' line")
    return fmt, elements, body_start


def _read_vertex_table(data: bytes) -> dict[str, np.ndarray]:
    fmt, elements, offset = _parse_ply_header(data)
    names = [e.name for e in elements]
    if "vertex" not in names:
        raise ValueError("PLY: no 'vertex' element in the header")
    vertex = elements[names.index("vertex")]
    if vertex.has_list:
        raise ValueError("PLY: list properties in the 'vertex' element are not supported")
    before = elements[:names.index("vertex")]
    if fmt == "ascii":
        lines = data[offset:].decode("latin-1").splitlines()
        skip = sum(e.count for e in before)
        rows = lines[skip:skip + vertex.count]
        if len(rows) < vertex.count:
            raise ValueError(f"PLY: truncated, {len(rows)} of {vertex.count} vertex lines")
        after = sum(e.count for e in elements[names.index("vertex") + 1:])
        extra = sum(1 for line in lines[skip + vertex.count:] if line.strip()) - after
        if extra > 0:
            raise ValueError(f"PLY: header 'element vertex {vertex.count}' is smaller than the "
                             f"data: {extra} more lines follow")
        width = len(vertex.properties)
        try:
            table = np.array([row.split()[:width] for row in rows], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"PLY: malformed ascii vertex line ({err})") from None
        if table.shape != (vertex.count, width):
            raise ValueError(f"PLY: ascii vertex lines do not have {width} values each")
        return {name: table[:, i] for i, (name, _) in enumerate(vertex.properties)}
    for element in before:
        if element.has_list:
            raise ValueError(f"PLY: cannot skip list element {element.name!r} before 'vertex'")
        offset += element.count * np.dtype([(p, fmt + t) for p, t in element.properties]).itemsize
    dtype = np.dtype([(p, fmt + t) for p, t in vertex.properties])
    needed = vertex.count * dtype.itemsize
    if len(data) - offset < needed:
        raise ValueError(
            f"PLY: truncated, vertex data needs {needed} bytes, found {max(len(data) - offset, 0)}")
    _check_no_extra_vertices(data, elements, names.index("vertex"), offset + needed, fmt)
    table = np.frombuffer(data, dtype=dtype, count=vertex.count, offset=offset)
    return {name: table[name] for name in dtype.names}


def _check_no_extra_vertices(data: bytes, elements: list[_PlyElement], index: int, end: int,
                             fmt: str) -> None:
    """A binary file longer than its header says (after the vertices and any fixed-size
    elements behind them) most likely has a vertex count that is too small."""
    after = elements[index + 1:]
    if any(e.has_list for e in after):
        return
    end += sum(e.count * np.dtype([(p, fmt + t) for p, t in e.properties]).itemsize
               for e in after)
    if len(data) > end:
        size = np.dtype([(p, fmt + t) for p, t in elements[index].properties]).itemsize
        raise ValueError(
            f"PLY: header 'element vertex {elements[index].count}' is smaller than the data: "
            f"{len(data) - end} more bytes follow ({(len(data) - end) / size:g} vertices)")


def _column_block(table: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    missing = [name for name in names if name not in table]
    if missing:
        raise ValueError(f"PLY: missing required vertex properties {missing}")
    return np.stack([table[name].astype(np.float32) for name in names], axis=1)


def read_ply_bytes(data: bytes) -> Gaussians:
    """Parse a 3DGS PLY (binary or ascii, any property order, extra properties ignored)."""
    table = _read_vertex_table(bytes(data))
    n = len(next(iter(table.values()))) if table else 0
    rest_ids = sorted(int(m.group(1)) for name in table
                      if (m := re.fullmatch(r"f_rest_(\d+)", name)))
    if rest_ids != list(range(len(rest_ids))) or len(rest_ids) % 3 != 0:
        raise ValueError(f"PLY: f_rest properties are not f_rest_0..f_rest_{{3K-1}}: {rest_ids}")
    sh_rest = None
    if rest_ids:
        rest = _column_block(table, [f"f_rest_{i}" for i in rest_ids])
        sh_rest = rest.reshape(n, 3, -1).transpose(0, 2, 1)
    _check_plausible(table)
    return Gaussians(
        means=_column_block(table, ["x", "y", "z"]),
        quats=_column_block(table, ["rot_0", "rot_1", "rot_2", "rot_3"]),
        log_scales=_column_block(table, ["scale_0", "scale_1", "scale_2"]),
        opacity_logits=_column_block(table, ["opacity"])[:, 0],
        sh0=_column_block(table, ["f_dc_0", "f_dc_1", "f_dc_2"]),
        sh_rest=sh_rest,
    )


# Values outside these bounds are not 3DGS parameters (a log-scale of 20 is a standard
# deviation of 5e8): such a file was written by another convention or is damaged.
PLAUSIBLE_RANGES = {"scale": (-30.0, 20.0), "opacity": (-100.0, 100.0), "f_dc": (-1e4, 1e4),
                    "f_rest": (-1e4, 1e4), "rot": (-np.inf, np.inf), "x": (-1e7, 1e7),
                    "y": (-1e7, 1e7), "z": (-1e7, 1e7)}


def _check_plausible(table: dict[str, np.ndarray]) -> None:
    """Raise naming the first property (and vertex) holding a non-finite or absurd value."""
    for name, column in table.items():
        prefix = re.sub(r"_\d+$", "", name)
        if prefix not in PLAUSIBLE_RANGES:
            continue
        low, high = PLAUSIBLE_RANGES[prefix]
        values = column.astype(np.float64)
        bad = ~np.isfinite(values) | (values < low) | (values > high)
        if bad.any():
            i = int(np.argmax(bad))
            limits = f" (expected {low:g}..{high:g})" if np.isfinite(high) else ""
            raise ValueError(f"PLY: property '{name}' of vertex {i} is {values[i]:g}{limits}; "
                             f"{int(bad.sum())} vertices hold such values")


def read_ply(path: str | Path) -> Gaussians:
    path = Path(path)
    try:
        return read_ply_bytes(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Sequences


@dataclass
class GaussianSequence:
    """Gaussians for consecutive timesteps, with the frame number of each."""

    frames: list[Gaussians]
    frame_numbers: list[int] | None = None

    def __post_init__(self) -> None:
        self.frames = list(self.frames)
        if self.frame_numbers is None:
            self.frame_numbers = list(range(len(self.frames)))
        self.frame_numbers = [int(n) for n in self.frame_numbers]
        if len(self.frame_numbers) != len(self.frames):
            raise ValueError(
                f"GaussianSequence.frame_numbers: {len(self.frame_numbers)} numbers "
                f"for {len(self.frames)} frames")
        if len(set(self.frame_numbers)) != len(self.frame_numbers):
            raise ValueError("GaussianSequence.frame_numbers: duplicate frame numbers")
        if any(n < 0 for n in self.frame_numbers):
            raise ValueError("GaussianSequence.frame_numbers: negative frame number")
        for i, frame in enumerate(self.frames):
            if not isinstance(frame, Gaussians):
                raise ValueError(f"GaussianSequence.frames[{i}]: not a Gaussians instance")

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Gaussians]:
        return iter(self.frames)

    def __getitem__(self, index: int) -> Gaussians:
        return self.frames[index]


def write_ply_sequence(folder: str | Path, seq: GaussianSequence) -> list[Path]:
    """Write `frame_0000.ply`, `frame_0001.ply` ... (named by frame number) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_ply(folder / f"frame_{number:04d}.ply", frame)
            for number, frame in zip(seq.frame_numbers, seq.frames, strict=True)]


def _frame_number(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise ValueError(f"PLY sequence: no frame number in file name {path.name!r}")
    return int(numbers[-1])


def read_ply_sequence(folder_or_paths: str | Path | Sequence[str | Path]) -> GaussianSequence:
    """Read a folder of PLY files (or a list of paths), ordered by the number in each name."""
    if isinstance(folder_or_paths, (str, Path)):
        folder = Path(folder_or_paths)
        if not folder.is_dir():
            raise ValueError(f"PLY sequence: {folder} is not a folder")
        paths = list(folder.glob("*.ply"))
    else:
        paths = [Path(p) for p in folder_or_paths]
    if not paths:
        raise ValueError(f"PLY sequence: no .ply files in {folder_or_paths}")
    paths.sort(key=lambda p: (_frame_number(p), p.name))
    for first, second in pairwise(paths):
        if _frame_number(first) == _frame_number(second):
            raise ValueError(f"PLY sequence: {first.name} and {second.name} have the same "
                             f"frame number {_frame_number(first)}")
    return GaussianSequence(frames=[read_ply(p) for p in paths],
                            frame_numbers=[_frame_number(p) for p in paths])
