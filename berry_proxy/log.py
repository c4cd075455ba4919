"""Logging: structlog rendering one JSON object per line to stdout (journald reads it).

The access log is one canonical line per request, written from the request's
``RequestContext``; its fields are chosen explicitly, so tokens, API keys, upstream URLs
and prompt text never reach it. It has its own writer (``ACCESS_LOG``) that renders the
same JSON line as structlog would, without structlog's per-call processor chain: it runs
for every request, and the chain cost ~10 µs of the gateway's ~80 µs per request.

``serve`` buffers access lines, as nginx's ``access_log ... buffer= flush=`` does: they go
out together at most ``ACCESS_FLUSH_SECONDS`` after the first of them was written (or
once ``ACCESS_BUFFER_BYTES`` are pending), in one write instead of a write system call
per request. Any other log line first writes out the access lines pending before it, so
the output keeps its order; shutdown writes out the rest.

Libraries log through the standard ``logging`` module (aiohttp, asyncio). Those records are
rendered as the same one-line JSON objects, from their message template and the name of
their exception only: a record's arguments and an exception's text can quote request
bytes (aiohttp's parser errors quote the offending header, a bearer token included), so
neither is ever written.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO, cast

import orjson
import structlog
import structlog.tracebacks


class _StdlibBridge(logging.Handler):
    """Writes a standard ``logging`` record as one structlog JSON line, redacted."""

    def emit(self, record: logging.LogRecord) -> None:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        fields: dict[str, Any] = {"logger": record.name, "template": template}
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__
        structlog.get_logger(record.name).log(record.levelno, "library_log", **fields)


# A buffered access log writes its pending lines at most this long after the first.
ACCESS_FLUSH_SECONDS = 0.05
# ... or as soon as this much is pending.
ACCESS_BUFFER_BYTES = 64 * 1024


class AccessLog:
    """Writes one request's access line: its fields, then ``event``, ``level`` and
    ``timestamp``, as one JSON object on one line (as structlog writes the others).

    Until ``configure_logging`` names a stream it writes to whatever ``sys.stdout`` is at
    the time (a test runner's capture included), each line at once. With ``buffered``
    set, lines wait in memory for ``flush`` (scheduled on the running event loop).
    """

    __slots__ = (
        "_pending",
        "_pending_bytes",
        "_timer",
        "_timer_loop",
        "buffered",
        "dropped",
        "enabled",
        "stream",
    )

    def __init__(self) -> None:
        self.enabled = True
        self.buffered = False
        self.stream: BinaryIO | None = None
        self.dropped = 0  # lines that could not be written (a broken stdout)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def write(self, fields: dict[str, Any]) -> None:
        """Write the line; never raise: it is written as a request ends, and a broken
        stdout (journald restarting, a closed pipe) must not turn answers into errors."""
        if not self.enabled:
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = iso_timestamp()
        try:
            line = orjson.dumps(fields) + b"\n"
        except TypeError:  # a field orjson cannot write: a bug, but not the client's
            self.dropped += 1
            return
        stream = self.stream
        if stream is None:
            self._write_stdout(line)
            return
        if not self.buffered:
            self._write(stream, line, 1)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= ACCESS_BUFFER_BYTES:
            self.flush()
        elif self._timer is None or self._timer_loop is None or self._timer_loop.is_closed():
            # (A timer of a loop that has closed since would never fire.)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to flush later (a line written at shutdown)
                self.flush()
                return
            self._timer_loop = loop
            self._timer = loop.call_later(ACCESS_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write out the pending lines (a no-op when none are)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_loop = None
        if not self._pending:
            return
        # Swapped, not cleared after the join: another thread's log line may flush too.
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if self.stream is None:
            self.dropped += len(pending)  # nowhere to write them (reconfigured away)
            return
        self._write(self.stream, b"".join(pending), len(pending))

    def _write(self, stream: BinaryIO, data: bytes, lines: int) -> None:
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):  # ValueError: a closed file
            self.dropped += lines

    def _write_stdout(self, line: bytes) -> None:
        if sys.stdout is None:  # no stdout at all (a detached process)
            return
        try:
            sys.stdout.write(line.decode())
            sys.stdout.flush()
        except (OSError, ValueError):
            self.dropped += 1


ACCESS_LOG = AccessLog()
atexit.register(ACCESS_LOG.flush)  # whatever is still pending when the process ends


class _AfterAccessLines:
    """The stream every other log line goes to: the access lines pending before a line
    are written out before it, so that the output stays in order."""

    __slots__ = ("__weakref__", "_stream")  # structlog keys its per-file lock weakly

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        ACCESS_LOG.flush()
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()


def configure_logging(
    level: int = logging.INFO, stream: BinaryIO | None = None, *, buffered: bool = False
) -> None:
    """Log to ``stream`` (stdout); ``buffered`` access lines are written in batches."""
    target = stream or sys.stdout.buffer
    ACCESS_LOG.flush()  # lines pending for the stream this replaces
    ACCESS_LOG.stream = target
    ACCESS_LOG.enabled = level <= logging.INFO
    ACCESS_LOG.buffered = buffered
    root = logging.getLogger()
    root.handlers[:] = [_StdlibBridge()]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _iso_timestamp,
            # show_locals=False: frame locals hold request bodies and provider headers,
            # and prompts and keys must never reach a log.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(file=cast(BinaryIO, _AfterAccessLines(target))),
        cache_logger_on_first_use=True,
    )


class _IsoSeconds:
    """The ISO 8601 text of the current second, formatted once per second."""

    second = -1
    text = ""


def iso_timestamp() -> str:
    """Now as ISO 8601 UTC with microseconds: the same text as structlog's
    ``TimeStamper(fmt="iso", utc=True)``, at a fraction of its cost."""
    now = time.time()
    second = int(now)
    if second != _IsoSeconds.second:
        _IsoSeconds.second = second
        _IsoSeconds.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_IsoSeconds.text}.{int((now - second) * 1e6):06d}Z"


def _iso_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: ``timestamp`` (``iso_timestamp``)."""
    event["timestamp"] = iso_timestamp()
    return event


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
