"""uvicorn's HTTP/1.1 protocol, with its one answer of its own in OpenAI's error shape.

A request whose bytes are not HTTP/1.1 (a broken request line, header or chunk
size) never reaches the app: uvicorn's parser refuses it and writes a plain-text
400 itself. Every other error hotmodel answers is JSON in OpenAI's shape, so a
client's error handling can read this one too. The connection is closed after
it, as uvicorn does: the rest of the stream cannot be framed.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hotmodel.api.errors import error_body

BAD_FRAMING = json.dumps(
    error_body(
        "Invalid HTTP request: its bytes could not be parsed as HTTP/1.1 "
        "(request line, header or chunked body)",
        "invalid_request_error",
        "http_400",
    )
).encode()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; only its parser-error answer differs."""

    def send_400_response(self, msg: str) -> None:
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(BAD_FRAMING)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            BAD_FRAMING,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()
