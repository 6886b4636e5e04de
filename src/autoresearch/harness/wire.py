"""The messages between sandboxed processes (the trainer, the model being scored) and the lab.

A message is a frame on a Unix socket: 4 bytes of header length, a JSON header holding the message's
kind and the byte size of its payload, then the payload (token rows, float arrays, a checkpoint).
The lab reads frames from code it does not trust, so a frame that is too large, not JSON, or of an
unknown kind is an error (WireError), never a crash of the reader or an allocation it did not bound:
a payload is read as its bytes arrive, so a header that announces gigabytes costs nothing until they
come.
"""
from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import Enum

MAX_HEADER = 1 << 16  # bytes of JSON header
MAX_PAYLOAD = 1 << 36  # bytes: a checkpoint of a few billion fp32 parameters
READ_CHUNK = 1 << 20  # bytes asked of the socket at a time: what reading a frame allocates ahead of its bytes
SOCKET_ENV = "AUTORESEARCH_SOCKET"  # where a sandboxed process finds the lab
KEY_ENV = "AUTORESEARCH_KEY"  # what it says in its first message, so that the lab serves no one else


class Kind(str, Enum):
    # trainer <-> lab
    HELLO = "hello"  # a process introduces itself (rank, world size); the lab answers with the run's settings
    SETTINGS = "settings"
    BATCH = "batch"  # a request for rows of training tokens
    ROWS = "rows"  # rows of tokens; before START they are random, after it they are the training data
    START = "start"  # training proper starts: the lab's clock runs from the moment this arrives
    CHECKPOINT = "checkpoint"  # the trained weights: the lab's clock stops when the last byte arrives
    CLOSED = "closed"  # the lab serves nothing more (the clock stopped, or the budget ran out)
    # scorer <-> model (the model process says HELLO first, with the key)
    LOAD = "load"  # the checkpoint is in: rebuild the model from train.py and load it
    READY = "ready"  # the model is built and loaded
    SCORE = "score"  # rows to answer
    SCORES = "scores"  # per position: log-sum-exp of the logits and the logit of the next token
    AUDIT = "audit"  # positions of the last rows whose whole logit vectors the scorer wants
    VECTORS = "vectors"
    ERROR = "error"  # the sender failed; `message` says why

    def __str__(self) -> str:
        return self.value


class WireError(Exception):
    """A frame that breaks the protocol, or a peer that went away mid-frame."""


@dataclass
class Message:
    kind: Kind
    fields: dict = field(default_factory=dict)
    payload: bytes = b""
    received_at: float = 0.0  # time.monotonic() just after the frame's last byte was read


def send(sock: socket.socket, kind: Kind, payload: bytes | memoryview = b"", **fields) -> None:
    header = json.dumps({**fields, "kind": kind.value, "size": len(payload)}).encode()
    sock.sendall(struct.pack("<I", len(header)) + header)
    if len(payload):
        sock.sendall(payload)


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    """n bytes, or None if the peer closed before the first of them. The buffer grows with the bytes
    that arrived, never with the number a peer announced."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), READ_CHUNK))
        if not chunk:
            if not buf:
                return None
            raise WireError(f"the peer closed the connection mid-frame ({len(buf)} of {n} bytes)")
        buf += chunk
    return buf


def _parse_header(raw: bytearray) -> tuple[Kind, int, dict]:
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deep to parse
        raise WireError(f"a malformed header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(fields, dict):
        raise WireError(f"a header that is a JSON {type(fields).__name__}, not an object")
    named = fields.pop("kind", None)
    try:
        kind = Kind(named)
    except (ValueError, TypeError):
        raise WireError(f"a header of no known kind ({str(named)[:100]!r})") from None
    size = fields.pop("size", None)
    if type(size) is not int:  # not a float, a string or a bool that int() would accept
        raise WireError(f"a header whose size is {str(size)[:100]!r}, not a whole number of bytes")
    return kind, size, fields


def receive(sock: socket.socket, max_payload: int = MAX_PAYLOAD) -> Message | None:
    """The next message, or None when the peer closed the connection cleanly."""
    head = _read_exactly(sock, 4)
    if head is None:
        return None
    (length,) = struct.unpack("<I", head)
    if length > MAX_HEADER:
        raise WireError(f"a header of {length} bytes (at most {MAX_HEADER})")
    raw = _read_exactly(sock, length)
    if raw is None:
        raise WireError("the peer closed the connection mid-frame")
    kind, size, fields = _parse_header(raw)
    if not 0 <= size <= max_payload:
        raise WireError(f"a payload of {size} bytes (at most {max_payload} here)")
    payload = _read_exactly(sock, size) if size else b""
    if payload is None:
        raise WireError("the peer closed the connection mid-frame")
    received_at = time.monotonic()  # before the copy below, which is the reader's time, not the sender's
    return Message(kind, fields, bytes(payload), received_at=received_at)


def connect(path: str, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    sock.settimeout(None)
    return sock
