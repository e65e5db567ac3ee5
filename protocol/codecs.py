"""JSON and msgpack behind one small Protocol."""

from __future__ import annotations

import json
from typing import Any, Protocol

import msgpack


class Codec(Protocol):
    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, raw: bytes) -> Any: ...


class JsonCodec:
    """Compact UTF-8 JSON, one line (no raw newlines can appear in the output)."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, raw: bytes) -> Any:
        return json.loads(raw)


class MsgpackCodec:
    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        return msgpack.packb(value, use_bin_type=True)

    def decode(self, raw: bytes) -> Any:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)


JSON = JsonCodec()
MSGPACK = MsgpackCodec()
