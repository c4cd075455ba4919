"""Reading a client's request body: bounded in size and in time, and never invited early.

- A ``Content-Length`` over ``server.max_body_bytes`` is refused (413) before one byte of
  the body is read; a chunked body is refused as soon as it grows past the limit.
- ``Expect: 100-continue`` is answered only here, after authentication (the middleware
  ran before the handler) and the length check: a client is never invited to upload a
  body that would then be refused. aiohttp's own expect handler, which answers before
  either, is replaced by ``defer_continue`` on every route of the app. (A path that
  matches no route still gets aiohttp's default, then its 404.)
- The whole body must arrive within ``server.body_timeout_seconds`` (408 otherwise), so a
  client that stops short of the end cannot hold its buffer for as long as it likes.
- A body that is not what its ``Content-Encoding`` says (aiohttp decompresses it, in
  bounded steps) is a 400, not a 500.
- After a 408 or an unreadable body the connection is dropped once the answer is out;
  after a 413 whose body is still arriving it is closed after aiohttp has read and
  discarded the rest for a while, so that the client gets to read the answer.

The body is returned as the bytes aiohttp received when it came in one chunk (the usual
case), else as one ``bytearray`` grown as the bytes arrive (never sized from what the
client declares). It is never copied once more at the end.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from .errors import ExpectationFailed, InvalidRequest, RequestTimeout, RequestTooLarge
from .openai_request import Body

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def defer_continue(request: web.Request) -> None:
    """The expect handler of every route: answer nothing yet (see ``read_body``)."""
    return


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        "request_too_large",
        f"The request body is larger than the limit of {limit} bytes",
        details={"max_body_bytes": limit},
    )


async def read_body(request: web.Request, limit: int, time_limit: float) -> Body:
    """The whole request body, or the 4xx that says why not."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    expect = request.headers.get("Expect")
    if expect is not None:
        if expect.lower() != "100-continue":
            raise ExpectationFailed(
                "expectation_failed", "Only 'Expect: 100-continue' is supported"
            )
        if request.version >= HttpVersion11:
            await request.writer.write(CONTINUE)
    try:
        if request.content.is_eof():
            return await _read(request, limit)  # all of it is here: nothing to wait for
        async with asyncio.timeout(time_limit):
            return await _read(request, limit)
    except TimeoutError:
        raise RequestTimeout(
            "request_timeout",
            f"The request body did not arrive within {time_limit:g} seconds",
        ) from None
    except RequestPayloadError:
        # aiohttp's message names the encoding, never body bytes; keep ours fixed anyway.
        error = InvalidRequest(
            "invalid_body",
            "The request body could not be read: it is truncated or not what its "
            "Content-Encoding says",
        )
        error.drop_connection = True  # nothing more can be read from this connection
        raise error from None


async def _read(request: web.Request, limit: int) -> Body:
    content = request.content
    first = await content.readany()
    if not first:
        return b""
    if len(first) > limit:
        raise _unread_rest(too_large(limit))
    chunk = await content.readany()
    if not chunk:
        return first
    # Grown as bytes arrive, never allocated from the declared Content-Length: a client
    # declaring 32 MiB and sending two bytes must not cost 32 MiB.
    body = bytearray(first)
    while chunk:
        if len(body) + len(chunk) > limit:
            raise _unread_rest(too_large(limit))
        body += chunk
        chunk = await content.readany()
    return body


def _unread_rest(error: RequestTooLarge) -> RequestTooLarge:
    # The rest of the body is still on its way: this connection cannot carry another
    # request, so the answer closes it instead of reading what is left.
    error.close_connection = True
    return error
