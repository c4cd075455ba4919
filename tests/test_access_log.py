"""The buffered access log of ``serve``: lines batched into one write, never lost, in order."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog

from berry_proxy.log import ACCESS_BUFFER_BYTES, ACCESS_LOG, configure_logging, get_logger


class CountingBuffer(io.BytesIO):
    """A stdout that counts its writes (each one a system call on a real stdout)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = asyncio.Event()

    def write(self, data: object) -> int:
        self.writes += 1
        self.written.set()
        return super().write(data)  # type: ignore[arg-type]


@pytest.fixture
def stdout() -> Iterator[CountingBuffer]:
    buffer = CountingBuffer()
    configure_logging(stream=buffer, buffered=True)
    try:
        yield buffer
    finally:
        ACCESS_LOG.flush()
        structlog.reset_defaults()
        ACCESS_LOG.stream, ACCESS_LOG.enabled, ACCESS_LOG.buffered = None, True, False


def ids(buffer: io.BytesIO) -> list[str]:
    return [orjson.loads(line)["request_id"] for line in buffer.getvalue().splitlines()]


async def test_access_lines_go_out_together_soon_after_the_first(stdout: CountingBuffer) -> None:
    for n in range(50):
        ACCESS_LOG.write({"request_id": f"r{n}", "status": 200})
    assert stdout.getvalue() == b""  # waiting for the batch
    async with asyncio.timeout(5):
        await stdout.written.wait()  # the flush timer (50 ms) fires on the loop
    assert ids(stdout) == [f"r{n}" for n in range(50)]
    assert stdout.writes == 1


async def test_a_full_buffer_is_written_at_once(stdout: CountingBuffer) -> None:
    line_fields = {"request_id": "x" * 100, "status": 200}
    written = 0
    while not stdout.getvalue():
        ACCESS_LOG.write(dict(line_fields))
        written += 1
        assert written * 100 < 2 * ACCESS_BUFFER_BYTES
    assert len(stdout.getvalue().splitlines()) == written


async def test_other_log_lines_come_after_the_access_lines_written_before_them(
    stdout: CountingBuffer,
) -> None:
    ACCESS_LOG.write({"request_id": "first", "status": 200})
    get_logger("test").warning("something", request_id="second")
    ACCESS_LOG.write({"request_id": "third", "status": 200})
    ACCESS_LOG.flush()  # as shutdown does
    assert ids(stdout) == ["first", "second", "third"]


def test_a_line_written_without_a_running_loop_is_written_at_once(stdout: CountingBuffer) -> None:
    ACCESS_LOG.write({"request_id": "late", "status": 200})
    assert ids(stdout) == ["late"]


def test_lines_pending_on_a_loop_that_closed_go_out_on_the_next_loop(
    stdout: CountingBuffer,
) -> None:
    async def write(request_id: str) -> None:
        ACCESS_LOG.write({"request_id": request_id, "status": 200})

    asyncio.run(write("on-a-closed-loop"))  # its flush timer never fires
    assert stdout.getvalue() == b""

    async def next_loop() -> None:
        await write("next")
        async with asyncio.timeout(5):
            await stdout.written.wait()

    asyncio.run(next_loop())
    assert ids(stdout) == ["on-a-closed-loop", "next"]


async def test_a_broken_stdout_drops_the_batch_without_raising() -> None:
    class BrokenPipe(io.BytesIO):
        def write(self, _data: object) -> int:
            raise BrokenPipeError

    configure_logging(level=logging.INFO, stream=BrokenPipe(), buffered=True)
    try:
        before = ACCESS_LOG.dropped
        ACCESS_LOG.write({"request_id": "a", "status": 200})
        ACCESS_LOG.write({"request_id": "b", "status": 200})
        ACCESS_LOG.flush()
        assert ACCESS_LOG.dropped == before + 2
    finally:
        structlog.reset_defaults()
        ACCESS_LOG.stream, ACCESS_LOG.enabled, ACCESS_LOG.buffered = None, True, False
