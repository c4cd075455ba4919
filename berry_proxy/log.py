"""Logging: structlog rendering one JSON object per line to stdout (journald reads it).

The access log is one canonical line per request, written from the request's
``RequestContext``; its fields are chosen explicitly, so tokens, API keys, upstream URLs
and prompt text never reach it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, BinaryIO

import orjson
import structlog
import structlog.tracebacks


def configure_logging(level: int = logging.INFO, stream: BinaryIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # show_locals=False: frame locals hold request bodies and provider headers,
            # and prompts and keys must never reach a log.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(file=stream or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
