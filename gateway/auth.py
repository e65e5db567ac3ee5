"""JWT verification, workspace/permission rules, and single-use stream tickets.

Checks run in the reference's order: a token that cannot be verified is 401; a
token of another organization is 404 ``organization``; a workspace the token
does not grant is 404 ``workspace`` (existence is never leaked); a missing
permission is 403 with ``required_permission``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import Settings
from protocol.envelope import WorkspaceKey, portability_problem
from protocol.errors import ApiError, authentication_failed, forbidden, not_found

SYNC_READ: Final = "sync:read"
PRESENCE_WRITE: Final = "presence:write"
EVENTS_PUBLISH: Final = "events:publish"
ALL_PERMISSIONS: Final = (SYNC_READ, PRESENCE_WRITE, EVENTS_PUBLISH)

# What an organization or workspace id may be made of.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._~@+=-]{1,128}")

# Display data copied from the token into presence and event actors.
DISPLAY_CLAIMS: Final = ("name", "email", "avatar_url")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as the verified token says."""

    user_id: str
    org_id: str
    workspaces: frozenset[str] | None  # None: every workspace of the org ("*")
    permissions: frozenset[str]
    display: tuple[tuple[str, str], ...]
    kind: str  # "user" or "service"
    expires_at: float

    @property
    def actor(self) -> dict[str, Any]:
        return {"type": self.kind, "id": self.user_id, **dict(self.display)}

    def authorize(self, workspace: WorkspaceKey, permission: str) -> None:
        """Raise the reference's 404/403 unless this identity may do ``permission`` there.

        Ids outside ``ID_PATTERN`` name nothing that can exist (404): they never reach a
        backend key, so no id can alias another workspace's keys.
        """
        if workspace.org_id != self.org_id or not ID_PATTERN.fullmatch(workspace.org_id):
            raise not_found("organization", workspace.org_id)
        if (self.workspaces is not None and workspace.workspace_id not in self.workspaces) or (
            not ID_PATTERN.fullmatch(workspace.workspace_id)
        ):
            raise not_found("workspace", workspace.workspace_id)
        if permission not in self.permissions:
            raise forbidden(permission)


def _strings(value: Any) -> frozenset[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return _shared(tuple(value))
    return None


@functools.lru_cache(maxsize=256)
def _shared(items: tuple[str, ...]) -> frozenset[str]:
    """One frozenset for the same permissions (or workspaces) of many tokens: an idle
    connection keeps its identity for its whole life."""
    return frozenset(items)


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Validate the claim types; raises 401 for a token that lacks or garbles them."""
    sub, org_id = claims.get("sub"), claims.get("org_id")
    if not isinstance(sub, str) or not sub or not isinstance(org_id, str) or not org_id:
        raise authentication_failed("invalid claims")
    raw_workspaces = claims.get("workspaces")
    if raw_workspaces == "*":
        workspaces = None
    else:
        workspaces = _strings(raw_workspaces)
        if workspaces is None:
            raise authentication_failed("invalid claims")
    permissions = _strings(claims.get("permissions", []))
    if permissions is None:
        raise authentication_failed("invalid claims")
    kind = claims.get("kind", "user")
    if kind not in ("user", "service"):
        raise authentication_failed("invalid claims")
    display = tuple(
        (name, claims[name]) for name in DISPLAY_CLAIMS if isinstance(claims.get(name), str)
    )
    # Everything copied into events must be encodable by every codec (no lone surrogates).
    if portability_problem([sub, org_id, *(value for _, value in display)]) is not None:
        raise authentication_failed("invalid claims")
    return Identity(sub, org_id, workspaces, permissions, display, kind, float(claims["exp"]))


def load_public_key(algorithm: str, path: Path) -> Any:
    """The PEM public key at ``path``, checked against ``algorithm`` (RSA for RS256, P-256 for
    ES256); ``ValueError`` with a clear message otherwise (a private key is refused too)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the JWT public key file {path}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not a PEM public key") from None
    if algorithm == "RS256" and not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path} is not an RSA public key (needed for RS256)")
    if algorithm == "ES256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise ValueError(f"{path} is not a P-256 EC public key (needed for ES256)")
    return key


VERIFIED_CACHE: Final = 1_024


class TokenVerifier:
    """Verifies bearer JWTs with one pinned algorithm and key; never trusts the header's ``alg``."""

    def __init__(self, settings: Settings, clock_now: Any = time.time) -> None:
        self._algorithm = settings.jwt_algorithm
        if settings.jwt_algorithm == "HS256":
            if not settings.jwt_secret:
                raise ValueError("HS256 needs a secret")
            self._key: Any = settings.jwt_secret
        else:
            if not settings.jwt_public_key_file:
                raise ValueError(f"{settings.jwt_algorithm} needs a public key file")
            self._key = load_public_key(settings.jwt_algorithm, Path(settings.jwt_public_key_file))
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway
        self._max_lifetime = settings.jwt_max_lifetime
        self._now = clock_now
        # A client sends the same token with every request (a publishing service, many a
        # second): its signature and claims are checked once, its times at every use.
        # Only tokens that passed are kept (errors are not cached), at most VERIFIED_CACHE,
        # the least recently used first out; each by its SHA-256, not itself: a token is
        # ~400 bytes, and each connection's would stay for as long as it is cached.
        self._verified: dict[bytes, tuple[Identity, Any]] = {}  # in order of use

    def verify(self, token: str) -> Identity:
        """The identity of a valid token; raises 401 ``ApiError`` for anything else."""
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        verified = self._verified.pop(key, None)
        if verified is None:
            verified = self._check(token)
            if len(self._verified) >= VERIFIED_CACHE:
                del self._verified[next(iter(self._verified))]
        self._verified[key] = verified
        identity, valid_from = verified
        now = self._now()
        if now > identity.expires_at + self._leeway:
            raise authentication_failed("token expired")
        if valid_from is not None and now + self._leeway < valid_from:
            raise authentication_failed("token not yet valid")
        return identity

    def _check(self, token: str) -> tuple[Identity, Any]:
        """The signature, the claims and their types: what does not change with time."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    # Time claims are checked below against the gateway's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError as exc:
            raise authentication_failed("wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise authentication_failed("wrong issuer") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise authentication_failed("invalid token") from exc
        if not isinstance(claims.get("exp"), (int, float)):
            raise authentication_failed("token expired")
        return identity_from_claims(claims), self._valid_from(claims)

    def _valid_from(self, claims: dict[str, Any]) -> float | None:
        """When the token starts to be valid: its ``nbf``, and with a lifetime ceiling its
        ``iat`` as well (required then: a careless issuer's 10-year ``exp``, or an ``iat``
        moved into the future to stretch it, is refused rather than trusted for years)."""
        nbf, iat = claims.get("nbf"), claims.get("iat")
        times = [nbf] if nbf is not None else []
        if self._max_lifetime > 0:
            if iat is None:
                raise authentication_failed("iat required")
            times.append(iat)
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                   for value in times):
            raise authentication_failed("invalid claims")
        if self._max_lifetime > 0 and claims["exp"] - iat > self._max_lifetime:
            raise authentication_failed("token lifetime too long")
        return max(times, default=None)


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; 401 when absent or malformed."""
    if not header:
        raise authentication_failed()
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise authentication_failed()
    return token.strip()


def mint_token(
    secret: str,
    *,
    sub: str,
    org_id: str,
    workspaces: Iterable[str] | str,
    permissions: Iterable[str] = ALL_PERMISSIONS,
    ttl: float = 3600,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 token with the gateway's claims (for the ``token`` command and tests)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "org_id": org_id,
        "workspaces": workspaces if isinstance(workspaces, str) else list(workspaces),
        "permissions": list(permissions),
        "iat": issued,
        "exp": issued + int(ttl),
        **(extra or {}),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def new_ticket() -> str:
    """An unguessable single-use stream ticket id."""
    return secrets.token_urlsafe(32)


__all__ = [
    "ALL_PERMISSIONS",
    "EVENTS_PUBLISH",
    "PRESENCE_WRITE",
    "SYNC_READ",
    "ApiError",
    "Identity",
    "TokenVerifier",
    "bearer_token",
    "identity_from_claims",
    "mint_token",
    "new_ticket",
]
