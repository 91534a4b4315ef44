"""Rebuilds the assistant message of a streamed chat completion, chunk by chunk.

A stream that ends without a ``finish_reason``, or carries an error event,
yields nothing to store: a cut answer never enters a session.
"""

from __future__ import annotations

from typing import Any

from hotmodel.sse import SseParser

Message = dict[str, Any]


class ReplyAssembler:
    """Feed it the SSE bytes of a chat completion; :meth:`message` is the answer once complete."""

    def __init__(self) -> None:
        self._parser = SseParser()
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.error = False

    def feed(self, chunk: bytes) -> None:
        for event in self._parser.feed(chunk):
            if event.data == "[DONE]":
                continue
            try:
                payload = event.json()
            except ValueError:
                continue
            if isinstance(payload, dict):
                self._take(payload)

    def _take(self, payload: dict[str, Any]) -> None:
        if "error" in payload:
            self.error = True
            return
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    self._content.append(delta["content"])
                if isinstance(delta.get("reasoning_content"), str):
                    self._reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def message(self) -> Message | None:
        """The complete assistant message, or None when the stream did not finish."""
        if self.finish_reason is None or self.error:
            return None
        message: Message = {"role": "assistant", "content": "".join(self._content)}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        return message
