"""Field types shared by every request shape (REST parameters and WebSocket messages)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from protocol.envelope import PUBLISHABLE_TYPE, RESERVED_PREFIXES


def _not_reserved(value: str) -> str:
    if value.startswith(RESERVED_PREFIXES):
        raise ValueError("event types in the presence. and sync. families are reserved")
    return value


# A resource type or id, a viewing target.
Name = Annotated[str, Field(min_length=1, max_length=256)]

# The type of a published event: the pattern, outside the reserved families (422 otherwise).
EventType = Annotated[str, Field(pattern=PUBLISHABLE_TYPE.pattern), AfterValidator(_not_reserved)]

# A publisher's key for retrying one publish (SPEC §8): 1-128 printable ASCII characters.
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]
