"""Logging set-up for ``hotmodel serve``, in one place: text or JSON lines.

``[server] log_format`` (``--log-format`` on ``hotmodel serve``) picks the
format of every line hotmodel writes to stderr, uvicorn's included (the
server hands uvicorn no logging config of its own, so its loggers reach the
root handler installed here). JSON is one object per line: ``time``,
``level``, ``logger``, ``message``, ``exception`` when there is one, and, on
access lines (``hotmodel.access``), every access field as a key of its own.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from hotmodel.config import LogFormat, ServerConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        access: dict[str, Any] | None = getattr(record, "access", None)
        if access is not None:  # the text form is key=value; here the keys carry it
            message = f"{access['method']} {access['path']} {access['status']}"
        else:
            message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if access is not None:
            line.update(access)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``[server] log_format`` (for any handler that writes hotmodel's log)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


class _HotmodelHandler(logging.StreamHandler[TextIO]):
    """The handler setup_logging() installs: marked so a second call replaces it, not others'."""


def setup_logging(server: ServerConfig, stream: TextIO | None = None) -> None:
    """Configure the root logger from ``[server] log_level`` and ``log_format``.

    Handlers that others attached to the root logger (the dashboard's log view)
    are left in place; a handler from an earlier call is replaced.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _HotmodelHandler):
            root.removeHandler(handler)
    handler = _HotmodelHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(server.log_format))
    root.addHandler(handler)
    root.setLevel(server.log_level.upper())
    # One line per router call is noise at info level; hotmodel logs what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
