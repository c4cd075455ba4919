"""The command line (``cli.py``): ``check-config``, ``hash-token``, ``--version``, ``serve``.

The last test runs the real ``serve`` command in a subprocess on a free loopback port, as
systemd or ``make run`` would, makes one request and reads the JSON access log it prints.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from berry_proxy import __version__
from berry_proxy.cli import main
from berry_proxy.config import ConfigError, bind_address_from_env, hash_token, load_config

from .conftest import free_port, serve_command

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "berry.yaml"

SERVE_TOKEN = "cli-serve-token-5f1e0c9a7b"
SECRET_PROMPT = "purple-elephant-prompt-8d2c"

GOOD_YAML = f"""
providers:
  local:
    type: mock
    mock: {{chunk_count: 2}}
models:
  demo:
    name: demo-model
    strategy: weighted_random
    backends: [{{provider: local, model: mock-demo}}]
users:
  alice:
    token: {SERVE_TOKEN}
"""

BAD_YAML = """
server:
  port: 99999
  colour: blue
providers:
  local: {type: mock}
models:
  demo:
    backends:
      - {provider: nowhere, model: m}
  other:
    backends:
      - {provider: local, model: m, weight: -1}
users:
  bob: {token: short}
  carol: {token: carol-token-0123456789, allowed_models: [ghost]}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_on_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(DEFAULT_CONFIG)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert str(DEFAULT_CONFIG) in out
    config = load_config(DEFAULT_CONFIG, env={})
    counts = f"{len(config.providers)} providers, {len(config.models)} models"
    assert f"{counts}, {len(config.users)} users" in out
    assert err == ""


def test_check_config_uses_berry_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "env.yaml", GOOD_YAML)
    monkeypatch.setenv("BERRY_CONFIG", str(path))
    assert main(["check-config"]) == 0
    out, _ = capsys.readouterr()
    assert f"{path}: OK" in out


def test_check_config_uses_the_originals_config_path_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "original.yaml", GOOD_YAML)
    monkeypatch.delenv("BERRY_CONFIG", raising=False)
    monkeypatch.setenv("CONFIG_PATH", str(path))
    assert main(["check-config"]) == 0
    assert f"{path}: OK" in capsys.readouterr().out
    monkeypatch.setenv("BERRY_CONFIG", str(tmp_path / "missing.yaml"))  # ours wins
    assert main(["check-config"]) == 1


def test_check_config_notes_the_originals_keys_without_effect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD_YAML + "\nsettings:\n  batch_metrics: {enabled: true}\n"
    path = write(tmp_path, "notes.yaml", text)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note: settings.batch_metrics is accepted and has no effect" in out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),  # noqa: S104 - parsed, never bound
        ("127.0.0.1:3000", ("127.0.0.1", 3000)),
        ("[::1]:3001", ("::1", 3001)),
        (":3002", (None, 3002)),
        ("", (None, None)),
    ],
)
def test_bind_address_is_read_as_the_original_did(
    value: str, expected: tuple[str | None, int | None]
) -> None:
    assert bind_address_from_env({"BIND_ADDRESS": value}) == expected


@pytest.mark.parametrize(
    "value",
    ["localhost", "0.0.0.0:http", "1.2.3.4:70000", "::1", "fe80::1", "h :1", "]:80", "[[x]]:80"],
)
def test_a_bad_bind_address_stops_serve_with_a_clear_error(
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, "bind.yaml", GOOD_YAML)
    monkeypatch.setenv("BIND_ADDRESS", value)
    assert main(["serve", "--config", str(path)]) == 1
    assert "BIND_ADDRESS" in capsys.readouterr().err
    # check-config reads it too (systemd runs it before serve, with the same environment).
    assert main(["check-config", "--config", str(path)]) == 1
    assert "BIND_ADDRESS" in capsys.readouterr().err


def test_host_and_port_flags_win_over_bind_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both flags given: $BIND_ADDRESS is not read at all, so even a malformed one cannot
    stop serve; one flag given: the other half comes from $BIND_ADDRESS."""
    seen: list[tuple[str, int]] = []

    async def fake_serve(_app: object, host: str, port: int, _notifier: object) -> None:
        seen.append((host, port))

    monkeypatch.setattr("berry_proxy.lifecycle.serve", fake_serve)
    path = write(tmp_path, "flags.yaml", GOOD_YAML)
    monkeypatch.setenv("BIND_ADDRESS", "junk")
    assert main(["serve", "--config", str(path), "--host", "127.0.0.2", "--port", "4001"]) == 0
    monkeypatch.setenv("BIND_ADDRESS", "127.0.0.3:4002")
    assert main(["serve", "--config", str(path), "--port", "4003"]) == 0
    assert main(["serve", "--config", str(path)]) == 0
    assert seen == [("127.0.0.2", 4001), ("127.0.0.3", 4003), ("127.0.0.3", 4002)]


def test_check_config_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "bad.yaml", BAD_YAML)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    expected = info.value.errors
    assert len(expected) >= 6

    assert main(["check-config", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert f"{path}: {len(expected)} error(s)" in err
    for line in expected:
        assert line in err
    # Each problem named by its exact path.
    for fragment in (
        "server.port",
        "server.colour",
        "models.demo.backends[0].provider: unknown provider 'nowhere'",
        "models.other.backends[0].weight",
        "users.bob.token",
        "users.carol.allowed_models[0]: unknown model 'ghost'",
    ):
        assert fragment in err


def test_check_config_reports_unknown_provider_next_to_a_bad_sibling_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BAD_YAML.replace(
        "      - {provider: nowhere, model: m}\n  other:\n    backends:\n",
        "      - {provider: nowhere, model: m}\n",
    )
    assert "  other:" not in text  # both backends now belong to models.demo
    path = write(tmp_path, "bad.yaml", text)
    assert main(["check-config", "--config", str(path)]) == 1
    _, err = capsys.readouterr()
    assert "models.demo.backends[1].weight" in err
    assert "models.demo.backends[0].provider: unknown provider 'nowhere'" in err


def test_check_config_on_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.yaml"
    assert main(["check-config", "--config", str(missing)]) == 1
    _, err = capsys.readouterr()
    assert str(missing) in err
    assert "cannot read" in err


def test_check_config_on_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "broken.yaml", "providers: [unclosed\n")
    assert main(["check-config", "--config", str(path)]) == 1
    _, err = capsys.readouterr()
    assert "syntax error" in err


def test_hash_token_prints_sha256_hex(capsys: pytest.CaptureFixture[str]) -> None:
    token = "my-very-secret-token-123"
    assert main(["hash-token", token]) == 0
    out, _ = capsys.readouterr()
    assert out == hashlib.sha256(token.encode()).hexdigest() + "\n"
    assert out.strip() == hash_token(token)


def test_hashed_token_from_cli_authenticates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["hash-token", SERVE_TOKEN])
    digest = capsys.readouterr().out.strip()
    path = write(tmp_path, "hashed.yaml", GOOD_YAML.replace("token:", "token_sha256:"))
    path.write_text(path.read_text().replace(SERVE_TOKEN, digest))
    assert main(["check-config", "--config", str(path)]) == 0


def test_python_m_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "berry_proxy", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"berry-proxy {__version__}"


# --------------------------------------------------------------------------------------
# serve, for real
# --------------------------------------------------------------------------------------


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"berry-proxy exited early with status {proc.returncode}")
        try:
            if request(port, "GET", "/v1/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling another process: there is nothing to await
    raise AssertionError(f"berry-proxy did not answer /v1/health within {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM the server by its PID; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def test_serve_listens_on_bind_address_and_warns_of_keys_without_effect(tmp_path: Path) -> None:
    """A Berry deployment's environment as it was: ``CONFIG_PATH`` names the file and
    ``BIND_ADDRESS`` the listening address; a key of the original's with no effect here
    is named once at start-up, with why."""
    text = GOOD_YAML + "\nsettings:\n  batch_metrics: {enabled: true}\n"
    config = write(tmp_path, "original.yaml", text)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "BERRY_CONFIG"},
        "CONFIG_PATH": str(config),
        "BIND_ADDRESS": f"127.0.0.1:{port}",
    }
    stdout_path = tmp_path / "stdout.log"
    with stdout_path.open("wb") as stdout:
        proc = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "berry_proxy", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
        try:
            wait_until_ready(proc, port)
            status, _ = request(port, "GET", "/v1/health", b"", {})
        finally:
            returncode = stop(proc)
    assert (status, returncode) == (200, 0)
    lines = [orjson.loads(line) for line in stdout_path.read_bytes().splitlines() if line]
    (warning,) = [line for line in lines if line.get("event") == "config_key_ignored"]
    assert warning["key"] == "settings.batch_metrics"
    assert warning["level"] == "warning"
    assert "nothing is batched" in warning["reason"]


def test_serve_answers_and_logs_without_secrets(tmp_path: Path) -> None:
    config = write(tmp_path, "serve.yaml", GOOD_YAML)
    port = free_port()
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(  # noqa: S603  # our own interpreter and module
            serve_command(config, port),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=tmp_path,
        )
        try:
            wait_until_ready(proc, port)
            body = orjson.dumps(
                {"model": "demo-model", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
            )
            status, answer = request(
                port,
                "POST",
                "/v1/chat/completions",
                body,
                {
                    "Authorization": f"Bearer {SERVE_TOKEN}",
                    "Content-Type": "application/json",
                    "X-Request-ID": "cli-test-request-1",
                },
            )
        finally:
            returncode = stop(proc)
    assert status == 200, answer
    reply = orjson.loads(answer)
    assert reply["choices"][0]["message"]["content"]
    assert returncode == 0  # SIGTERM is a clean shutdown

    output = stdout_path.read_bytes() + stderr_path.read_bytes()
    assert SERVE_TOKEN.encode() not in output
    assert SECRET_PROMPT.encode() not in output
    lines: list[dict[str, Any]] = [
        orjson.loads(line) for line in stdout_path.read_bytes().splitlines() if line.strip()
    ]
    (access,) = [line for line in lines if line.get("request_id") == "cli-test-request-1"]
    assert access["status"] == 200
    assert access["user"] == "alice"
    assert access["route"] == "/v1/chat/completions"
    assert access["model"] == "demo"
    assert access["provider"] == "local"
    assert access["attempts"] == 1
    # The same envelope as every structlog line: the event, its level, a UTC timestamp.
    assert (access["event"], access["level"]) == ("request", "info")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", access["timestamp"])
    assert access["duration_ms"] >= 0
