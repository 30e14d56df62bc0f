"""structlog setup: one JSON object per line (or a console rendering), secrets redacted.

Every event passes the redaction processor last, after exceptions are formatted, so
neither a value nor a traceback can carry a secret to the output. Standard-library
loggers (aiohttp, apscheduler, alembic) go through the same pipeline.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from syncd.redact import redact_value

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_event(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """structlog processor: mask secrets in every value of the event."""
    return {key: redact_value(value) for key, value in event.items()}


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every log event to `stream` (stdout by default) as JSON lines or console text."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer(default=str)
    )
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_event,
    ]
    structlog.configure(
        processors=[*_shared_processors(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries speak only when something is wrong; syncd's own events carry the story.
    root.setLevel(max(LEVELS[level], logging.WARNING))


def bind(**values: Any) -> None:
    """Bind context (source, run_id) to every event of the current task."""
    structlog.contextvars.bind_contextvars(**values)
