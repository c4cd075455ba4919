"""The status page at ``/`` (``berry_proxy/static/status.html``), rendered by a real browser.

Headless Chromium loads the page from the gateway and lets its script run under a virtual
time budget: ``--virtual-time-budget`` advances the page's clock only while no fetch is
pending, so the page's 3 s ``setTimeout`` refresh loop runs a few times, each refresh with
its answers, and ``--dump-dom`` prints the DOM the script built (``--screenshot`` saves
what it drew). The page marks what a test looks for with data attributes:
``body[data-refreshed]`` counts successful refreshes, ``body[data-status]`` is the
gateway's status (or ``unreachable``), provider rows carry ``data-provider``,
``data-state`` and ``data-healthy``, model cards ``data-model`` and backend rows
``data-backend`` and ``data-effective-weight``.

Chromium is Debian's ``chromium``. Without it the tests are skipped, except where
``BERRY_REQUIRE_BROWSER=1`` makes that a failure. Each browser runs in its own process
group, killed by the PID this test started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import (
    ADMIN_TOKEN,
    CHROMIUM_FLAGS,
    UPSTREAM_KEY,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    chromium,
    gateway_config,
)

# Page time the browser lets pass (paused while a fetch is pending): refreshes at ~0, 3, 6 s.
VIRTUAL_TIME_MS = 8000
BROWSER_TIMEOUT_S = 30.0  # one browser run, real time
REQUESTS_TIMEOUT_S = 10.0  # driving the gateway until a breaker opens
LIMITED_TOKEN = "status-page-limited-token-0123"
BREAKER_THRESHOLD = 2

TOKEN_LINE = re.compile(r"^berry_tokens_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


async def run_chromium(browser: str, profile: Path, url: str, *args: str) -> bytes:
    """Run headless Chromium on ``url`` with ``args``; its stdout. Always ends its group."""
    process = await asyncio.create_subprocess_exec(
        browser,
        *CHROMIUM_FLAGS,
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: its helpers end with it
    )
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT_S):
            out, err = await process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


# --------------------------------------------------------------------------------------
# The dumped DOM, parsed just enough to find elements by attribute and read their text
# --------------------------------------------------------------------------------------

VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> list[Node]:
        found = [self]
        for child in self.children:
            if isinstance(child, Node):
                found += child.walk()
        return found

    def find_all(self, match: Callable[[Node], bool]) -> list[Node]:
        return [node for node in self.walk() if match(node)]

    def cells(self) -> list[str]:
        return [c.text.strip() for c in self.children if isinstance(c, Node) and c.tag == "td"]


class DomParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


@dataclass
class Page:
    html: str
    root: Node

    @classmethod
    def parse(cls, dumped: bytes) -> Page:
        html = dumped.decode()
        parser = DomParser()
        parser.feed(html)
        parser.close()
        return cls(html, parser.root)

    @property
    def body(self) -> Node:
        (body,) = self.root.find_all(lambda n: n.tag == "body")
        return body

    def by_id(self, element_id: str) -> Node:
        (node,) = self.root.find_all(lambda n: n.attrs.get("id") == element_id)
        return node

    def rows(self, attr: str) -> dict[str, Node]:
        return {n.attrs[attr]: n for n in self.root.find_all(lambda n: attr in n.attrs)}

    def cards(self) -> dict[str, Node]:
        """The model cards by model name."""
        return {
            n.attrs["data-model"]: n
            for n in self.root.find_all(lambda n: n.tag == "article" and "data-model" in n.attrs)
        }

    def backends(self, model: str) -> dict[str, Node]:
        return {
            n.attrs["data-backend"]: n
            for n in self.root.find_all(
                lambda n: n.tag == "tr" and n.attrs.get("data-model") == model
            )
        }


# --------------------------------------------------------------------------------------
# Gateway setups
# --------------------------------------------------------------------------------------


def two_provider_config(healthy: FakeUpstream, failing: FakeUpstream) -> dict[str, Any]:
    """up1 (healthy, weight 3) and up2 (failing, weight 1, tried first) serve gpt-test."""
    raw = gateway_config(healthy, failing, circuit_breaker_failure_threshold=BREAKER_THRESHOLD)
    raw["server"]["public_status"] = True
    model = raw["models"]["gpt-test"]
    model["strategy"] = "failover"  # up2 first: every request tries it until it opens
    model["backends"] = [
        {"provider": "up1", "model": "up-model", "weight": 3, "priority": 1},
        {"provider": "up2", "model": "up-model", "weight": 1, "priority": 0},
    ]
    # A user with one request a day: its second is refused, and the page shows it.
    raw["users"]["limited"] = {"token": LIMITED_TOKEN, "rate_limit": {"requests_per_day": 1}}
    return raw


async def refused_once(server: TestServer) -> None:
    """Two chats of the limited user: the first served, the second refused (429)."""
    url = base_url(server) + "/v1/chat/completions"
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
    statuses = []
    async with aiohttp.ClientSession() as session, asyncio.timeout(REQUESTS_TIMEOUT_S):
        for _ in range(2):
            async with session.post(url, json=chat, headers=headers) as response:
                await response.read()
                statuses.append(response.status)
    assert statuses == [200, 429]


async def health(session: aiohttp.ClientSession, server: TestServer) -> tuple[int, Any]:
    async with session.get(base_url(server) + "/health") as response:
        return response.status, await response.json()


async def chat_until_open(server: TestServer, provider: str) -> None:
    """Send chats until ``provider``'s breaker is open (bounded)."""
    url = base_url(server) + "/v1/chat/completions"
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as session, asyncio.timeout(REQUESTS_TIMEOUT_S):
        for _ in range(10):
            async with session.post(url, json=chat, headers=headers) as response:
                await response.read()
            _, body = await health(session, server)
            if body["providers"][provider]["circuit_breaker_state"] == "open":
                return
    raise AssertionError(f"{provider}'s circuit breaker did not open")


async def get_json(server: TestServer, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(base_url(server) + path) as r:
        assert r.status == 200, path
        return await r.json()


async def prompt_tokens(server: TestServer, model: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + "/prometheus") as response,
    ):
        text = await response.text()
    total = 0.0
    for match in TOKEN_LINE.finditer(text):
        labels = dict(LABEL.findall(match["labels"]))
        if labels.get("model") == model and labels.get("type") == "prompt":
            total += float(match["value"])
    return int(total)


def assert_rate_limited_once(page: Page) -> None:
    """The users table: the admin, and the limited user refused once (``refused_once``)."""
    users = page.rows("data-user")
    assert users["admin"].cells()[-1] == "0"
    limited = users["limited"]
    assert limited.cells()[-1] == "1"
    (count,) = [c for c in limited.children if isinstance(c, Node) and c.tag == "td"][-1:]
    assert "limited" in count.classes  # drawn in the warning colour


def assert_no_secrets(page: Page, *upstreams: FakeUpstream) -> None:
    for secret in (ADMIN_TOKEN, UPSTREAM_KEY, "sk-", "Bearer"):
        assert secret not in page.html
    for fake in upstreams:
        assert fake.server is not None
        assert fake.url not in page.html
        assert re.search(rf"\b{fake.server.port}\b", page.html) is None


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


async def test_the_status_page_shows_a_down_provider_in_red(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    tmp_path: Path,
) -> None:
    browser = chromium()
    upstream2.mode = "reset"  # drops every connection: a network failure, the provider's breaker
    server = await start_gateway(two_provider_config(upstream, upstream2))
    await chat_until_open(server, "up2")
    await refused_once(server)
    weights = await get_json(server, "/smart-ai/models/gpt-test/weights")
    expected_tokens = await prompt_tokens(server, "gpt-test")
    assert expected_tokens > 0

    page = Page.parse(
        await run_chromium(browser, tmp_path / "dom", base_url(server) + "/", "--dump-dom")
    )

    body = page.body
    # The loop ran more than once within the budget: the dump waited for the fetches.
    assert int(body.attrs["data-refreshed"]) >= 2, body.attrs
    assert body.attrs["data-status"] == "degraded"
    assert body.attrs["data-stale"] == "false"
    assert page.by_id("status-text").text == "degraded"
    assert "warn" in page.by_id("banner").classes

    providers = page.rows("data-provider")
    assert set(providers) == {"up1", "up2"}
    up1, up2 = providers["up1"], providers["up2"]
    assert (up1.attrs["data-state"], up1.attrs["data-healthy"]) == ("closed", "true")
    assert "down" not in up1.classes
    assert up1.cells()[:3] == ["up1", "up", "closed"]
    assert (up2.attrs["data-state"], up2.attrs["data-healthy"]) == ("open", "false")
    assert "down" in up2.classes
    assert up2.cells()[:3] == ["up2", "down", "open"]
    assert "circuit breaker open" in up2.cells()[-1]
    assert int(up2.cells()[3]) >= BREAKER_THRESHOLD  # its requests, all failed

    cards = page.cards()
    assert set(cards) == {"gpt-test", "other-model"}
    card = cards["gpt-test"]
    assert "gpt-test" in card.text
    assert "degraded 1/2" in card.text
    assert int(card.attrs["data-prompt-tokens"]) == expected_tokens

    backends = page.backends("gpt-test")
    assert set(backends) == {"up1", "up2"}
    for entry in weights["backends"]:
        row = backends[entry["provider"]]
        assert float(row.attrs["data-weight"]) == entry["weight"]
        shown = float(row.attrs["data-effective-weight"])
        assert shown == pytest.approx(entry["effective_weight"], rel=0.05, abs=1e-3)
        assert float(row.cells()[4]) == pytest.approx(shown, rel=0.01)  # the visible number
    assert backends["up1"].cells()[3] == "3"
    assert "down" in backends["up2"].classes
    assert backends["up2"].attrs["data-state"] == "open"
    assert set(page.backends("other-model")) == {"up1"}
    assert_rate_limited_once(page)
    assert_no_secrets(page, upstream, upstream2)

    screenshot = tmp_path / "status.png"
    await run_chromium(
        browser,
        tmp_path / "shot",
        base_url(server) + "/",
        f"--screenshot={screenshot}",
        "--window-size=1280,900",
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000


async def test_the_status_page_renders_a_503_health_answer(
    start_gateway: GatewayFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    browser = chromium()
    upstream.mode = "reset"
    raw = gateway_config(upstream, circuit_breaker_failure_threshold=1)
    raw["server"]["public_status"] = True
    server = await start_gateway(raw)  # up1 is the only backend of both models
    await chat_until_open(server, "up1")
    async with aiohttp.ClientSession() as session:
        status, body = await health(session, server)
    assert (status, body["status"]) == (503, "unhealthy")

    page = Page.parse(
        await run_chromium(browser, tmp_path / "dom", base_url(server) + "/", "--dump-dom")
    )

    assert int(page.body.attrs["data-refreshed"]) >= 1
    assert page.body.attrs["data-status"] == "unhealthy"
    assert page.by_id("status-text").text == "unhealthy"
    assert "bad" in page.by_id("banner").classes
    up1 = page.rows("data-provider")["up1"]
    assert (up1.attrs["data-state"], up1.attrs["data-healthy"]) == ("open", "false")
    assert "down" in up1.classes
    cards = page.cards()
    assert cards["gpt-test"].attrs["data-available"] == "false"
    assert "unavailable 0/1" in cards["gpt-test"].text
    assert "model gpt-test is unavailable" in page.by_id("problems").text
    assert_no_secrets(page, upstream)


async def test_the_status_page_keeps_the_last_data_when_the_gateway_is_unreachable(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    tmp_path: Path,
) -> None:
    """A front (test-only) relays the page and its first refresh, then drops every
    connection: the page's later fetches throw, as when the gateway is down."""
    browser = chromium()
    upstream2.mode = "reset"
    gateway = await start_gateway(two_provider_config(upstream, upstream2))
    await chat_until_open(gateway, "up2")
    seen = {"weights": False, "dropping": False, "dropped": 0}

    async def relay(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/smart-ai/"):
            seen["weights"] = True  # the first refresh's second step
        elif path in ("/health", "/metrics", "/prometheus") and seen["weights"]:
            seen["dropping"] = True  # the second refresh began
        if seen["dropping"]:
            seen["dropped"] += 1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        headers = {"Accept": request.headers.get("Accept", "*/*")}
        async with (
            aiohttp.ClientSession() as session,
            session.get(base_url(gateway) + request.path_qs, headers=headers) as answer,
        ):
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                headers={"Content-Type": answer.headers["Content-Type"]},
            )

    app = web.Application()
    app.router.add_get("/{tail:.*}", relay)
    front = await aiohttp_server(app)

    page = Page.parse(
        await run_chromium(browser, tmp_path / "dom", base_url(front) + "/", "--dump-dom")
    )

    assert seen["dropped"] >= 1
    body = page.body
    assert body.attrs["data-refreshed"] == "1"
    assert (body.attrs["data-status"], body.attrs["data-stale"]) == ("unreachable", "true")
    assert "stale" in body.classes
    assert page.by_id("status-text").text == "unreachable"
    assert "bad" in page.by_id("banner").classes
    assert "showing the last data" in page.by_id("banner").text
    # The last data stays, and still shows what is down.
    providers = page.rows("data-provider")
    assert set(providers) == {"up1", "up2"}
    assert providers["up1"].attrs["data-state"] == "closed"
    assert providers["up2"].attrs["data-state"] == "open"
    assert "down" in providers["up2"].classes
    assert set(page.backends("gpt-test")) == {"up1", "up2"}
    assert_no_secrets(page, upstream, upstream2)
