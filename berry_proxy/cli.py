"""Command line: ``serve`` (default), ``check-config``, ``hash-token``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__
from .config import (
    Config,
    ConfigError,
    bind_address_from_env,
    config_path_from_env,
    hash_token,
    load_config,
)
from .log import ACCESS_LOG, configure_logging, get_logger

COMMANDS = ("serve", "check-config", "hash-token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berry-proxy", description="OpenAI-compatible AI gateway."
    )
    parser.add_argument("--version", action="version", version=f"berry-proxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the gateway (default command)")
    serve.add_argument(
        "--config", help="config file (default: $BERRY_CONFIG, $CONFIG_PATH or config/berry.yaml)"
    )
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    check = sub.add_parser("check-config", help="validate a config file, listing every error")
    check.add_argument(
        "--config", help="config file (default: $BERRY_CONFIG, $CONFIG_PATH or config/berry.yaml)"
    )
    hashing = sub.add_parser("hash-token", help="print the sha256 to put in token_sha256")
    hashing.add_argument("token")
    return parser


def _load(path: str) -> Config | None:
    """The config at ``path``, or None after printing every error to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def check_config(path: str) -> int:
    config = _load(path)
    if config is None:
        return 1
    try:
        bind_address_from_env()  # what serve will read: a bad one fails here, not at start
    except ConfigError as exc:
        print(exc.errors[0], file=sys.stderr)
        return 1
    print(
        f"{path}: OK ({len(config.providers)} providers, {len(config.models)} models, "
        f"{len(config.users)} users)"
    )
    for key, why in config.ignored:
        print(f"  note: {key} is accepted and has no effect: {why}")
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available: it cuts the gateway's CPU per request (see bench/)."""
    try:
        import uvloop  # noqa: PLC0415  # optional speed-up, imported only when serving
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(path: str, host: str | None, port: int | None) -> int:
    from .app import create_app  # noqa: PLC0415  # check-config and hash-token stay light
    from .lifecycle import ListenError  # noqa: PLC0415  # likewise
    from .lifecycle import serve as serve_app  # noqa: PLC0415  # likewise
    from .notify import Notifier  # noqa: PLC0415  # likewise

    config = _load(path)
    if config is None:
        return 1
    bind_host = bind_port = None
    if host is None or port is None:  # both flags given: $BIND_ADDRESS is not read
        try:
            bind_host, bind_port = bind_address_from_env()
        except ConfigError as exc:
            print(exc.errors[0], file=sys.stderr)
            return 1
    # Access lines in batches (log.py): one write per ~50 ms, not one per request.
    configure_logging(buffered=True)
    # --host/--port, else the original's $BIND_ADDRESS, else the file.
    host = host or bind_host or config.server.host
    port = port if port is not None else bind_port if bind_port is not None else config.server.port
    log = get_logger("berry_proxy")
    for key, why in config.ignored:
        log.warning("config_key_ignored", key=key, reason=why)
    log.info(
        "starting",
        version=__version__,
        host=host,
        port=port,
        providers=len(config.providers),
        models=len(config.models),
    )
    notifier = Notifier()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            runner.run(
                serve_app(
                    create_app(config, config_path=path, notifier=notifier), host, port, notifier
                )
            )
        except ListenError as exc:  # the address is taken, or not ours to bind
            log.error("listen_failed", host=host, port=port, error=str(exc))
            return 1
        finally:
            ACCESS_LOG.flush()  # the lines of the last requests, drained or not
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0] not in COMMANDS
        and args_list[0].startswith("-")
        and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    if args.command == "hash-token":
        print(hash_token(args.token))
        return 0
    path = config_path_from_env(args.config)
    if args.command == "check-config":
        return check_config(path)
    return serve(path, args.host, args.port)
