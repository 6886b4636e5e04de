"""The frames between the sandboxed processes and the lab (harness.wire).

The lab reads frames written by code it does not trust: whatever arrives, reading it ends in a
message, a clean None, or a WireError, and never in another exception, a hang, or an allocation
sized by what the peer announced rather than by what it sent.
"""
from __future__ import annotations

import json
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from autoresearch.harness import wire
from autoresearch.harness.wire import Kind, WireError

PATIENCE = 10.0  # seconds a read may block before the test calls it a hang


@pytest.fixture
def pair():
    """Two connected Unix stream sockets: (writer, reader); the reader gives up after PATIENCE."""
    writer, reader = socket.socketpair()
    reader.settimeout(PATIENCE)
    yield writer, reader
    writer.close()
    reader.close()


def frame(header: bytes, payload: bytes = b"") -> bytes:
    """A frame as it goes on the wire, however malformed its header."""
    return struct.pack("<I", len(header)) + header + payload


def header(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_message_arrives_as_it_was_sent(pair):
    writer, reader = pair
    wire.send(writer, Kind.BATCH, rows=16, seed=7, note="ünïcode")
    message = wire.receive(reader)
    assert message.kind is Kind.BATCH
    assert message.fields == {"rows": 16, "seed": 7, "note": "ünïcode"}
    assert message.payload == b""


def test_payloads_arrive_byte_for_byte_in_order(pair):
    writer, reader = pair
    rows = np.arange(3 * 257, dtype=np.uint16).reshape(3, 257)
    big = bytes(range(256)) * 20_000  # 5 MB: more than one read of the socket
    sender = threading.Thread(target=lambda: [wire.send(writer, Kind.ROWS, rows.tobytes(), epoch=0, training=True),
                                              wire.send(writer, Kind.CHECKPOINT, memoryview(big), stats={"a": 1}),
                                              wire.send(writer, Kind.START)])
    sender.start()
    first, second, third = (wire.receive(reader) for _ in range(3))
    sender.join()
    assert first.kind is Kind.ROWS and first.fields == {"epoch": 0, "training": True}
    assert np.array_equal(np.frombuffer(first.payload, dtype=np.uint16).reshape(3, 257), rows)
    assert second.kind is Kind.CHECKPOINT and second.payload == big and second.fields == {"stats": {"a": 1}}
    assert third.kind is Kind.START and third.payload == b""


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(pair, kind):
    writer, reader = pair
    wire.send(writer, kind, b"x")
    message = wire.receive(reader)
    assert (message.kind, message.payload) == (kind, b"x")
    assert str(kind) == kind.value


def test_a_clean_close_between_frames_is_none(pair):
    writer, reader = pair
    wire.send(writer, Kind.START)
    writer.close()
    assert wire.receive(reader).kind is Kind.START
    assert wire.receive(reader) is None


def test_a_header_over_the_limit_is_refused_before_it_is_read(pair):
    writer, reader = pair
    writer.sendall(struct.pack("<I", wire.MAX_HEADER + 1))  # and nothing more: reading on would hang
    with pytest.raises(WireError, match=f"a header of {wire.MAX_HEADER + 1} bytes"):
        wire.receive(reader)


def test_a_payload_over_the_limit_is_refused_before_it_is_read(pair):
    writer, reader = pair
    writer.sendall(frame(header(kind="rows", size=1001)))  # and no payload: reading it would hang
    with pytest.raises(WireError, match="a payload of 1001 bytes \\(at most 1000 here\\)"):
        wire.receive(reader, max_payload=1000)


def test_a_payload_at_the_limit_is_read(pair):
    writer, reader = pair
    wire.send(writer, Kind.ROWS, b"y" * 1000)
    assert wire.receive(reader, max_payload=1000).payload == b"y" * 1000


def test_an_announced_payload_costs_memory_only_as_its_bytes_arrive(pair):
    writer, reader = pair
    announced = 2 << 30  # within MAX_PAYLOAD, which a checkpoint may reach
    writer.sendall(frame(header(kind="checkpoint", size=announced), b"z" * 1000))
    writer.close()
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match=f"mid-frame \\(1000 of {announced} bytes\\)"):
            wire.receive(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * wire.READ_CHUNK


@pytest.mark.parametrize("raw", [
    b"{not json", b"\xff\xfe\x00", b"", b"[" * 50_000,  # malformed, not UTF-8, empty, nested beyond the parser
    b'"a string"', b"[1, 2]", b"42", b"null",  # JSON, but not an object
], ids=["not-json", "not-utf8", "empty", "deeply-nested", "string", "list", "number", "null"])
def test_a_header_that_is_not_a_json_object_is_a_wire_error(pair, raw):
    writer, reader = pair
    writer.sendall(frame(raw))
    with pytest.raises(WireError):
        wire.receive(reader)


@pytest.mark.parametrize("fields", [
    {"kind": "teleport", "size": 0}, {"size": 0}, {"kind": None, "size": 0}, {"kind": ["hello"], "size": 0},
], ids=["unknown", "missing", "null", "list"])
def test_a_header_of_no_known_kind_is_a_wire_error(pair, fields):
    writer, reader = pair
    writer.sendall(frame(header(**fields)))
    with pytest.raises(WireError, match="no known kind"):
        wire.receive(reader)


@pytest.mark.parametrize("size", [None, -1, 1.5, "12", True, 1e400, float("nan"), [3]],
                         ids=["missing", "negative", "fraction", "string", "bool", "infinite", "nan", "list"])
def test_a_size_that_is_not_a_whole_number_of_bytes_is_a_wire_error(pair, size):
    writer, reader = pair
    fields = {"kind": "rows"} if size is None else {"kind": "rows", "size": size}
    raw = json.dumps(fields).encode().replace(b"Infinity", b"1e400")
    writer.sendall(frame(raw, b"x" * 12))
    with pytest.raises(WireError):
        wire.receive(reader)


@pytest.mark.parametrize("sent", [
    struct.pack("<I", 40)[:2],  # half the length
    frame(header(kind="batch", size=0))[:9],  # part of the header
    frame(header(kind="rows", size=100), b"x" * 60),  # part of the payload
], ids=["in-the-length", "in-the-header", "in-the-payload"])
def test_a_peer_closing_mid_frame_is_a_wire_error(pair, sent):
    writer, reader = pair
    writer.sendall(sent)
    writer.close()
    with pytest.raises(WireError, match="mid-frame"):
        wire.receive(reader)


def test_a_frame_is_stamped_after_its_last_byte(pair):
    writer, reader = pair
    raw = frame(header(kind="checkpoint", size=5000), b"w" * 5000)
    sent_last = []

    def slow_sender():
        writer.sendall(raw[:-1])
        time.sleep(0.3)
        sent_last.append(time.monotonic())
        writer.sendall(raw[-1:])

    threading.Thread(target=slow_sender).start()
    message = wire.receive(reader)
    assert message.payload == b"w" * 5000
    assert message.received_at >= sent_last[0]


def test_connect_reaches_a_listening_unix_socket():
    folder = Path(tempfile.mkdtemp(prefix="ar-wire-"))
    path = str(folder / "lab.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        client = wire.connect(path, timeout=5)
        conn, _ = server.accept()
        assert client.gettimeout() is None  # the timeout bounds the connection, not later reads
        wire.send(client, Kind.HELLO, rank=0)
        assert wire.receive(conn).fields == {"rank": 0}
        client.close()
        conn.close()
    finally:
        server.close()
        Path(path).unlink()
        folder.rmdir()


def test_connecting_where_nothing_listens_fails_at_once(tmp_path):
    with pytest.raises(OSError):
        wire.connect(str(tmp_path / "nobody.sock"), timeout=1)
