"""Wire protocol between the Blender add-on and the backend (ZeroMQ multipart messages).

Frame 0 is a UTF-8 JSON header::

    {"v": PROTOCOL_VERSION, "type": "...", "job": "..." | null,
     "arrays": [{"name": ..., "dtype": ..., "shape": [...]}, ...], ...type-specific fields}

then one raw C-ordered little-endian buffer per entry of ``arrays``, sent without copying.
Nothing is ever pickled.

Cameras on the wire use the **OpenCV convention**: a 4x4 camera-to-world matrix per view and
timestep (camera looks down +Z, +Y down, +X right; world units as in the Blender scene) and
intrinsics ``(fx, fy, cx, cy, width, height)`` in pixels, pixel (0, 0) covering [0, 1]^2.
`blender_to_opencv_c2w` converts Blender's camera matrices (looking down -Z, +Y up).

This module needs only numpy and the standard library: the Blender add-on vendors this very
file (a test checks the copies are identical).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1

# Client -> server and server -> client message types.
CLIENT_TYPES = frozenset({"hello", "submit", "cancel", "fetch", "release"})
SERVER_TYPES = frozenset({"welcome", "accepted", "progress", "result", "error", "cancelled",
                          "done", "released"})
MESSAGE_TYPES = CLIENT_TYPES | SERVER_TYPES

# Names of the camera arrays a job carries (the wire's one definition): OpenCV camera-to-world
# matrices [..., 4, 4], intrinsics [..., 6] (fx, fy, cx, cy, width, height) in pixels, and
# optional near/far clipping distances [..., 2]. A rig is [V, T, ...]: views x timesteps.
C2W, INTRINSICS, NEAR_FAR = "c2w", "intrinsics", "near_far"

ALLOWED_DTYPES = frozenset({"uint8", "int32", "int64", "float16", "float32", "float64"})

# Error codes a server may send (machine-readable; the message is for humans).
ERROR_CODES = frozenset({
    "bad_header",     # frame 0 is not a JSON object of the right shape
    "bad_version",    # protocol version mismatch
    "unknown_type",   # message type not known
    "bad_field",      # a header field is missing or has the wrong type/value
    "bad_array",      # array spec or buffer does not match (dtype, shape, byte count)
    "too_large",      # a size limit was exceeded
    "bad_camera",     # camera matrix / intrinsics / near-far invalid
    "bad_input",      # the job's inputs are inconsistent (sizes, missing arrays)
    "unknown_kind",   # job kind not provided by this backend
    "unknown_job",    # fetch/cancel of a job id the backend does not know
    "duplicate_job",  # submit with a job id already in use
    "job_failed",     # the job raised while running
    "queue_full",     # the queue (in total or of this client) is at its limit
    "unavailable",    # the backend cannot run jobs now (its worker stopped, its disk is full)
    "cache_corrupt",  # a stored result does not match its checksum
    "internal",       # a bug in the backend; the server keeps serving
})

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_JOB_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Names Windows reserves for devices in any folder (also with an extension): a job id names
# a folder of the result cache, so none of them is accepted as an id or an array name.
_DEVICE_RE = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|COM[0-9\u00b9\u00b2\u00b3]|"
                        r"LPT[0-9\u00b9\u00b2\u00b3])(\..*)?", re.IGNORECASE)


def is_windows_device_name(name: str) -> bool:
    return _DEVICE_RE.fullmatch(name) is not None


def is_valid_id(value: Any) -> bool:
    """A job id or request reference: 1-64 of [A-Za-z0-9_-], not a Windows device name."""
    return (isinstance(value, str) and _JOB_RE.fullmatch(value) is not None
            and not is_windows_device_name(value))


@dataclass(frozen=True)
class Limits:
    """Size limits enforced when decoding (the server announces them in `welcome`)."""

    max_header_bytes: int = 64 * 1024
    max_arrays: int = 256
    max_ndim: int = 8
    max_array_bytes: int = 1 << 31      # 2 GiB per array
    max_total_bytes: int = 4 << 30      # 4 GiB per message

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


DEFAULT_LIMITS = Limits()


class ProtocolError(Exception):
    """A message that cannot be accepted. `code` is one of ERROR_CODES; `field` names the
    offending header field or array when there is one."""

    def __init__(self, code: str, message: str, field: str | None = None):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass
class Message:
    """A decoded message: its type, job id, the other header fields, and named arrays."""

    type: str
    job: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


# ----------------------------------------------------------------------------- encoding

_RESERVED = frozenset({"v", "type", "job", "arrays"})


def encode(msg_type: str, job: str | None = None, arrays: dict[str, np.ndarray] | None = None,
           **fields: Any) -> list[bytes | memoryview]:
    """Build the frames of one message. Array buffers are memoryviews of the (contiguous,
    little-endian) arrays themselves: send them with ``copy=False`` to avoid any copy."""
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {msg_type!r}")
    clash = _RESERVED & fields.keys()
    if clash:
        raise ValueError(f"fields {sorted(clash)} are reserved header keys")
    specs, buffers = [], []
    for name, arr in (arrays or {}).items():
        arr = np.asarray(arr)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r}: dtype {arr.dtype} is not allowed on the wire")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        specs.append({"name": name, "dtype": dtype.name, "shape": list(arr.shape)})
        buffers.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    header = {"v": PROTOCOL_VERSION, "type": msg_type, "job": job, "arrays": specs, **fields}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return [head, *buffers]


def error_frames(code: str, message: str, job: str | None = None,
                 field_name: str | None = None, **extra: Any) -> list[bytes | memoryview]:
    """An `error` message; `extra` fields with value None are left out."""
    extra = {k: v for k, v in extra.items() if v is not None}
    return encode("error", job=job, code=code, message=message, field=field_name, **extra)


# ----------------------------------------------------------------------------- decoding

def _frame_size(frame: Any) -> int:
    """Byte size of a frame without copying it."""
    if hasattr(frame, "buffer"):  # a zmq.Frame
        return frame.buffer.nbytes
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    try:
        return memoryview(frame).nbytes
    except TypeError:
        raise ProtocolError("bad_header", f"frame 0 is a {type(frame).__name__}, not "
                            "bytes") from None


def _parse_header(frame: Any, limits: Limits) -> dict[str, Any]:
    size = _frame_size(frame)  # checked before the frame is copied
    if size > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header is {size} bytes, limit "
                            f"{limits.max_header_bytes}", "header")
    raw = bytes(frame)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_header", f"frame 0 is not a UTF-8 JSON header: {exc}") from None
    except RecursionError:
        raise ProtocolError("bad_header", "frame 0 nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "frame 0 must be a JSON object")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        raise ProtocolError("bad_version", f"protocol version {version!r} is not "
                            f"supported (this side speaks {PROTOCOL_VERSION})", "v")
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or msg_type not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {msg_type!r}", "type")
    job = header.get("job")
    if job is not None and not is_valid_id(job):
        raise ProtocolError("bad_field", "job id must be 1-64 characters of [A-Za-z0-9_-] "
                            "(and not a Windows device name)", "job")
    return header


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_array_specs(specs: Any, limits: Limits) -> list[tuple[str, np.dtype, tuple]]:
    if not isinstance(specs, list):
        raise ProtocolError("bad_header", "'arrays' must be a list", "arrays")
    if len(specs) > limits.max_arrays:
        raise ProtocolError("too_large", f"{len(specs)} arrays, limit {limits.max_arrays}",
                            "arrays")
    parsed, names, total = [], set(), 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ProtocolError("bad_array", f"arrays[{i}] must be an object", "arrays")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if (not isinstance(name, str) or not _NAME_RE.fullmatch(name)
                or is_windows_device_name(name)):
            raise ProtocolError("bad_array", f"arrays[{i}] has an invalid name {name!r}",
                                "arrays")
        if name in names:
            raise ProtocolError("bad_array", f"array {name!r} appears twice", name)
        names.add(name)
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError("bad_array", f"array {name!r}: dtype {dtype!r} not allowed "
                                f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))})", name)
        if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError("bad_array", f"array {name!r}: shape must be a list of at most "
                                f"{limits.max_ndim} non-negative integers", name)
        dt = np.dtype(dtype).newbyteorder("<")
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > limits.max_array_bytes:
            raise ProtocolError("too_large", f"array {name!r} is {nbytes} bytes, limit "
                                f"{limits.max_array_bytes}", name)
        total += nbytes
        if total > limits.max_total_bytes:
            raise ProtocolError("too_large", f"message arrays exceed {limits.max_total_bytes} "
                                "bytes", name)
        parsed.append((name, dt, tuple(shape)))
    return parsed


def decode(frames: list[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and validate the frames of one message (bytes, memoryviews or zmq Frames).

    Arrays are read-only zero-copy views of the frames. Raises ProtocolError on anything
    malformed; never anything else for bad input."""
    if not frames:
        raise ProtocolError("bad_header", "empty message")
    header = _parse_header(frames[0], limits)
    specs = _parse_array_specs(header.get("arrays", []), limits)
    if len(frames) - 1 != len(specs):
        raise ProtocolError("bad_array", f"header lists {len(specs)} arrays but "
                            f"{len(frames) - 1} buffers follow", "arrays")
    arrays = {}
    for (name, dt, shape), frame in zip(specs, frames[1:]):
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        expected = math.prod(shape) * dt.itemsize
        if buf.nbytes != expected:
            raise ProtocolError("bad_array", f"array {name!r}: buffer has {buf.nbytes} bytes, "
                                f"dtype {dt.name} shape {list(shape)} needs {expected}", name)
        arrays[name] = np.frombuffer(buf, dtype=dt).reshape(shape) if expected else \
            np.zeros(shape, dtype=dt)
    fields = {k: v for k, v in header.items() if k not in _RESERVED}
    return Message(type=header["type"], job=header.get("job"), fields=fields, arrays=arrays)


# ----------------------------------------------------------------------------- field checks

def require(msg: Message, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Return header field `key` checked to be of `kind`; ProtocolError('bad_field') if not."""
    if key not in msg.fields:
        if default is not ...:
            return default
        raise ProtocolError("bad_field", f"{msg.type}: missing field {key!r}", key)
    value = msg.fields[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError("bad_field", f"{msg.type}: field {key!r} must not be a boolean", key)
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ProtocolError("bad_field", f"{msg.type}: field {key!r} must be {names}, got "
                            f"{type(value).__name__}", key)
    return value


def require_array(msg: Message, name: str, ndim: int | None = None,
                  trailing: tuple[int, ...] = (), kinds: str = "fiu") -> np.ndarray:
    """Return array `name` checked for presence, rank, trailing dims and dtype kind."""
    if name not in msg.arrays:
        raise ProtocolError("bad_input", f"{msg.type}: missing array {name!r}", name)
    arr = msg.arrays[name]
    if ndim is not None and arr.ndim != ndim:
        raise ProtocolError("bad_array", f"array {name!r} must have {ndim} dimensions, got "
                            f"shape {list(arr.shape)}", name)
    if trailing and tuple(arr.shape[-len(trailing):]) != trailing:
        raise ProtocolError("bad_array", f"array {name!r} must end in dimensions "
                            f"{list(trailing)}, got shape {list(arr.shape)}", name)
    if arr.dtype.kind not in kinds:
        raise ProtocolError("bad_array", f"array {name!r} has dtype {arr.dtype.name}", name)
    return arr


# ----------------------------------------------------------------------------- cameras

# Blender cameras look down -Z with +Y up; OpenCV cameras look down +Z with +Y down. The two
# camera frames differ by a rotation of 180 degrees about the camera's X axis.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def blender_to_opencv_c2w(c2w: np.ndarray) -> np.ndarray:
    """[..., 4, 4] Blender camera-to-world (matrix_world, scale removed) -> OpenCV c2w."""
    c2w = np.asarray(c2w, dtype=np.float64)
    return c2w @ _FLIP_YZ


def opencv_to_blender_c2w(c2w: np.ndarray) -> np.ndarray:
    """[..., 4, 4] OpenCV camera-to-world -> Blender camera-to-world (the inverse map)."""
    return np.asarray(c2w, dtype=np.float64) @ _FLIP_YZ


def validate_rig(c2w: np.ndarray, intrinsics: np.ndarray, near_far: np.ndarray | None = None,
                 prefix: str = "") -> None:
    """Check cameras: c2w [..., 4, 4] rigid OpenCV camera-to-world (a rig is [V, T, 4, 4]),
    intrinsics [..., 6] (fx, fy, cx, cy, width, height), near_far [..., 2], all with the same
    leading dimensions. Raises ProtocolError('bad_camera') naming the first bad camera."""
    c2w = np.asarray(c2w, dtype=np.float64)
    intr = np.asarray(intrinsics, dtype=np.float64)
    if c2w.ndim < 3 or c2w.shape[-2:] != (4, 4):
        raise ProtocolError("bad_camera", f"{prefix}c2w must have shape [..., 4, 4], got "
                            f"{list(c2w.shape)}", prefix + C2W)
    lead = c2w.shape[:-2]
    if intr.shape != (*lead, 6):
        raise ProtocolError("bad_camera", f"{prefix}intrinsics must have shape "
                            f"{[*lead, 6]}, got {list(intr.shape)}", prefix + INTRINSICS)
    _check_finite(c2w, prefix + C2W)
    _check_finite(intr, prefix + INTRINSICS)
    bottom_ok = np.abs(c2w[..., 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=-1) < 1e-5
    rot = c2w[..., :3, :3]
    ortho = np.abs(np.swapaxes(rot, -1, -2) @ rot - np.eye(3)).max(axis=(-1, -2)) < 1e-3
    det_ok = np.linalg.det(rot) > 0
    _first_bad(bottom_ok & ortho & det_ok, prefix + C2W,
               "is not a rigid camera-to-world matrix (bottom row [0,0,0,1], orthonormal "
               "rotation, det +1; remove object scale before sending)")
    size_ok = ((intr[..., 0] > 0) & (intr[..., 1] > 0) & (intr[..., 4] >= 1)
               & (intr[..., 5] >= 1) & (intr[..., 4] == np.round(intr[..., 4]))
               & (intr[..., 5] == np.round(intr[..., 5])))
    _first_bad(size_ok, prefix + INTRINSICS,
               "needs fx, fy > 0 and a positive integer width and height")
    if near_far is not None:
        nf = np.asarray(near_far, dtype=np.float64)
        if nf.shape != (*lead, 2):
            raise ProtocolError("bad_camera", f"{prefix}near_far must have shape "
                                f"{[*lead, 2]}, got {list(nf.shape)}", prefix + NEAR_FAR)
        _check_finite(nf, prefix + NEAR_FAR)
        _first_bad((nf[..., 0] > 0) & (nf[..., 1] > nf[..., 0]), prefix + NEAR_FAR,
                   "needs 0 < near < far")


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.isfinite(arr).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ProtocolError("bad_camera", f"{name} has a non-finite value at index "
                            f"{list(idx)}", name)


def _first_bad(ok: np.ndarray, name: str, what: str) -> None:
    if not ok.all():
        idx = [int(i) for i in np.argwhere(~ok)[0]]
        where = f"view {idx[0]}, timestep {idx[1]}" if len(idx) == 2 else f"index {idx}"
        raise ProtocolError("bad_camera", f"{name} at {where} {what}", name)


# ----------------------------------------------------------------------------- sequences

def pack_sequence(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several timesteps' arrays in one message: {"t0000.means": ..., "t0001.means": ...}."""
    return {f"t{t:04d}.{name}": arr for t, item in enumerate(items) for name, arr in item.items()}


def unpack_sequence(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Inverse of `pack_sequence`; arrays without a tNNNN. prefix are ignored."""
    items: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        m = re.fullmatch(r"t(\d{4,})\.(.+)", key)
        if m:
            items.setdefault(int(m.group(1)), {})[m.group(2)] = arr
    if sorted(items) != list(range(len(items))):
        raise ProtocolError("bad_input", f"timesteps {sorted(items)} are not 0..{len(items) - 1}",
                            "arrays")
    return [items[t] for t in range(len(items))]
