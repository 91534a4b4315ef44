"""Server-sent events, both ways, in one place: framing what hotmodel sends, parsing what it reads.

hotmodel reads SSE from llama-server (chat completion chunks, the router's
``/models/sse`` feed) and writes SSE to its own clients (error events at the
end of a relayed stream, switch progress). :class:`SseParser` is incremental:
feed it bytes as they arrive, in chunks cut anywhere, and it returns the
events completed so far. Pure, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: its ``event:`` name (``message`` when none was given) and its data lines."""

    event: str
    data: str

    def json(self) -> Any:
        """The data decoded as JSON (``ValueError`` when it is not JSON)."""
        return json.loads(self.data)


def encode(data: Any, event: str | None = None) -> bytes:
    """One event as bytes; ``data`` is JSON-encoded unless it is already ``str``/``bytes``."""
    if isinstance(data, bytes):
        text = data.decode("utf-8")
    elif isinstance(data, str):
        text = data
    else:
        text = json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    body = "".join(f"data: {line}\n" for line in text.split("\n"))
    return (head + body + "\n").encode("utf-8")


class SseParser:
    """Turns a byte stream into :class:`SseEvent` objects (WHATWG event-stream rules).

    Lines end with LF, CRLF or CR; a blank line dispatches the event; ``:``
    starts a comment; ``id`` and ``retry`` fields are ignored (nothing here
    reconnects by event id). A line that is not ``field: value`` is ignored,
    as the spec says: llama-server's router may append a raw ``proxy error``
    line to a broken stream, and that must not look like data.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        data = self._buffer + chunk
        # A trailing CR may be the first half of a CRLF cut by the chunking: keep it back.
        held = b"\r" if data.endswith(b"\r") else b""
        data = data[: len(data) - len(held)]
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = lines.pop() + held
        events: list[SseEvent] = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append(SseEvent(self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(":")
            if not sep:
                continue
            value = value.removeprefix(" ")
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
        return events
