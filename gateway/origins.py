"""Browser origins: one normalisation and one allow-list rule for WebSocket and CORS."""

from __future__ import annotations

from urllib.parse import urlsplit


def normalise_origin(text: str) -> str | None:
    """``scheme://host[:port]`` (default port dropped, lower case), or None if ``text`` is
    not a plain http(s) origin (``null``, paths, credentials, other schemes...)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("http", "https") or not host or parts.username is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
        return None
    if port is None or port == {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(origins: list[str], allowed: tuple[str, ...]) -> bool:
    """True when exactly one ``Origin`` was sent and it equals an allowed origin (after
    normalisation): no wildcards, no prefix or suffix matching."""
    permitted = {normalised for item in allowed if (normalised := normalise_origin(item))}
    return len(origins) == 1 and normalise_origin(origins[0]) in permitted
