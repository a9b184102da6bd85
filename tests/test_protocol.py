"""The wire protocol on its own: encode/decode round trips and validation errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend import protocol
from backend.protocol import ProtocolError, decode, encode
from support import ring_cameras

MESSAGES = {
    "hello": {"client": "blender 5.0.1"},
    "welcome": {"protocol": 1, "backend_version": "0.1.0", "device": "cpu",
                "job_kinds": {"render": "x"}, "models": {}, "limits": {"max_arrays": 4}},
    "submit": {"kind": "render", "params": {"near": 0.1}},
    "accepted": {"kind": "render", "position": 2},
    "progress": {"stage": "sampling", "step": 3, "of": 8, "message": "step 3"},
    "result": {"content": "gaussians", "index": 1, "of": 4},
    "error": {"code": "bad_camera", "message": "c2w at view 0 ...", "field": "c2w"},
    "cancel": {"scope": "job"},
    "cancelled": {},
    "done": {"results": 4, "cache_dir": "/tmp/x"},
    "fetch": {},
    "release": {},
    "released": {"models": 2},
}


def frames_as_bytes(frames):
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("msg_type", sorted(protocol.MESSAGE_TYPES))
def test_round_trip_every_message_type(msg_type):
    assert msg_type in MESSAGES, "every message type has a round-trip case"
    rng = np.random.default_rng(0)
    arrays = {"means": rng.normal(size=(5, 3)).astype(np.float32),
              "ids": np.arange(7, dtype=np.int64), "img": rng.integers(0, 255, (2, 3, 4),
                                                                     dtype=np.uint8),
              "half": np.ones((0, 3), np.float16)}
    frames = encode(msg_type, job="job-1", arrays=arrays, **MESSAGES[msg_type])
    msg = decode(frames_as_bytes(frames))
    assert msg.type == msg_type and msg.job == "job-1"
    assert msg.fields == MESSAGES[msg_type]
    assert list(msg.arrays) == list(arrays)
    for name, arr in arrays.items():
        assert msg.arrays[name].dtype == arr.dtype and msg.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(msg.arrays[name], arr)


def test_encode_is_zero_copy_and_decode_is_a_view():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = encode("result", arrays={"a": arr})
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), arr)
    buf = bytearray(bytes(frames[1]))
    msg = decode([frames[0], buf])
    assert np.shares_memory(msg.arrays["a"], np.frombuffer(buf, np.float32))


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian_c_order():
    arr = np.arange(6, dtype=">f4").reshape(2, 3).T
    msg = decode(frames_as_bytes(encode("result", arrays={"a": arr})))
    np.testing.assert_array_equal(msg.arrays["a"], arr)
    assert msg.arrays["a"].dtype == np.dtype("<f4")


def test_encode_refuses_pickle_only_dtypes_and_reserved_fields():
    with pytest.raises(ValueError, match="not allowed"):
        encode("result", arrays={"a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError, match="reserved"):
        encode("hello", arrays=None, **{"v": 3})
    with pytest.raises(ValueError, match="unknown message type"):
        encode("launch")


def header(**overrides):
    h = {"v": protocol.PROTOCOL_VERSION, "type": "hello", "job": None, "arrays": []}
    h.update(overrides)
    return json.dumps(h).encode()


@pytest.mark.parametrize("frames, code, field", [
    ([], "bad_header", None),
    ([b"\xff\xfe not json"], "bad_header", None),
    ([b"[1, 2, 3]"], "bad_header", None),
    ([header(v=99)], "bad_version", "v"),
    ([header(type="launch_missiles")], "unknown_type", "type"),
    ([header(job="../../etc")], "bad_field", "job"),
    ([header(arrays={"a": 1})], "bad_header", "arrays"),
    ([header(arrays=[{"name": "a", "dtype": "object", "shape": [1]}]), b"x"], "bad_array", "a"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [2]}]), b"1234"],
     "bad_array", "a"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [-1]}]), b""], "bad_array", "a"),
    ([header(arrays=[{"name": "a", "dtype": "float32", "shape": [1.5]}]), b""],
     "bad_array", "a"),
    ([header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1]}])], "bad_array", "arrays"),
    ([header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1]}] * 2), b"x", b"x"],
     "bad_array", "a"),
    ([header(arrays=[{"name": "bad name!", "dtype": "uint8", "shape": [1]}]), b"x"],
     "bad_array", "arrays"),
    ([header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1 << 40]}]), b""],
     "too_large", "a"),
    ([b'{"v": NaN}'], "bad_header", None),
    ([header(padding="x" * 70000)], "too_large", "header"),
])
def test_malformed_messages_raise_protocol_errors_naming_the_problem(frames, code, field):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code
    assert info.value.field == field
    assert info.value.message


def test_array_count_limit():
    limits = protocol.Limits(max_arrays=2)
    specs = [{"name": f"a{i}", "dtype": "uint8", "shape": [1]} for i in range(3)]
    with pytest.raises(ProtocolError) as info:
        decode([header(arrays=specs), b"x", b"x", b"x"], limits)
    assert info.value.code == "too_large"


def test_require_helpers():
    msg = decode(frames_as_bytes(encode("submit", kind="render", params={},
                                        arrays={"c2w": np.eye(4, dtype=np.float32)[None]})))
    assert protocol.require(msg, "kind", str) == "render"
    assert protocol.require(msg, "missing", int, 7) == 7
    with pytest.raises(ProtocolError, match="missing field 'missing'"):
        protocol.require(msg, "missing", int)
    with pytest.raises(ProtocolError, match="must be int"):
        protocol.require(msg, "kind", int)
    assert protocol.require_array(msg, "c2w", ndim=3, trailing=(4, 4)).shape == (1, 4, 4)
    with pytest.raises(ProtocolError, match="missing array 'K'"):
        protocol.require_array(msg, "K")
    with pytest.raises(ProtocolError, match="must end in dimensions"):
        protocol.require_array(msg, "c2w", trailing=(3, 3))


def test_validate_rig_accepts_a_real_rig_and_names_bad_cameras():
    c2w, intr = ring_cameras(4)
    rig_c2w = np.stack([c2w, c2w], axis=1)              # [V, T, 4, 4]
    rig_intr = np.stack([intr, intr], axis=1)           # [V, T, 6]
    near_far = np.tile([0.1, 100.0], (4, 2, 1))
    protocol.validate_rig(rig_c2w, rig_intr, near_far)

    bad = rig_c2w.copy()
    bad[2, 1, 0, 0] = np.nan
    with pytest.raises(ProtocolError, match=r"non-finite value at index \[2, 1, 0, 0\]"):
        protocol.validate_rig(bad, rig_intr)
    scaled = rig_c2w.copy()
    scaled[1, 0, :3, :3] *= 2.0
    with pytest.raises(ProtocolError, match="view 1, timestep 0 is not a rigid"):
        protocol.validate_rig(scaled, rig_intr)
    mirrored = rig_c2w.copy()
    mirrored[0, 1, :3, 0] *= -1
    with pytest.raises(ProtocolError, match="view 0, timestep 1"):
        protocol.validate_rig(mirrored, rig_intr)
    bad_intr = rig_intr.copy()
    bad_intr[3, 0, 4] = 31.5
    with pytest.raises(ProtocolError, match="intrinsics at view 3, timestep 0"):
        protocol.validate_rig(rig_c2w, bad_intr)
    with pytest.raises(ProtocolError, match="near_far at view 0, timestep 0"):
        protocol.validate_rig(rig_c2w, rig_intr, np.tile([1.0, 0.5], (4, 2, 1)))
    with pytest.raises(ProtocolError, match="intrinsics must have shape"):
        protocol.validate_rig(rig_c2w, rig_intr[:, :1])


def test_blender_opencv_conversion():
    # A Blender camera at (0, -5, 0) rotated 90 degrees about X looks down +Y (world).
    rot_x = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    blender = np.eye(4)
    blender[:3, :3] = rot_x
    blender[:3, 3] = [0, -5, 0]
    cv = protocol.blender_to_opencv_c2w(blender)
    # OpenCV looks down its +Z: the world direction of +Z must be +Y (towards the origin).
    np.testing.assert_allclose(cv[:3, 2], [0, 1, 0], atol=1e-12)
    # OpenCV +Y is image-down: world -Z (Blender's camera +Y is world +Z, i.e. image-up).
    np.testing.assert_allclose(cv[:3, 1], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(cv[:3, 0], blender[:3, 0])
    np.testing.assert_allclose(cv[:3, 3], blender[:3, 3])
    np.testing.assert_allclose(protocol.opencv_to_blender_c2w(cv), blender, atol=1e-12)


def test_blender_camera_at_rest_looks_down_world_minus_z():
    blender = np.eye(4)
    blender[:3, 3] = [1.0, 2.0, 3.0]
    cv = protocol.blender_to_opencv_c2w(blender)
    np.testing.assert_allclose(cv[:3, 2], [0, 0, -1])
    np.testing.assert_allclose(cv[:3, 1], [0, -1, 0])
    np.testing.assert_allclose(cv[:3, 3], blender[:3, 3])


def test_sequence_packing():
    steps = [{"means": np.zeros((2, 3), np.float32)}, {"means": np.ones((3, 3), np.float32)}]
    packed = protocol.pack_sequence(steps)
    assert sorted(packed) == ["t0000.means", "t0001.means"]
    unpacked = protocol.unpack_sequence({**packed, "c2w": np.eye(4)})
    assert [u["means"].shape for u in unpacked] == [(2, 3), (3, 3)]
    with pytest.raises(ProtocolError, match=r"not 0\.\.1"):
        protocol.unpack_sequence({"t0000.a": packed["t0000.means"], "t0002.a": packed[
            "t0001.means"]})


# ----------------------------------------------------------------- hostile headers

def hello_header(**fields):
    return [json.dumps({"v": 1, "type": "hello", "job": None, "arrays": [], **fields}).encode()]


@pytest.mark.parametrize("job", ["abc\n", "CON", "nul", "Com1", "LPT9", "a" * 65, "", "a b"])
def test_bad_job_ids_are_refused(job):
    with pytest.raises(ProtocolError) as err:
        decode(hello_header(job=job))
    assert (err.value.code, err.value.field) == ("bad_field", "job")


@pytest.mark.parametrize("name", ["means\n", "CON.txt", "aux", "a/b", "1a"])
def test_bad_array_names_are_refused(name):
    frames = [json.dumps({"v": 1, "type": "result", "job": None,
                          "arrays": [{"name": name, "dtype": "uint8", "shape": [1]}]}).encode(),
              b"\0"]
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.code == "bad_array"


@pytest.mark.parametrize("version", [True, 1.0, "1", [1]])
def test_only_the_integer_version_passes(version):
    frames = [json.dumps({"v": version, "type": "hello"}).encode()]
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.code == "bad_version"


def test_deeply_nested_json_is_a_bad_header():
    depth = 30_000
    raw = b'{"v": 1, "type": "hello", "x": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(ProtocolError) as err:
        decode([raw], protocol.Limits(max_header_bytes=len(raw)))
    assert err.value.code == "bad_header"


class NoCopyFrame:
    """A frame whose size is known but which must not be copied."""

    def __init__(self, size: int):
        self.buffer = memoryview(bytearray(1))
        self._size = size

    def __bytes__(self):
        raise AssertionError("the header was copied before its size was checked")


def test_header_size_is_checked_before_copying():
    frame = NoCopyFrame(10)
    frame.buffer = memoryview(bytearray(protocol.DEFAULT_LIMITS.max_header_bytes + 1))
    with pytest.raises(ProtocolError) as err:
        decode([frame])
    assert err.value.code == "too_large"


@pytest.mark.parametrize("address, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:1", True), ("ipc:///tmp/x", True), ("tcp://localhostx:1", False),
    ("tcp://127.evil.example:1", False), ("tcp://0.0.0.0:1", False),
    ("tcp://10.0.0.1:1", False), ("tcp://eth0:1", False)])
def test_is_loopback_matches_whole_hosts(address, loopback):
    from backend.server import is_loopback

    assert is_loopback(address) is loopback
