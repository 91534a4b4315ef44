"""Logging set-up for ``hotmodel serve``, in one place: text or JSON lines."""

from __future__ import annotations

import logging

from hotmodel.config import ServerConfig


def setup_logging(server: ServerConfig) -> None:
    """Configure the root logger from ``[server] log_level`` and ``log_format``."""
    logging.basicConfig(
        level=server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per router call is noise at info level; hotmodel logs what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
