"""A browser app calling the gateway: headless Chromium loads a page from another origin
on loopback (another port), whose script calls the gateway with ``fetch`` (a preflighted
JSON request, a stream read chunk by chunk, an error) and reads the answers and their
``X-Request-ID``. Only CORS as SPEC §5 describes it lets that script see any of it.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it). Without it the test is skipped,
except where ``BERRY_REQUIRE_BROWSER=1`` (``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    CHROMIUM_FLAGS,
    FakeUpstream,
    ServerFactory,
    chromium,
)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>berry-proxy CORS check</title></head>
<body><pre id="out">running</pre>
<script>
const gateway = "GATEWAY";
const headers = {"Authorization": "Bearer TOKEN", "Content-Type": "application/json"};
const chat = {model: "gpt-test", messages: [{role: "user", content: "hi"}]};
async function run() {
  const out = {};
  try {
    const plain = await fetch(gateway + "/v1/chat/completions",
      {method: "POST", headers, body: JSON.stringify(chat)});
    out.status = plain.status;
    out.requestId = plain.headers.get("X-Request-ID");
    out.provider = plain.headers.get("X-Berry-Provider");
    out.content = (await plain.json()).choices[0].message.content;

    const stream = await fetch(gateway + "/v1/chat/completions",
      {method: "POST", headers, body: JSON.stringify({...chat, stream: true})});
    out.streamStatus = stream.status;
    out.streamRequestId = stream.headers.get("X-Request-ID");
    const reader = stream.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (let i = 0; i < 10000; i++) {
      const {done, value} = await reader.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
    }
    out.streamText = text;

    const refused = await fetch(gateway + "/v1/chat/completions",
      {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(chat)});
    out.errorStatus = refused.status;
    out.errorRequestId = refused.headers.get("X-Request-ID");
    out.errorCode = (await refused.json()).error.code;
  } catch (error) {
    out.error = String(error);
  }
  document.getElementById("out").textContent = JSON.stringify(out);
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
}
run();
</script></body></html>
"""


async def page_server(
    aiohttp_server: ServerFactory, gateway: TestServer
) -> tuple[TestServer, asyncio.Future[dict[str, Any]]]:
    """The app's own origin: serves the page, and takes the script's result."""
    result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    page = PAGE.replace("GATEWAY", f"http://127.0.0.1:{gateway.port}").replace("TOKEN", ADMIN_TOKEN)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def receive(request: web.Request) -> web.Response:
        if not result.done():
            result.set_result(orjson.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_post("/result", receive)
    return await aiohttp_server(app), result


async def test_a_page_from_another_origin_calls_the_gateway_with_fetch(
    aiohttp_server: ServerFactory,
    gateway: TestServer,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    browser = chromium()
    site, result = await page_server(aiohttp_server, gateway)
    assert site.port != gateway.port  # another origin
    process = await asyncio.create_subprocess_exec(
        browser,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"http://127.0.0.1:{site.port}/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group: its helpers end with it
    )
    try:
        async with asyncio.timeout(60):
            out = await result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    assert "error" not in out, out
    assert (out["status"], out["provider"]) == (200, "up1")
    assert out["requestId"].startswith("req_")
    assert out["content"] == "".join(CHAT_CONTENT)
    assert out["streamStatus"] == 200
    assert out["streamRequestId"].startswith("req_")
    assert out["streamText"].endswith("data: [DONE]\n\n")
    for piece in CHAT_CONTENT:
        assert orjson.dumps(piece).decode() in out["streamText"]
    assert (out["errorStatus"], out["errorCode"]) == (401, "missing_token")
    assert out["errorRequestId"].startswith("req_")
    # The preflights were the gateway's own: only the two chats went upstream.
    assert len(upstream.requests) == 2
