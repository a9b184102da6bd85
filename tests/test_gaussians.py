"""Tests for the Gaussians container, 3DGS PLY I/O and PLY sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.gaussians import (
    SH_C0,
    Gaussians,
    GaussianSequence,
    ply_bytes,
    read_ply,
    read_ply_bytes,
    read_ply_sequence,
    write_ply,
    write_ply_sequence,
)

STANDARD_ORDER = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
TAIL_ORDER = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def random_gaussians(n: int, seed: int, sh_degree: int = 0) -> Gaussians:
    rng = np.random.default_rng(seed)
    rest = None
    if sh_degree:
        rest = rng.normal(size=(n, (sh_degree + 1) ** 2 - 1, 3)).astype(np.float32)
    return Gaussians(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        log_scales=rng.uniform(-5, -1, size=(n, 3)).astype(np.float32),
        opacity_logits=rng.normal(size=n).astype(np.float32),
        sh0=rng.normal(size=(n, 3)).astype(np.float32),
        sh_rest=rest,
    )


def assert_bit_exact(a: Gaussians, b: Gaussians) -> None:
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh0"):
        assert getattr(b, name).dtype == np.float32
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    if a.sh_rest is None:
        assert b.sh_rest is None
    else:
        assert a.sh_rest.tobytes() == np.ascontiguousarray(b.sh_rest).tobytes()


def header_properties(data: bytes) -> list[str]:
    header = data[:data.index(b"end_header")].decode("ascii").splitlines()
    return [line.split()[-1] for line in header if line.startswith("property")]


def custom_ply(columns: dict[str, tuple[str, np.ndarray]], fmt: str = "binary_little_endian",
               extra_element: bool = False) -> bytes:
    """A PLY written the way other tools might: any order, any types, any format."""
    n = len(next(iter(columns.values()))[1])
    lines = ["ply", f"format {fmt} 1.0", "comment written by a test", f"element vertex {n}"]
    lines += [f"property {ply_type} {name}" for name, (ply_type, _) in columns.items()]
    if extra_element:
        lines += ["element face 1", "property list uchar int vertex_indices"]
    lines.append("end_header")
    head = ("\n".join(lines) + "\n").encode("ascii")
    if fmt == "ascii":
        rows = zip(*(values.tolist() for _, values in columns.values()), strict=True)
        body = "".join(" ".join(repr(v) for v in row) + "\n" for row in rows).encode("ascii")
        return head + body + (b"3 0 1 2\n" if extra_element else b"")
    order = "<" if fmt == "binary_little_endian" else ">"
    codes = {"float": "f4", "double": "f8", "uchar": "u1", "int": "i4"}
    dtype = np.dtype([(name, order + codes[t]) for name, (t, _) in columns.items()])
    table = np.empty(n, dtype)
    for name, (_, values) in columns.items():
        table[name] = values
    face = np.array([3], "u1").tobytes() + np.array([0, 1, 2], order + "i4").tobytes()
    return head + table.tobytes() + (face if extra_element else b"")


def standard_columns(g: Gaussians) -> dict[str, np.ndarray]:
    columns = {"x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
               "opacity": g.opacity_logits}
    for i in range(3):
        columns[f"f_dc_{i}"] = g.sh0[:, i]
        columns[f"scale_{i}"] = g.log_scales[:, i]
    for i in range(4):
        columns[f"rot_{i}"] = g.quats[:, i]
    return columns


# --- PLY ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_ply_file_round_trip_is_bit_exact(tmp_path, sh_degree):
    g = random_gaussians(57, seed=sh_degree, sh_degree=sh_degree)
    path = write_ply(tmp_path / "scene.ply", g)
    back = read_ply(path)
    assert_bit_exact(g, back)
    assert back.sh_degree == sh_degree


def test_ply_bytes_round_trip_and_standard_layout():
    g = random_gaussians(9, seed=4, sh_degree=2)
    data = ply_bytes(g)
    assert data.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n")
    rest = [f"f_rest_{i}" for i in range(24)]
    assert header_properties(data) == STANDARD_ORDER + rest + TAIL_ORDER
    assert_bit_exact(g, read_ply_bytes(data))
    body = np.frombuffer(data[data.index(b"end_header\n") + 11:], "<f4").reshape(9, -1)
    assert np.array_equal(body[:, 3:6], np.zeros((9, 3)))  # normals written as zeros
    # f_rest is channel-major: f_rest_{c*K + k} holds coefficient k of channel c (K = 8)
    assert body[4, 9 + 1 * 8 + 5] == g.sh_rest[4, 5, 1]
    assert body[2, 9 + 2 * 8 + 0] == g.sh_rest[2, 0, 2]


def test_empty_gaussians_round_trip():
    g = random_gaussians(0, seed=5)
    back = read_ply_bytes(ply_bytes(g))
    assert len(back) == 0 and back.means.shape == (0, 3)


def test_reads_shuffled_properties_doubles_extras_and_trailing_elements():
    g = random_gaussians(12, seed=6, sh_degree=1)
    columns = {name: ("float", values) for name, values in standard_columns(g).items()}
    rest = g.sh_rest.transpose(0, 2, 1).reshape(12, -1)
    columns.update({f"f_rest_{i}": ("float", rest[:, i]) for i in range(9)})
    columns["x"] = ("double", g.means[:, 0].astype(np.float64))
    columns["red"] = ("uchar", np.arange(12, dtype=np.uint8))
    names = list(columns)
    order = np.random.default_rng(7).permutation(len(names))
    shuffled = {names[i]: columns[names[i]] for i in order}
    for fmt in ("binary_little_endian", "binary_big_endian"):
        back = read_ply_bytes(custom_ply(shuffled, fmt=fmt, extra_element=True))
        assert_bit_exact(g, back)


def test_reads_ascii_ply():
    g = random_gaussians(5, seed=8)
    columns = {name: ("float", values) for name, values in standard_columns(g).items()}
    columns["nx"] = ("float", np.zeros(5, np.float32))
    back = read_ply_bytes(custom_ply(columns, fmt="ascii", extra_element=True))
    assert_bit_exact(g, back)


def test_truncated_file_raises(tmp_path):
    data = ply_bytes(random_gaussians(20, seed=9))
    path = tmp_path / "cut.ply"
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        read_ply(path)
    ascii_data = custom_ply({n: ("float", v) for n, v in
                             standard_columns(random_gaussians(4, seed=9)).items()}, fmt="ascii")
    with pytest.raises(ValueError, match="truncated"):
        read_ply_bytes(ascii_data[:ascii_data.rindex(b"\n", 0, -1) + 1])


def test_missing_property_and_bad_header_raise():
    g = random_gaussians(3, seed=10)
    columns = {n: ("float", v) for n, v in standard_columns(g).items() if n != "rot_3"}
    with pytest.raises(ValueError, match="rot_3"):
        read_ply_bytes(custom_ply(columns))
    with pytest.raises(ValueError, match="magic"):
        read_ply_bytes(b"not a ply file")
    with pytest.raises(ValueError, match="end_header"):
        read_ply_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\n")
    gaps = dict(columns, rot_3=("float", g.quats[:, 3]), f_rest_1=("float", g.means[:, 0]))
    with pytest.raises(ValueError, match="f_rest"):
        read_ply_bytes(custom_ply(gaps))


# --- container ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("means", np.zeros((4, 2))),
    ("quats", np.zeros((4, 3))),
    ("log_scales", np.full((4, 3), np.nan)),
    ("opacity_logits", np.zeros(4, dtype=np.int64)),
    ("sh0", np.zeros((5, 3))),
    ("sh_rest", np.zeros((4, 5, 3))),
])
def test_validation_errors_name_the_field(field, value):
    arrays = random_gaussians(4, seed=11).to_arrays()
    arrays[field] = value
    with pytest.raises(ValueError, match=f"Gaussians.{field}"):
        Gaussians(**arrays)


def test_float64_inputs_become_float32():
    arrays = {k: v.astype(np.float64) for k, v in random_gaussians(6, seed=12).to_arrays().items()}
    g = Gaussians(**arrays)
    assert all(v.dtype == np.float32 for v in g.to_arrays().values())


def test_activated_round_trip():
    rng = np.random.default_rng(13)
    means = rng.normal(size=(50, 3))
    scales = rng.uniform(1e-3, 2.0, size=(50, 3))
    opacities = rng.uniform(0.0, 1.0, size=50)
    opacities[:2] = [0.0, 1.0]  # clipped to (1e-6, 1 - 1e-6)
    colors = rng.uniform(0.0, 1.0, size=(50, 3))
    g = Gaussians.from_activated(means, rng.normal(size=(50, 4)), scales, opacities, colors)
    assert np.allclose(g.scales, scales, rtol=1e-6)
    assert np.allclose(g.opacities, np.clip(opacities, 1e-6, 1 - 1e-6), atol=1e-6)
    assert np.allclose(g.colors, colors, atol=1e-6)
    assert np.allclose(g.colors, 0.5 + SH_C0 * g.sh0)
    with pytest.raises(ValueError, match="scales"):
        Gaussians.from_activated(means, np.ones((50, 4)), -scales, opacities, colors)


def test_to_torch_gives_activated_tensors():
    g = random_gaussians(10, seed=14, sh_degree=1)
    tensors = g.to_torch("cpu")
    assert set(tensors) == {"means", "quats", "scales", "opacities", "colors"}
    assert torch.allclose(tensors["quats"].norm(dim=-1), torch.ones(10))
    assert np.allclose(tensors["scales"].numpy(), g.scales, rtol=1e-6)
    assert np.allclose(tensors["opacities"].numpy(), g.opacities, atol=1e-6)
    assert np.allclose(tensors["colors"].numpy(), g.colors, atol=1e-6)
    assert tensors["means"].dtype == torch.float32


def test_arrays_round_trip_and_checks():
    g = random_gaussians(7, seed=15, sh_degree=3)
    assert_bit_exact(g, Gaussians.from_arrays(g.to_arrays()))
    plain = random_gaussians(7, seed=15)
    assert "sh_rest" not in plain.to_arrays()
    assert_bit_exact(plain, Gaussians.from_arrays(plain.to_arrays()))
    arrays = plain.to_arrays()
    del arrays["quats"]
    with pytest.raises(ValueError, match="quats"):
        Gaussians.from_arrays(arrays)
    with pytest.raises(ValueError, match="colour"):
        Gaussians.from_arrays(dict(plain.to_arrays(), colour=np.zeros(3)))


def test_subset_and_concat():
    g = random_gaussians(10, seed=16, sh_degree=1)
    mask = np.arange(10) % 3 == 0
    picked = g.subset(mask)
    assert len(picked) == 4 and np.array_equal(picked.means, g.means[mask])
    assert np.array_equal(g.subset([9, 0]).sh_rest, g.sh_rest[[9, 0]])
    joined = Gaussians.concat([g.subset(slice(0, 4)), g.subset(slice(4, 10))])
    assert_bit_exact(g, joined)
    with pytest.raises(ValueError, match="mask"):
        g.subset(np.ones(3, bool))
    with pytest.raises(ValueError, match="SH degrees"):
        Gaussians.concat([g, random_gaussians(2, seed=17)])
    with pytest.raises(ValueError, match="empty"):
        Gaussians.concat([])


# --- sequences ---------------------------------------------------------------------------------

def test_sequence_write_read(tmp_path):
    frames = [random_gaussians(5 + t, seed=20 + t, sh_degree=1) for t in range(3)]
    paths = write_ply_sequence(tmp_path / "seq", GaussianSequence(frames))
    assert [p.name for p in paths] == ["frame_0000.ply", "frame_0001.ply", "frame_0002.ply"]
    back = read_ply_sequence(tmp_path / "seq")
    assert back.frame_numbers == [0, 1, 2]
    for a, b in zip(frames, back, strict=True):
        assert_bit_exact(a, b)


def test_sequence_reads_paths_in_natural_order(tmp_path):
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    frames = {n: random_gaussians(3, seed=n) for n in (10, 2, 1)}
    paths = [write_ply(tmp_path / f"gs_{n}.ply", g) for n, g in frames.items()]
    seq = read_ply_sequence(paths)
    assert seq.frame_numbers == [1, 2, 10]
    assert_bit_exact(frames[10], seq[2])
    with pytest.raises(ValueError, match="frame number"):
        read_ply_sequence([write_ply(tmp_path / "cloud.ply", frames[1])])
    with pytest.raises(ValueError, match=r"no \.ply"):
        read_ply_sequence(empty_folder)
    with pytest.raises(ValueError, match="frame_numbers"):
        GaussianSequence(list(frames.values()), frame_numbers=[1, 2])

