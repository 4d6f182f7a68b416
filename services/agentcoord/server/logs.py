"""Structured logging set-up for the server process."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
"""Attributes every log record has; the others came as ``extra`` (such as ``rpc``, ``ms``)."""

GRPC_LOGGERS = ("grpc", "asyncio", "uvicorn")
"""Loggers of grpc's and uvicorn's Python internals (and the event loop they run on):
``grpc_level``."""


def facts(record: logging.LogRecord) -> dict[str, object]:
    """Return the facts a log call passed as ``extra``, such as ``rpc``, ``code`` and ``ms``."""
    return {name: value for name, value in vars(record).items() if name not in _RECORD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the call's facts, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON on one line."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **facts(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str, *, grpc_level: str = "WARNING") -> None:
    """Send logs to stderr as ``text`` or ``json``: ours at ``level``, grpc's at ``grpc_level``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in GRPC_LOGGERS:
        logging.getLogger(name).setLevel(grpc_level.upper())
