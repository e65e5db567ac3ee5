"""WebSocket messages (SPEC §6): what a client may send, and what the server answers.

Pure: no I/O. A frame decodes, with the codec of the socket's subprotocol, to a map;
``parse_client_message`` turns that map into one of the message values below or
raises ``ValidationFailed``, whose body is the REST 422 shape with every ``loc``
under ``"body"``. Every value a message may hold can be encoded by both codecs, so an
answer that echoes part of a message can always be sent back.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, ClassVar, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.codecs import JSON, MSGPACK, Codec
from protocol.envelope import WorkspaceKey, portability_problem
from protocol.errors import ValidationFailed
from protocol.fields import EventType, IdempotencyKey, Name

SUBPROTOCOL_JSON: Final = "mm-sync.v1.json"
SUBPROTOCOL_MSGPACK: Final = "mm-sync.v1.msgpack"
SUBPROTOCOLS: Final = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)
_CODECS: Final[dict[str, Codec]] = {SUBPROTOCOL_JSON: JSON, SUBPROTOCOL_MSGPACK: MSGPACK}


def codec_for(subprotocol: str | None) -> Codec:
    """The codec of a negotiated subprotocol; JSON when the client named none we speak."""
    return _CODECS.get(subprotocol or "", JSON)


class CloseCode(IntEnum):
    """Close codes the server sends (see docs/websocket.md)."""

    NORMAL = 1000
    INVALID_TEXT = 1007  # a text frame that is not UTF-8 (aiohttp enforces it)
    POLICY_VIOLATION = 1008  # could not keep up (send buffer overflow), or flooded
    MESSAGE_TOO_BIG = 1009  # a frame over the size limit
    INTERNAL_ERROR = 1011  # the gateway failed (a bug): reconnect and resume with since
    SERVICE_RESTART = 1012  # the node drains: reconnect (to any node) and resume with since
    UNAUTHENTICATED = 4401  # no valid auth in time, a bad token, or the token expired


Ref = Annotated[str, Field(max_length=128)] | Annotated[int, Field(ge=-(2**53), le=2**53)] | None


class ClientMessage(BaseModel):
    """Every client message may carry ``ref``; the answer to it echoes it."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")
    op: ClassVar[str]

    ref: Ref = None


class Auth(ClientMessage):
    op: ClassVar[str] = "auth"
    token: Annotated[str, Field(min_length=1, max_length=8192)]


class _OnWorkspace(ClientMessage):
    org_id: Name
    workspace_id: Name

    @property
    def workspace(self) -> WorkspaceKey:
        return WorkspaceKey(self.org_id, self.workspace_id)


class Subscribe(_OnWorkspace):
    op: ClassVar[str] = "subscribe"
    since: Annotated[str, Field(max_length=256)] | None = None


class Unsubscribe(_OnWorkspace):
    op: ClassVar[str] = "unsubscribe"


class Join(_OnWorkspace):
    op: ClassVar[str] = "join"


class Leave(_OnWorkspace):
    op: ClassVar[str] = "leave"


class Viewing(_OnWorkspace):
    op: ClassVar[str] = "viewing"
    resource_type: Name
    resource_id: Name


class Publish(_OnWorkspace):
    op: ClassVar[str] = "publish"
    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None


class Ping(ClientMessage):
    op: ClassVar[str] = "ping"


MESSAGES: Final[dict[str, type[ClientMessage]]] = {
    model.op: model for model in (Auth, Subscribe, Unsubscribe, Join, Leave, Viewing, Publish, Ping)
}


def _item(loc: list[str | int], msg: str, kind: str, value: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind, "input": value, "ctx": ctx}


def _invalid(*items: dict[str, Any]) -> ValidationFailed:
    return ValidationFailed(tuple(items))


def decode_frame(codec: Codec, payload: bytes) -> Any:
    """The value a frame holds; ``ValidationFailed`` (``json_invalid``) if it is not one."""
    try:
        return codec.decode(payload)
    except (ValueError, TypeError, RecursionError) as exc:  # msgpack's errors are ValueErrors
        reason = type(exc).__name__ if codec is not JSON else str(exc).split(":")[0]
        raise _invalid(_item(["body", 0], f"{codec.name} decode error", "json_invalid", {},
                             {"error": reason[:200]})) from None


def reference_of(raw: Any) -> str | int | None:
    """The ``ref`` of a message, if it has a valid one (answers to bad messages echo it)."""
    if not isinstance(raw, dict):
        return None
    ref = raw.get("ref")
    if isinstance(ref, str) and len(ref) <= 128 and portability_problem(ref) is None:
        return ref
    if isinstance(ref, int) and not isinstance(ref, bool) and -(2**53) <= ref <= 2**53:
        return ref
    return None


def parse_client_message(raw: Any) -> ClientMessage:
    """The client message ``raw`` (a decoded frame) stands for.

    Raises ``ValidationFailed`` with one item per problem: not an object, a value
    no codec can carry, a missing or unknown ``op``, missing fields, wrong types.
    """
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise _invalid(_item(["body"], "Input should be a valid dictionary", "dict_type",
                             None, {"got": kind}))
    problem = portability_problem(raw)
    if problem is not None:
        path, why = problem
        raise _invalid(_item(["body", *path], f"Value error, {why}", "value_error", None,
                             {"error": why}))
    op = raw.get("op")
    if op is None:
        raise _invalid(_item(["body", "op"], "Field required", "missing", None, {}))
    model = MESSAGES.get(op) if isinstance(op, str) else None
    if model is None:
        expected = ", ".join(f"'{name}'" for name in MESSAGES)
        raise _invalid(_item(["body", "op"], f"Input should be {expected}", "literal_error",
                             op if isinstance(op, str | int | float | bool) else None,
                             {"expected": expected}))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        failed = ValidationFailed.from_pydantic(exc, "body")
        items = tuple(
            {**item, "input": None} if item["type"] == "missing" else item for item in failed.items
        )
        raise ValidationFailed(items) from None


# -- server messages ----------------------------------------------------------------


def event_message(envelope: dict[str, Any]) -> dict[str, Any]:
    """An event: ``envelope`` is exactly what an SSE client gets as ``data``."""
    return {"op": "event", "event": envelope}


def reply_message(ref: str | int | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"op": "reply", "ref": ref, "data": data}


def error_message(ref: str | int | None, error: dict[str, Any]) -> dict[str, Any]:
    """``error`` is a REST error body: the error envelope, or the 422 ``detail`` shape."""
    return {"op": "error", "ref": ref, "error": error}


def pong_message(ref: str | int | None) -> dict[str, Any]:
    return {"op": "pong", "ref": ref}
