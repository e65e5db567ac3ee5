"""Browser pages on an allowed origin can use REST and SSE; other origins cannot read answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import BASE, auth
from tests.sse_client import SSEReader

APP = "https://app.mechamental.com"


@pytest.fixture
async def cors_client(app_factory, settings):
    return await app_factory(replace(settings, allowed_origins=(APP,)))


async def test_preflight_of_an_allowed_origin(cors_client):
    response = await cors_client.options(f"{BASE}/tickets", headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "POST"}


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.mechamental.com.evil.net",
                                    "http://app.mechamental.com", "null"])
async def test_preflight_of_another_origin_is_403(cors_client, origin):
    response = await cors_client.options(f"{BASE}/tickets", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    assert (await response.json())["details"] == {"reason": "origin_not_allowed"}


async def test_preflight_of_an_unknown_route_is_404(cors_client):
    response = await cors_client.options("/v1/nothing", headers={
        "Origin": APP, "Access-Control-Request-Method": "GET"})
    assert response.status == 404


async def test_answers_and_errors_carry_cors_headers_for_an_allowed_origin(cors_client, token):
    ok = await cors_client.post(f"{BASE}/tickets", headers={**auth(token()), "Origin": APP})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in ok.headers.getall("Vary")
    refused = await cors_client.post(f"{BASE}/tickets", headers={"Origin": APP})
    assert refused.status == 401  # the page can read why
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]


async def test_event_source_from_an_allowed_origin_gets_cors_on_the_stream(cors_client, token):
    ticket = (await (await cors_client.post(f"{BASE}/tickets", headers=auth(token()))).json())["ticket"]
    response = await cors_client.get(f"{BASE}/stream?ticket={ticket}", headers={"Origin": APP})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert (await SSEReader(response).next()).event == "sync.snapshot"
    response.close()


async def test_other_origins_get_no_cors_headers(cors_client, token):
    response = await cors_client.post(f"{BASE}/tickets",
                                      headers={**auth(token()), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_without_allowed_origins_no_page_may_read(client, token):
    response = await client.post(f"{BASE}/tickets", headers={**auth(token()), "Origin": APP})
    assert "Access-Control-Allow-Origin" not in response.headers
