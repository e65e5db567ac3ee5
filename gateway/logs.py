"""Structured logs that never carry a token, ticket or secret: one JSON object a line, or
readable text lines for a person (``auto``: dev mode on a terminal)."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

# Anything shaped like a JWT, and the values of secret-bearing parameters.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_SECRET_PARAM = re.compile(r"(?i)((?:ticket|token|secret|authorization)[\"']?\s*[=:]\s*[\"']?)[^\s&\"',]+")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(value: object) -> str:
    """``value`` as text with control characters escaped: a request path with ``%0A`` in it
    cannot forge a log line of its own."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], str(value))


class TextFormatter(logging.Formatter):
    """One line a record (a traceback follows on lines of its own), its structured fields
    appended as ``key=value``, control characters in them escaped."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={_one_line(value)}" for key, value in vars(record).items()
                          if key not in _STANDARD and not key.startswith("_"))
        line = super().format(record)
        return redact(f"{line} {fields}" if fields else line)


def resolve_format(fmt: str, *, dev_mode: bool, stream: TextIO) -> str:
    """``json`` or ``text``. An explicit one stays; ``auto`` is ``text`` for a person (dev
    mode, and ``stream`` is a terminal) and ``json`` otherwise: every production run and every
    pipe, file or log collector gets JSON."""
    if fmt != "auto":
        return fmt
    try:
        on_terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        on_terminal = False
    return "text" if dev_mode and on_terminal else "json"


def configure(level: str = "INFO", fmt: str = "json", *, dev_mode: bool = False) -> None:
    """Every record to stderr, in ``fmt`` (``json``, ``text`` or ``auto``: ``resolve_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if resolve_format(fmt, dev_mode=dev_mode, stream=sys.stderr) == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string: it may hold a ticket), status, duration."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
            },
        )
