"""The served process's life: listen, reload on SIGHUP, drain on SIGTERM, tell systemd.

- **Start**: the app starts (upstream session, rate-limit store, first runtime), the
  socket listens, then ``READY=1`` (``notify.py``) with a status line.
- **SIGHUP**: ``Gateway.reload`` (``RELOADING=1`` … ``READY=1``); reloads run one at a time
  and a bad file leaves the old config serving. Ignored while draining.
- **SIGTERM / SIGINT**: the drain. ``STOPPING=1``; the listening socket closes (new
  connections are refused) and idle keep-alive connections with it (a busy one closes
  after its answer); a request already read off one answers 503 ``draining``. Requests
  and streams in flight go on for up to ``server.drain_timeout_seconds``; then whatever
  is left is ended (a stream with its ``draining`` error event, a request waiting
  upstream with 503 ``draining``: ``drain.py``), given ``DRAIN_GRACE_SECONDS`` to be
  written, and the app closes (upstream session, store). ``serve`` then returns: exit
  code 0. A second signal skips the wait.
- **Watchdog**: with ``WatchdogSec`` set, ``WATCHDOG=1`` every half of it, sent from the
  event loop itself, so a wedged loop is what systemd sees as a hang.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from . import keys
from .log import get_logger
from .notify import Notifier, watchdog_interval
from .server import GatewayRunner

log = get_logger("berry_proxy")

# Connections the kernel may queue before the gateway accepts them (aiohttp's default is
# 128): a burst of a thousand clients at once (a fleet restarting) must not have its SYNs
# dropped and retried seconds later. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
# How often the drain looks whether the requests in flight have all finished.
DRAIN_POLL_SECONDS = 0.05
# After the drain ran out: how long ended requests have to write their last bytes (a
# stream's error event is given ``relay.DRAIN_WRITE_SECONDS`` of it).
DRAIN_GRACE_SECONDS = 2.0
# aiohttp's own shutdown, once nothing should be left: what it waits before cancelling.
SHUTDOWN_TIMEOUT_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ListenError(Exception):
    """The address could not be bound (taken, or not this host's)."""


class Lifecycle:
    """Serves one app on one address until a stop signal has drained it."""

    def __init__(self, app: web.Application, notifier: Notifier) -> None:
        self.app = app
        self.gateway = app[keys.GATEWAY]
        self.notifier = notifier
        self.runner = GatewayRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        )
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: no more waiting
        self._tasks: set[asyncio.Task[object]] = set()

    def in_flight(self) -> int:
        """Requests the middleware is serving now (every route)."""
        return sum(self.gateway.metrics.in_flight.values())

    async def serve(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await self.runner.setup()
        try:
            site = web.TCPSite(self.runner, host, port, backlog=LISTEN_BACKLOG)
            try:
                await site.start()
            except OSError as exc:
                raise ListenError(exc.strerror or str(exc)) from exc
            log.info("listening", host=host, port=port)
            # Everything built so far (modules, config, runtime) lives as long as the
            # process: out of the collector's sight, a full collection walks only what
            # requests create, so its pauses do not grow with the gateway's size.
            gc.collect()
            gc.freeze()
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, self._on_stop_signal)
            loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
            self.notifier.ready(self.gateway.status_line())
            interval = watchdog_interval()
            if interval is not None:
                self._spawn(self._ping_watchdog(interval))
            await self._stop.wait()
            await self._drain()
        finally:
            self.gateway.drain.begin()  # from here on a SIGHUP is ignored, not a reload
            for task in list(self._tasks):
                task.cancel()
            # The handlers stay until the app is closed: without them a SIGHUP would kill
            # the process mid-cleanup, and a second Ctrl-C raise KeyboardInterrupt there.
            await self.runner.cleanup()
            for signum in (*STOP_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            log.info("stopped")

    def _spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop_signal(self) -> None:
        if self._stop.is_set():
            log.warning("drain_cut_short", in_flight=self.in_flight())
            self._hurry.set()
        self._stop.set()

    def _on_reload_signal(self) -> None:
        if self.gateway.drain.draining:
            log.warning("config_reload_ignored", reason="draining")
            return
        self._spawn(self.gateway.reload())

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _drain(self) -> None:
        gateway = self.gateway
        timeout = gateway.runtime.config.server.drain_timeout_seconds
        gateway.drain.begin()
        in_flight = self.in_flight()
        self.notifier.stopping(f"Draining {in_flight} request(s), for up to {timeout:g} s")
        log.info("draining", in_flight=in_flight, drain_timeout_seconds=timeout)
        for site in list(self.runner.sites):
            await site.stop()  # new connections are refused from now on
        server = self.runner.server
        if server is not None:
            server.pre_shutdown()  # idle keep-alive connections close; busy ones after
        if await self._settled(timeout):
            log.info("drained")
            return
        log.warning("drain_timeout", in_flight=self.in_flight(), drain_timeout_seconds=timeout)
        gateway.drain.expire()
        self._hurry.clear()  # the ended requests still get their last bytes out
        await self._settled(DRAIN_GRACE_SECONDS)

    async def _settled(self, within: float) -> bool:
        """Wait until nothing is in flight (True), or ``within`` seconds or a second stop
        signal have passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            while self.in_flight():
                left = deadline - loop.time()
                if left <= 0 or hurry.done():
                    return False
                await asyncio.wait({hurry}, timeout=min(DRAIN_POLL_SECONDS, left))
            return True
        finally:
            hurry.cancel()


async def serve(app: web.Application, host: str, port: int, notifier: Notifier) -> None:
    """Serve ``app`` on ``host:port`` until a stop signal has drained it."""
    await Lifecycle(app, notifier).serve(host, port)
