"""Token verification: pinned algorithm, forgeries refused, claims checked, tickets single-use."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import BASE, ORG, SECRET, WORKSPACE, auth
from tests.sse_client import SSEReader
from tests.wsclient import connect

JOIN = f"{BASE}/presence/join"


def claims(clock, **overrides):
    base = {"sub": "user-1", "org_id": ORG, "workspaces": [WORKSPACE],
            "permissions": ["sync:read", "presence:write", "events:publish"],
            "iat": int(clock.now()), "exp": int(clock.now()) + 3600}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def b64(part: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def rsa_pair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


def ec_pair():
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


async def status_with(client, token: str) -> int:
    return (await client.post(JOIN, headers=auth(token))).status


async def test_valid_hs256_token_is_accepted(client, clock):
    assert await status_with(client, jwt.encode(claims(clock), SECRET, algorithm="HS256")) == 200


async def test_alg_none_is_refused(client, clock):
    forged = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(clock))}."
    response = await client.post(JOIN, headers=auth(forged))
    assert response.status == 401
    assert "invalid_token" in response.headers["WWW-Authenticate"]


async def test_wrong_secret_is_refused(client, clock):
    assert await status_with(client, jwt.encode(claims(clock), "another-secret-" * 3,
                                                algorithm="HS256")) == 401


async def test_tampered_payload_is_refused(client, clock):
    good = jwt.encode(claims(clock), SECRET, algorithm="HS256")
    header, _, signature = good.split(".")
    tampered = f"{header}.{b64(claims(clock, workspaces='*', sub='admin'))}.{signature}"
    assert await status_with(client, tampered) == 401


async def test_hs512_token_is_refused_when_hs256_is_pinned(client, clock):
    assert await status_with(client, jwt.encode(claims(clock), SECRET, algorithm="HS512")) == 401


async def test_expired_token_is_refused_with_reason_in_header_only(client, clock):
    token = jwt.encode(claims(clock, exp=int(clock.now()) - 60), SECRET, algorithm="HS256")
    response = await client.post(JOIN, headers=auth(token))
    assert response.status == 401
    assert (await response.json())["message"] == "Authentication required"
    assert 'error_description="token expired"' in response.headers["WWW-Authenticate"]


async def test_expiry_has_a_small_leeway(client, clock):
    token = jwt.encode(claims(clock, exp=int(clock.now()) - 5), SECRET, algorithm="HS256")
    assert await status_with(client, token) == 200


async def test_a_token_checked_once_is_still_judged_by_the_clock_at_every_use(client, clock):
    """Tokens are verified once and remembered (a publisher sends the same one each time);
    their time limits are not: the same token is refused once expired, and accepted only
    from its nbf."""
    token = jwt.encode(claims(clock, exp=int(clock.now()) + 60), SECRET, algorithm="HS256")
    assert await status_with(client, token) == 200
    assert await status_with(client, token) == 200
    clock.advance(71)  # past exp + the 10 s leeway
    response = await client.post(JOIN, headers=auth(token))
    assert response.status == 401
    assert 'error_description="token expired"' in response.headers["WWW-Authenticate"]
    early = jwt.encode(claims(clock, nbf=int(clock.now()) + 600), SECRET, algorithm="HS256")
    assert await status_with(client, early) == 401
    clock.advance(600)
    assert await status_with(client, early) == 200


async def test_only_tokens_that_passed_are_remembered_and_few_of_them(client, clock, monkeypatch):
    from gateway.auth import VERIFIED_CACHE
    from gateway.handlers.common import GATEWAY

    verifier = client.app[GATEWAY].verifier
    before = len(verifier._verified)
    for n in range(5):
        forged = jwt.encode(claims(clock, sub=f"u{n}"), "not the secret" * 3, algorithm="HS256")
        assert await status_with(client, forged) == 401
    assert len(verifier._verified) == before
    tokens = [jwt.encode(claims(clock, sub=f"v{n}"), SECRET, algorithm="HS256")
              for n in range(VERIFIED_CACHE + 10)]
    for token in tokens:
        verifier.verify(token)
        verifier.verify(tokens[0])  # used again and again: kept
    assert len(verifier._verified) == VERIFIED_CACHE
    assert all(len(key) == 32 for key in verifier._verified)  # each by its digest, not itself
    checked: list[str] = []
    check = verifier._check
    monkeypatch.setattr(verifier, "_check", lambda token: checked.append(token) or check(token))
    verifier.verify(tokens[0])
    verifier.verify(tokens[-1])
    assert checked == []  # remembered
    verifier.verify(tokens[1])  # the least recently used: forgotten
    assert checked == [tokens[1]]


async def test_token_without_exp_is_refused(client, clock):
    assert await status_with(client, jwt.encode(claims(clock, exp=None), SECRET,
                                                algorithm="HS256")) == 401


async def test_not_yet_valid_token_is_refused(client, clock):
    token = jwt.encode(claims(clock, nbf=int(clock.now()) + 600), SECRET, algorithm="HS256")
    assert await status_with(client, token) == 401


TEN_YEARS = 10 * 365 * 86_400


async def test_a_token_that_claims_to_live_longer_than_the_ceiling_is_refused_everywhere(client, clock):
    """A careless issuer's 10-year token: refused on REST, the stream and WebSocket auth."""
    now = int(clock.now())
    token = jwt.encode(claims(clock, exp=now + TEN_YEARS), SECRET, algorithm="HS256")
    response = await client.post(JOIN, headers=auth(token))
    assert response.status == 401
    body = await response.json()
    assert (body["error"], body["message"], body["status_code"]) == (
        "AUTHENTICATION_FAILED", "Authentication required", 401)
    assert "lifetime too long" in response.headers["WWW-Authenticate"]
    assert (await client.get(f"{BASE}/stream", headers=auth(token))).status == 401
    peer = await connect(client)
    answer = await peer.request("auth", token=token)
    assert answer["op"] == "error" and answer["error"]["status_code"] == 401, answer
    await peer.close()
    # A day (the default ceiling) is still fine; a second more is not.
    for lifetime, status in ((86_400, 200), (86_401, 401)):
        token = jwt.encode(claims(clock, exp=now + lifetime), SECRET, algorithm="HS256")
        assert await status_with(client, token) == status, lifetime


async def test_with_a_ceiling_iat_is_required_and_may_not_be_in_the_future(client, clock):
    now = int(clock.now())
    no_iat = jwt.encode(claims(clock, iat=None), SECRET, algorithm="HS256")
    assert await status_with(client, no_iat) == 401
    # An iat moved ahead would stretch a token past the ceiling: not valid until then.
    ahead = jwt.encode(claims(clock, iat=now + 3_600, exp=now + 7_200), SECRET, algorithm="HS256")
    assert await status_with(client, ahead) == 401
    within_leeway = jwt.encode(claims(clock, iat=now + 5), SECRET, algorithm="HS256")
    assert await status_with(client, within_leeway) == 200
    garbled = jwt.encode(claims(clock, iat="yesterday"), SECRET, algorithm="HS256")
    assert await status_with(client, garbled) == 401


async def test_no_ceiling_when_the_max_lifetime_is_zero(app_factory, settings, clock):
    client = await app_factory(replace(settings, jwt_max_lifetime=0))
    now = int(clock.now())
    for extra in ({"exp": now + TEN_YEARS}, {"iat": None}):
        assert await status_with(client, jwt.encode(claims(clock, **extra), SECRET,
                                                    algorithm="HS256")) == 200, extra


@pytest.mark.parametrize("bad", [
    {"sub": None}, {"sub": 42}, {"sub": ""}, {"org_id": None}, {"workspaces": None},
    {"workspaces": "ws-1"}, {"workspaces": [1, 2]}, {"permissions": "sync:read"},
    {"kind": "admin"},
])
async def test_malformed_claims_are_refused(client, clock, bad):
    assert await status_with(client, jwt.encode(claims(clock, **bad), SECRET,
                                                algorithm="HS256")) == 401


async def test_audience_and_issuer_are_checked_when_configured(app_factory, settings, clock):
    client = await app_factory(replace(settings, jwt_audience="sync", jwt_issuer="https://id.mm"))
    good = claims(clock, aud="sync", iss="https://id.mm")
    assert await status_with(client, jwt.encode(good, SECRET, algorithm="HS256")) == 200
    for bad in ({"aud": "billing"}, {"aud": None}, {"iss": "https://evil"}, {"iss": None}):
        token = jwt.encode({**good, **bad} if None not in bad.values()
                           else {k: v for k, v in good.items() if k not in bad}, SECRET,
                           algorithm="HS256")
        assert await status_with(client, token) == 401, bad


async def test_rs256_gateway_accepts_rs256_and_refuses_hs_confusion(
        app_factory, settings, clock, tmp_path):
    private, public = rsa_pair()
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public)
    client = await app_factory(replace(settings, jwt_secret=None, jwt_algorithm="RS256",
                                       jwt_public_key_file=str(key_file)))
    assert await status_with(client, jwt.encode(claims(clock), private, algorithm="RS256")) == 200
    # The classic confusion: sign HS256 with the public key as the HMAC secret.
    import hashlib
    import hmac
    header = b64({"alg": "HS256", "typ": "JWT"})
    body = b64(claims(clock))
    signature = base64.urlsafe_b64encode(
        hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    assert await status_with(client, f"{header}.{body}.{signature}") == 401
    other, _ = rsa_pair()
    assert await status_with(client, jwt.encode(claims(clock), other, algorithm="RS256")) == 401


async def test_es256_gateway(app_factory, settings, clock, tmp_path):
    private, public = ec_pair()
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public)
    client = await app_factory(replace(settings, jwt_secret=None, jwt_algorithm="ES256",
                                       jwt_public_key_file=str(key_file)))
    assert await status_with(client, jwt.encode(claims(clock), private, algorithm="ES256")) == 200
    rsa_private, _ = rsa_pair()
    assert await status_with(client, jwt.encode(claims(clock), rsa_private,
                                                algorithm="RS256")) == 401


# -- stream tickets ----------------------------------------------------------------

async def ticket_for(client, token: str, base: str = BASE) -> str:
    response = await client.post(f"{base}/tickets", headers=auth(token))
    assert response.status == 200
    body = await response.json()
    assert body["expires_in"] == 30
    return body["ticket"]


async def test_ticket_opens_the_stream_once(client, token):
    ticket = await ticket_for(client, token())
    response = await client.get(f"{BASE}/stream?ticket={ticket}")
    assert response.status == 200
    first = await SSEReader(response).next()
    assert first is not None and first.event == "sync.snapshot"
    response.close()
    again = await client.get(f"{BASE}/stream?ticket={ticket}")
    assert again.status == 401


async def test_a_request_refused_for_its_parameters_does_not_use_up_the_ticket(client, token):
    ticket = await ticket_for(client, token())
    refused = await client.get(f"{BASE}/stream?ticket={ticket}&timeout=5")
    assert refused.status == 422
    assert (await refused.json())["detail"][0]["loc"] == ["query", "timeout"]
    response = await client.get(f"{BASE}/stream?ticket={ticket}&timeout=60")
    assert response.status == 200
    response.close()


async def test_ticket_is_bound_to_its_workspace(client, token):
    ticket = await ticket_for(client, token(workspaces="*"))
    response = await client.get(f"/v1/orgs/{ORG}/workspaces/other/sync/stream?ticket={ticket}")
    assert response.status == 401
    # and it was consumed by the failed attempt: no second try either
    assert (await client.get(f"{BASE}/stream?ticket={ticket}")).status == 401


async def test_ticket_expires(client, token, clock):
    ticket = await ticket_for(client, token())
    clock.advance(31)
    assert (await client.get(f"{BASE}/stream?ticket={ticket}")).status == 401


@pytest.mark.parametrize("ticket", ["", "x", "a" * 500, "../../etc", "eyJhbGciOiJub25lIn0.e30."])
async def test_unknown_tickets_are_401(client, ticket):
    assert (await client.get(f"{BASE}/stream", params={"ticket": ticket})).status == 401


async def test_ticket_stream_counts_as_its_users_stream(client, token, clock):
    """The stream opened with alice's ticket is alice's: it keeps her REST session alive."""
    ticket = await ticket_for(client, token("alice", name="Alice"))
    response = await client.get(f"{BASE}/stream?ticket={ticket}")
    await SSEReader(response).next()
    await client.post(JOIN, headers=auth(token("alice", name="Alice")))
    await client.post(JOIN, headers=auth(token("bob")))
    clock.advance(300)  # ten TTLs: bob expires, alice is kept alive by her ticket stream
    for _ in range(100):
        body = await (await client.get(f"{BASE}/presence", headers=auth(token("x")))).json()
        if len(body["members"]) == 1:
            break
        await asyncio.sleep(0.02)
    assert [m["actor"] for m in body["members"]] == [{"type": "user", "id": "alice", "name": "Alice"}]
    response.close()


async def test_display_claims_must_be_encodable(client, clock):
    token = jwt.encode(claims(clock, name="\ud800"), SECRET, algorithm="HS256")
    assert await status_with(client, token) == 401
