"""The Node ``openai`` package (installed in ``tests/node`` by ``make test``) against the
gateway serving the default config: its ``embeddings.create`` with defaults asks for
``encoding_format: "base64"`` and decodes it itself, so a wrong encoding shows as a wrong
vector, not as an error."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import openai
import orjson
import pytest

from berry_proxy.app import create_app
from berry_proxy.config import load_config

from .conftest import AppServer, base_url

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
DEFAULT_CONFIG = ROOT / "config" / "berry.yaml"
TOKEN = "berry-admin-token-change-me"


def node() -> str:
    path = shutil.which("node")
    if path is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("Node.js and tests/node/node_modules are needed: run `make test`")
    return path


async def test_node_sdk_embeddings_with_defaults_get_the_right_vector(
    serve_app: AppServer,
) -> None:
    server = await serve_app(create_app(load_config(DEFAULT_CONFIG, env={})))
    url = base_url(server) + "/v1"
    process = await asyncio.create_subprocess_exec(
        node(),
        str(NODE_DIR / "embeddings.mjs"),
        url,
        TOKEN,
        "text-embedding-3-small",
        "berries are red",
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    got = orjson.loads(out)
    # The same input as floats, through the Python SDK: what the vector must be.
    client = openai.AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0)
    try:
        expected = await client.embeddings.create(
            model="text-embedding-3-small", input="berries are red", encoding_format="float"
        )
    finally:
        await client.close()
    vector = expected.data[0].embedding
    assert len(got["embedding"]) == len(vector) > 1
    assert got["embedding"] == pytest.approx(vector, abs=1e-6)
    assert got["model"] == "text-embedding-3-small"  # the public name, not the backend's
    assert got["chatModel"] == "gpt-4o-mini"
    assert got["chatText"]
