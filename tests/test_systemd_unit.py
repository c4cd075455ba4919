"""``systemd/berry-proxy.service``, checked by systemd's own tools (Debian's ``systemd``).

``systemd-analyze verify`` (with the unit's commands pointed at this checkout's virtualenv,
since ``/opt/berry-proxy`` is not installed here) and ``systemd-analyze security
--offline=true``, whose exposure must stay at or below 1.4. Skipped without
``systemd-analyze``, unless ``BERRY_REQUIRE_SYSTEMD=1`` (``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import required_tool

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "berry-proxy.service"
INSTALLED = "/opt/berry-proxy/bin/berry-proxy"
MAX_EXPOSURE = 1.4


@pytest.fixture
def systemd_analyze() -> str:
    return required_tool(("systemd-analyze",), "BERRY_REQUIRE_SYSTEMD", "systemd")


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    berry = Path(sys.executable).with_name("berry-proxy")
    assert berry.exists(), berry
    unit = tmp_path / "berry-proxy.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(berry)))
    result = subprocess.run(  # noqa: S603  # systemd's tool on our own unit file
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "berry-proxy.service" not in result.stderr, result.stderr  # no warnings about it


def test_the_unit_exposure_stays_at_or_below_1_4(systemd_analyze: str, tmp_path: Path) -> None:
    unit = tmp_path / "berry-proxy.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(  # noqa: S603  # systemd's tool on our own unit file
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_the_unit_tells_systemd_its_state_and_reloads_with_sighup() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    watchdog = int(unit["WatchdogSec"][0])
    assert 10 <= watchdog <= 120
    assert unit["KillSignal"] == ["SIGTERM"]
    # The default drain (30 s) fits inside the stop timeout, with room for the grace.
    assert int(unit["TimeoutStopSec"][0]) > 30 + 5
    (start,) = unit["ExecStart"]
    assert start.startswith(INSTALLED + " serve --config ")


def test_the_install_recipe_names_files_that_exist() -> None:
    recipe = [line for line in UNIT.read_text().splitlines() if line.startswith("#")]
    named = {
        word
        for line in recipe
        for word in re.findall(r"(?<![\w/])(?:config|systemd)/[\w./-]+|README\.md", line)
    }
    assert {"config/berry.yaml", "systemd/berry-proxy.service", "README.md"} <= named
    for path in named:
        assert (ROOT / path).exists(), path
