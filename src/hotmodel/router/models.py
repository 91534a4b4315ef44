"""What the router says about its models, parsed and typed (pure, tested on literal samples).

``GET /models`` answers one entry per preset with ``status.value`` one of
:class:`ModelState`; a child that exited on its own adds ``failed`` and
``exit_code``. :func:`error_message` reads the message out of any error
answer, llama-server's JSON shape or the router's plain-text lines
(:func:`error_of`: its ``error.type`` too).
"""

from __future__ import annotations

import enum
import itertools
import json
from dataclasses import dataclass
from typing import Any

from hotmodel.errors import RouterProtocolError


class ModelState(enum.Enum):
    """``status.value`` of a model on the router."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"
    DOWNLOADING = "downloading"
    UNKNOWN = "unknown"  # anything a newer llama-server may add

    @classmethod
    def parse(cls, value: object) -> ModelState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One entry of the router's ``GET /models``."""

    id: str
    state: ModelState
    failed: bool = False
    exit_code: int | None = None
    port: int | None = None


def parse_models(payload: Any) -> dict[str, ModelStatus]:
    """Parse a ``GET /models`` answer into statuses by model id."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise RouterProtocolError(f"unexpected GET /models answer: {str(payload)[:200]}")
    out: dict[str, ModelStatus] = {}
    for item in payload["data"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        raw_status = item.get("status")
        status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
        raw_args = status.get("args")
        args: list[Any] = raw_args if isinstance(raw_args, list) else []
        exit_code = status.get("exit_code")
        out[item["id"]] = ModelStatus(
            id=item["id"],
            state=ModelState.parse(status.get("value")),
            failed=bool(status.get("failed", False)),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            port=_port_from_args(args),
        )
    return out


def _port_from_args(args: list[Any]) -> int | None:
    for flag, value in itertools.pairwise(args):
        if flag == "--port" and str(value).isdigit():
            return int(value)
    return None


def error_message(body: bytes) -> str:
    """The message of an error answer, whether llama-server's JSON shape or plain text."""
    return error_of(body)[0]


def error_of(body: bytes) -> tuple[str, object]:
    """An error answer's message, and the ``error.type`` llama-server gave (None when
    there is none), read in one parse."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace").strip()[:500] or "(empty answer)", None
    err = data.get("error") if isinstance(data, dict) else None
    type_ = err.get("type") if isinstance(err, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"]), type_
    if isinstance(err, str):
        return err, None
    return json.dumps(data)[:500], type_
