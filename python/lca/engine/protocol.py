"""The framing of the messages between `lca` and the PyTorch engine's worker.

Torch-free (the standard library only), so that clients and tests can use it anywhere. The
byte-level specification is docs/engines.md ("Protocol"); this module is its reference
implementation.

Every message, in both directions, is

    offset  size  field
    0       4     magic b"LCAW"
    4       4     protocol version, u32 little-endian (PROTOCOL_VERSION)
    8       4     header length H, u32 little-endian
    12      8     payload length P, u64 little-endian
    20      H     header: a JSON object, UTF-8, with at least the key "cmd"
    20+H    P     payload: raw little-endian numbers, as the header declares
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

MAGIC = b"LCAW"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<4sIIQ")
PREFIX_SIZE = PREFIX.size  # 20

#: Largest header accepted (a hello with many tensors stays far below this).
MAX_HEADER = 64 << 20

#: Error kinds a worker reports in an `error` message.
ERROR_KINDS = (
    "import_error",
    "config_error",
    "out_of_memory",
    "bad_request",
    "numeric",
    "internal",
)

#: Bytes per element of the payload dtypes.
DTYPE_SIZE = {"f32": 4, "f64": 8}


class ProtocolError(Exception):
    """The stream does not hold a well-formed message (wrong magic, version, lengths, JSON)."""


class EndOfStream(ProtocolError):
    """The stream ended cleanly before the first byte of a message."""


def encode(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One message: the 20-byte prefix, the JSON header and the payload."""
    if "cmd" not in header:
        raise ValueError("a message header needs a 'cmd'")
    h = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(h), len(payload)) + h + bytes(payload)


def write_message(
    stream: BinaryIO, header: dict[str, Any], payload: bytes | bytearray | memoryview = b""
) -> None:
    """Write one message and flush it."""
    h = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    stream.write(PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(h), len(payload)))
    stream.write(h)
    if len(payload):
        stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise ProtocolError(f"the stream ended {got} bytes into {what} of {n} bytes")
        got += k
    return buf


def read_message(
    stream: BinaryIO, max_payload: int | None = None
) -> tuple[dict[str, Any], bytearray]:
    """Read one message: its header (a dict with "cmd") and its payload (writable bytes).

    Raises EndOfStream when the stream ends before a message starts, ProtocolError when it
    ends inside one or the message is malformed.
    """
    first = stream.read(PREFIX_SIZE)
    if not first:
        raise EndOfStream("end of stream")
    if len(first) < PREFIX_SIZE:
        first = bytes(first) + _read_exact(stream, PREFIX_SIZE - len(first), "the message prefix")
    magic, version, hlen, plen = PREFIX.unpack(first)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version}, but this side speaks version {PROTOCOL_VERSION}"
        )
    if hlen == 0 or hlen > MAX_HEADER:
        raise ProtocolError(f"header length {hlen} is out of range (1..{MAX_HEADER})")
    if max_payload is not None and plen > max_payload:
        raise ProtocolError(f"payload length {plen} exceeds the limit {max_payload}")
    raw = _read_exact(stream, hlen, "the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("cmd"), str):
        raise ProtocolError("the header is not a JSON object with a string 'cmd'")
    payload = _read_exact(stream, plen, "the payload") if plen else bytearray()
    return header, payload
