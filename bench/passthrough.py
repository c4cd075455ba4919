"""Bare aiohttp pass-through proxy: the Python floor the gateway is measured against.

It does the least a Python reverse proxy can do and still be one: one shared ClientSession,
forward method, path, query, body and Content-Type to the upstream, stream the response back
chunk by chunk. No auth, routing, logging or metrics, so the CPU it burns per request is the
cost of aiohttp + the event loop alone; whatever the gateway spends above it is its own logic.

It runs on the same server settings as the gateway (uvloop, no access log, handler
cancellation) so that the comparison isolates the gateway's logic, not a different setup.

Usage: python bench/passthrough.py --upstream http://127.0.0.1:8080 --port 8081 [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web

UPSTREAM_KEY = web.AppKey("upstream", str)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


def parse_args() -> argparse.Namespace:
    """Read the upstream base URL, the port to listen on and the event loop to use."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (asyncio exists to measure what uvloop buys)",
    )
    return parser.parse_args()


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    """Own the one shared ClientSession for the app's lifetime."""
    # limit=0: no pool cap, so 16 concurrent clients never queue inside the proxy.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        app[SESSION_KEY] = session
        yield


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request upstream unchanged and stream the answer back as it arrives."""
    session = request.app[SESSION_KEY]
    url = request.app[UPSTREAM_KEY] + request.path_qs
    body = await request.read()
    headers = {}
    if hdrs.CONTENT_TYPE in request.headers:
        headers[hdrs.CONTENT_TYPE] = request.headers[hdrs.CONTENT_TYPE]
    try:
        async with session.request(request.method, url, data=body, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status)
            if hdrs.CONTENT_TYPE in upstream.headers:
                response.headers[hdrs.CONTENT_TYPE] = upstream.headers[hdrs.CONTENT_TYPE]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        # Only reachable before prepare() in practice (the upstream is a local nginx); a
        # visible 502 makes a broken bench show up as errors in wrk instead of hanging.
        return web.json_response({"error": {"message": str(exc)}}, status=502)


def make_app(upstream: str) -> web.Application:
    """Build the app: one catch-all route, one shared session."""
    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """Create the requested event loop; uvloop is the default, as in the gateway."""
    if kind == "uvloop":
        import uvloop  # noqa: PLC0415 - only needed for the default loop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main() -> None:
    """Serve until SIGTERM/SIGINT (the bench runner sends SIGTERM)."""
    args = parse_args()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        loop=new_loop(args.loop),
        access_log=None,
        handler_cancellation=True,
        backlog=4096,  # as the gateway's listener (berry_proxy/lifecycle.py)
        print=None,
    )


if __name__ == "__main__":
    main()
