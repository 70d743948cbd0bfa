"""Length-prefixed messages of a JSON header and raw arrays, over a socket or a broadcast.

The calls a served sharded decoder takes (``adapter.serve.sharded`` -> rank 0 over a unix
socket, rank 0 -> every rank over ``torch.distributed``) travel as one byte string: an
8-byte header length, the JSON header (with each array's dtype and shape), the arrays' bytes.
Only plain numeric dtypes are read back (``np.frombuffer``): nothing is unpickled.
"""

from __future__ import annotations

__all__ = ["MAX_FRAME", "pack", "recv_frame", "send_frame", "unpack"]

import json
import math
import socket
import struct
from typing import Any

import numpy as np

_DTYPES = frozenset({"int64", "int32", "float32", "uint8"})
_SIZE = struct.Struct("<Q")


def pack(header: dict[str, Any], arrays: list[np.ndarray] = ()) -> bytes:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    meta = json.dumps({**header, "arrays": [[str(a.dtype), list(a.shape)] for a in arrays]}).encode()
    return _SIZE.pack(len(meta)) + meta + b"".join(a.tobytes() for a in arrays)


def unpack(data: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    (size,) = _SIZE.unpack_from(data)
    header = json.loads(data[_SIZE.size : _SIZE.size + size])
    offset, arrays = _SIZE.size + size, []
    for dtype, shape in header.pop("arrays"):
        if dtype not in _DTYPES:
            raise ValueError(f"unexpected array dtype {dtype!r}")
        count = math.prod(shape)
        arrays.append(np.frombuffer(data, np.dtype(dtype), count, offset).reshape(shape))
        offset += count * np.dtype(dtype).itemsize
    return header, arrays


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_SIZE.pack(len(data)) + data)


def _exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


MAX_FRAME = 4 << 30
"""The largest frame read (a decode step's logits for 64 rows of a 256k vocabulary are 64 MB)."""


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes | None:
    """The next frame, or None when the other end closed.

    Raises:
        ValueError: The length prefix is over ``limit`` (a stream out of step, or no frame at all).
    """
    head = _exactly(sock, _SIZE.size)
    if head is None:
        return None
    size = _SIZE.unpack(head)[0]
    if size > limit:
        raise ValueError(f"a frame of {size} bytes announced, more than the {limit} allowed")
    return _exactly(sock, size)
