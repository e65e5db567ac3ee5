"""Request parameters as pydantic models: their errors are the API's 422 bodies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.fields import EventType, IdempotencyKey, Name


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int = Field(3600, ge=60, le=7200, description="Stream timeout in seconds")
    # Any value: one that is not a resumable id gets sync.reset, as in the header.
    last_event_id: str | None = None
    ticket: Annotated[str, Field(max_length=256)] | None = None


class ViewingQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    resource_type: Name
    resource_id: Name


class PresenceQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    resource_type: Name | None = None
    resource_id: Name | None = None


class PublishHeaders(BaseModel):
    model_config = ConfigDict(extra="ignore")

    idempotency_key: IdempotencyKey | None = Field(None, alias="idempotency-key")


class PublishBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)
