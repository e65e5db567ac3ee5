"""The REST error envelope and the 422 validation detail shape.

Every error the gateway reports, on any transport, is one of these bodies. The
shapes and messages are those of the published API reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"

# code -> (status, reference message)
_CATALOGUE: dict[str, tuple[int, str]] = {
    "AUTHENTICATION_FAILED": (401, "Authentication required"),
    "FORBIDDEN": (403, "You don't have permission to perform this action"),
    "RESOURCE_NOT_FOUND": (404, "The requested resource was not found"),
    "METHOD_NOT_ALLOWED": (405, "The method is not allowed for the requested URL"),
    "PAYLOAD_TOO_LARGE": (413, "The request payload is too large"),
    "UPGRADE_REQUIRED": (426, "This endpoint speaks WebSocket only"),
    "RATE_LIMITED": (429, "Too many requests"),
    "INTERNAL_SERVER_ERROR": (500, "An unexpected error occurred"),
    "SERVICE_UNAVAILABLE": (503, "The service is temporarily unavailable"),
}


def format_timestamp(moment: datetime | None = None) -> str:
    """UTC time in the reference's format, e.g. ``2025-01-01T00:00:00.000000``."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True, slots=True)
class ApiError(Exception):
    """An error with its place in the catalogue; rendered as the error envelope."""

    code: str
    details: dict[str, Any] = field(default_factory=dict)
    # Why, for the operator and the ``WWW-Authenticate`` header; never in the body.
    hint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.code not in _CATALOGUE:
            raise ValueError(f"unknown error code {self.code!r}")

    @property
    def status(self) -> int:
        return _CATALOGUE[self.code][0]

    @property
    def message(self) -> str:
        return _CATALOGUE[self.code][1]

    def body(self, moment: datetime | None = None) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "details": dict(self.details),
            "timestamp": format_timestamp(moment),
            "status_code": self.status,
        }


def authentication_failed(hint: str = "") -> ApiError:
    """401; ``hint`` (e.g. ``token expired``) travels only in ``WWW-Authenticate``."""
    return ApiError("AUTHENTICATION_FAILED", hint=hint)


def forbidden(required_permission: str) -> ApiError:
    return ApiError("FORBIDDEN", {"required_permission": required_permission})


def not_found(resource_type: str, resource_id: str) -> ApiError:
    return ApiError(
        "RESOURCE_NOT_FOUND", {"resource_type": resource_type, "resource_id": resource_id}
    )


@dataclass(frozen=True, slots=True)
class ValidationFailed(Exception):
    """A request that failed validation: rendered as the FastAPI/pydantic 422 body."""

    items: tuple[dict[str, Any], ...]

    status = 422

    def body(self) -> dict[str, Any]:
        return {"detail": [dict(item) for item in self.items]}

    @classmethod
    def from_pydantic(cls, error: Any, location: str) -> ValidationFailed:
        """Build from a ``pydantic.ValidationError``, every ``loc`` prefixed with ``location``.

        Each item carries ``loc``, ``msg``, ``type``, ``input`` and ``ctx`` (``{}``
        when pydantic has none), as the reference shows them.
        """
        try:
            raws = json.loads(error.json(include_url=False))
        except ValueError:
            # An input with lone surrogates (aiohttp decodes a header's non-UTF-8 bytes so)
            # cannot be encoded: report it with the surrogates replaced, not as a 500.
            text = json.dumps(error.errors(include_url=False), default=str, ensure_ascii=False)
            raws = json.loads(text.encode("utf-8", "replace"))
        items = []
        for raw in raws:
            items.append(
                {
                    "loc": [location, *raw["loc"]],
                    "msg": raw["msg"],
                    "type": raw["type"],
                    "input": raw.get("input"),
                    "ctx": raw.get("ctx", {}),
                }
            )
        return cls(tuple(items))
