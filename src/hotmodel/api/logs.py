"""``GET /admin/logs?lines=N``: the tail of the router's log file.

``{"file": PATH, "lines": [...]}``, the last ``lines`` lines (default
:data:`DEFAULT_LINES`, at most :data:`MAX_LINES`) of ``llama-server.log``
(``[server] state_dir``). The file is appended to across restarts and may
grow large, so only its end is read: blocks from the end backwards until
enough lines are found, and never more than :data:`MAX_BYTES` (a line cut
there loses its beginning). Read in a thread: the event loop never waits on
the disk.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotmodel.errors import InvalidRequestError
from hotmodel.runtime import Runtime

DEFAULT_LINES = 200
MAX_LINES = 5000
MAX_BYTES = 4 * 1024 * 1024  # 5000 lines of ~800 bytes; llama-server's lines are shorter
_BLOCK = 64 * 1024


def tail_lines(path: Path, count: int, max_bytes: int = MAX_BYTES) -> list[str]:
    """The last ``count`` lines of ``path`` ([] when it is missing or unreadable)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            start, data = end, b""
            # count+1 newlines: the line before the first one kept may be partial
            while start > 0 and data.count(b"\n") <= count and end - start < max_bytes:
                step = min(_BLOCK, start, max_bytes - (end - start))
                start -= step
                f.seek(start)
                data = f.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:] if count else []


def parse_lines(values: list[str]) -> int:
    """The ``lines`` query parameter: one whole number in 1..MAX_LINES (else a 400)."""
    if not values:
        return DEFAULT_LINES
    value = values[0]
    if len(values) > 1 or not value.isascii() or not value.isdigit() or len(value) > 6:
        raise InvalidRequestError(
            f"'lines' must be one whole number from 1 to {MAX_LINES}", param="lines"
        )
    number = int(value)
    if not 1 <= number <= MAX_LINES:
        raise InvalidRequestError(f"'lines' must be from 1 to {MAX_LINES}", param="lines")
    return number


def log_routes(runtime: Runtime) -> list[Route]:
    supervisor = runtime.services.supervisor

    async def logs(request: Request) -> Response:
        count = parse_lines(request.query_params.getlist("lines"))
        path = supervisor.log_file
        lines = await asyncio.to_thread(tail_lines, path, count)
        return JSONResponse({"file": str(path), "lines": lines})

    return [Route("/admin/logs", logs, methods=["GET"])]
