"""``notify.py``: the datagrams systemd's notify socket receives, and when none are sent."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from berry_proxy import notify
from berry_proxy.notify import Notifier, watchdog_interval


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_each_message_is_one_datagram_of_key_value_lines(bound: socket.socket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": bound.getsockname()})
    notifier.ready("Serving 2 models")
    notifier.reloading()
    notifier.stopping("Draining 1 request(s)")
    notifier.watchdog()
    notifier.close()
    assert bound.recv(4096) == b"READY=1\nSTATUS=Serving 2 models"
    reloading = bound.recv(4096).decode().splitlines()
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    assert bound.recv(4096) == b"STOPPING=1\nSTATUS=Draining 1 request(s)"
    assert bound.recv(4096) == b"WATCHDOG=1"


def test_an_abstract_socket_name_starts_with_at() -> None:
    name = f"berry-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("up")
        notifier.close()
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("up")  # no socket, no error


def test_a_vanished_socket_is_logged_once_and_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[tuple[str, dict[str, object]]] = []

    class Recorder:
        def warning(self, event: str, **fields: object) -> None:
            warnings.append((event, fields))

    monkeypatch.setattr(notify, "log", Recorder())
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    for _ in range(3):
        notifier.watchdog()
    notifier.close()
    assert warnings == [("systemd_notify_failed", {"error": "FileNotFoundError"})]


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
