"""Property test: whatever malformed frames a peer sends, the server answers each message with
an `error` (code from the protocol's list) and still answers `hello` afterwards."""

from __future__ import annotations

import json

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend import protocol
from support import start_backend

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def raw_socket(tmp_path_factory):
    proc = start_backend(tmp_path_factory.mktemp("fuzz"))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(proc.address)
    yield sock
    sock.close()
    ctx.term()
    assert proc.stop() == 0, proc.log()


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _not_a_valid_header(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return True
    return not (isinstance(obj, dict) and obj.get("v") == protocol.PROTOCOL_VERSION)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
buffers = st.lists(st.binary(max_size=64), max_size=3)

garbage_header = st.tuples(st.binary(max_size=200).filter(_not_a_valid_header), buffers)
wrong_version = st.tuples(
    json_values.filter(lambda v: v != protocol.PROTOCOL_VERSION).map(
        lambda v: _json({"v": v, "type": "hello", "arrays": []})), buffers)
unknown_type = st.tuples(
    st.text(max_size=20).filter(lambda t: t not in protocol.MESSAGE_TYPES).map(
        lambda t: _json({"v": 1, "type": t, "arrays": []})), buffers)
server_only_type = st.tuples(
    st.sampled_from(sorted(protocol.SERVER_TYPES)).map(
        lambda t: _json({"v": 1, "type": t, "arrays": []})), buffers)
bad_dtype = st.tuples(
    st.text(max_size=10).filter(lambda d: d not in protocol.ALLOWED_DTYPES).map(
        lambda d: _json({"v": 1, "type": "submit", "kind": "render",
                         "arrays": [{"name": "a", "dtype": d, "shape": [1]}]})),
    st.just([b"\x00" * 8]))


@st.composite
def byte_count_mismatch(draw):
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    need = 4
    for d in shape:
        need *= d
    size = draw(st.integers(0, 300).filter(lambda n: n != need))
    head = _json({"v": 1, "type": "submit", "kind": "render",
                  "arrays": [{"name": "means", "dtype": "float32", "shape": shape}]})
    return head, [b"\x01" * size]


@st.composite
def bad_submit(draw):
    """Well-formed frames, bad content: missing/odd kind or params, junk arrays."""
    kind = draw(st.one_of(st.none(), st.integers(), st.text(max_size=10)))
    fields = {"v": 1, "type": "submit", "arrays": []}
    if kind is not None:
        fields["kind"] = kind
    if draw(st.booleans()):
        fields["params"] = draw(json_values)
    return _json(fields), []


malformed = st.one_of(garbage_header, wrong_version, unknown_type, server_only_type,
                      bad_dtype, byte_count_mismatch(), bad_submit())


def exchange(sock: zmq.Socket, frames: list[bytes]) -> protocol.Message:
    sock.send_multipart(frames)
    assert sock.poll(TIMEOUT_MS), "no reply: the server must answer every message"
    return protocol.decode(sock.recv_multipart())


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(message=malformed)
def test_malformed_frames_always_get_an_error_reply(raw_socket, message):
    head, rest = message
    reply = exchange(raw_socket, [head, *rest])
    assert reply.type == "error", reply
    assert reply["code"] in protocol.ERROR_CODES
    assert isinstance(reply["message"], str) and reply["message"]


def test_server_still_answers_hello_after_the_fuzzing(raw_socket):
    reply = exchange(raw_socket, [_json({"v": 1, "type": "hello", "arrays": []})])
    assert reply.type == "welcome"
