"""Server-sent events framing: envelope -> bytes.

Field values are sanitised so that no value can inject another field or event:
``id`` and ``event`` lose CR/LF/NUL, and ``data`` is split on line breaks into
one ``data:`` line each (our JSON data is always a single line).
"""

from __future__ import annotations

import re

from protocol.codecs import JSON
from protocol.envelope import Envelope

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")



def _field(value: str) -> str:
    return _FORBIDDEN_IN_FIELD.sub("", value)


def frame(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event: ``id:``, ``event:``, one ``data:`` line per line of data, blank line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {_field(event_id)}")
    if event is not None:
        lines.append(f"event: {_field(event)}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def retry(milliseconds: int) -> bytes:
    """The reconnection-delay hint."""
    return f"retry: {int(milliseconds)}\n\n".encode()


def encode_envelope(envelope: Envelope) -> bytes:
    """An envelope as one SSE event; its JSON is the ``data`` line."""
    return frame(
        JSON.encode(envelope.to_dict()).decode(), event=envelope.type, event_id=envelope.id
    )
