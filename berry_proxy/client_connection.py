"""Dropping a client connection, and everything queued for it.

A client that takes nothing of its answer is dropped (``abort_reason: client_stalled``).
A plain close would leave what was already handed to the kernel (megabytes, with an
autotuned send buffer) queued for the client to take whenever it likes, and the socket
alive meanwhile; lingering zero seconds makes the close a reset that discards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


def drop_connection(transport: asyncio.BaseTransport) -> None:
    """Reset the connection of ``transport`` now, discarding whatever waits to be sent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:  # pragma: no cover - every server transport is a WriteTransport
        transport.close()
