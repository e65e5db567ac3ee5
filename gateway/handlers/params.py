"""Request parameters as pydantic models: their errors are the API's 422 bodies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.envelope import RESERVED_PREFIXES

Name = Annotated[str, Field(min_length=1, max_length=256)]


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int = Field(3600, ge=60, le=7200, description="Stream timeout in seconds")
    last_event_id: Annotated[str, Field(max_length=256)] | None = None
    ticket: Annotated[str, Field(max_length=256)] | None = None


class ViewingQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    resource_type: Name
    resource_id: Name


class PresenceQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    resource_type: Name | None = None
    resource_id: Name | None = None


class PublishBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith(RESERVED_PREFIXES):
            raise ValueError("event types in the presence. and sync. families are reserved")
        return value
