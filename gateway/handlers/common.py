"""What every HTTP handler shares: app state, request parsing, JSON responses."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.auth import Identity, bearer_token
from gateway.core import Gateway
from protocol.codecs import JSON
from protocol.envelope import WorkspaceKey
from protocol.errors import ValidationFailed

GATEWAY = web.AppKey("gateway", Gateway)

Model = TypeVar("Model", bound=BaseModel)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def workspace_of(request: web.Request) -> WorkspaceKey:
    return WorkspaceKey(request.match_info["org_id"], request.match_info["workspace_id"])


def identify(request: web.Request, permission: str) -> tuple[Gateway, WorkspaceKey, Identity]:
    """Authenticate the bearer token and authorize ``permission`` on the path's workspace."""
    gateway, workspace = gateway_of(request), workspace_of(request)
    token = bearer_token(request.headers.get("Authorization"))
    return gateway, workspace, gateway.identify(token, workspace, permission)


def parse(model: type[Model], raw: dict[str, Any], location: str) -> Model:
    """Validate ``raw`` with ``model``; 422 in the FastAPI shape, each ``loc`` under ``location``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        failed = ValidationFailed.from_pydantic(exc, location)
        # FastAPI validates each parameter alone: a missing one has no input.
        items = tuple(
            {**item, "input": None} if item["type"] == "missing" else item for item in failed.items
        )
        raise ValidationFailed(items) from None


def query_of(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated parameter takes its last value, as FastAPI does."""
    return {key: request.query.getall(key)[-1] for key in request.query}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=JSON.encode(body), status=status, content_type="application/json")
