"""The demo page as a user sees it: what is typed and clicked, and what the two panels show.
Everything is read from the page's DOM, never from the gateway."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.multinode.harness import eventually

PANELS = ("ws", "sse")  # the WebSocket panel and the EventSource panel


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a panel's event log."""

    id: str
    type: str
    actor: str
    data: Any


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Await ``check()`` until it returns a truthy value (returned); fail after ``timeout``."""
    return await eventually(check, timeout, interval=0.1, what=what)


class DemoPage:
    def __init__(self, page: Any, user: str) -> None:
        self.page = page
        self.user = user
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    async def open(self, url: str, token: str, org: str, workspace: str) -> None:
        await self.page.goto(f"{url}/demo/")
        await self.page.fill("#org", org)
        await self.page.fill("#workspace", workspace)
        await self.page.fill("#token", token)
        await self.page.click("#connect-button")
        await self.wait_open()

    async def wait_open(self, timeout: float = 15.0) -> None:
        for panel in PANELS:
            await until(lambda panel=panel: self.state_is(panel, "open"), timeout,
                        f"{self.user}'s {panel} panel open")

    async def state_is(self, panel: str, state: str) -> bool:
        return bool(await self.page.get_attribute(f"#{panel}", "data-state") == state)

    async def reconnect(self) -> None:
        await self.page.click("#disconnect-button")
        await self.page.click("#connect-button")
        await self.wait_open()

    async def node(self) -> str:
        """The node serving this page's WebSocket, as the panel shows it."""
        return str(await self.page.get_attribute("#ws", "data-node") or "")

    async def click(self, button: str) -> str:
        """Click an action button; the result line it leads to."""
        await self.page.evaluate("document.getElementById('result').textContent = ''")
        await self.page.click(f"#{button}")
        return str(await until(lambda: self.page.text_content("#result"), 10, f"{button} result"))

    async def join(self) -> str:
        return await self.click("join")

    async def leave(self) -> str:
        return await self.click("leave")

    async def viewing(self, resource_type: str, resource_id: str) -> str:
        await self.page.fill("#resource-type", resource_type)
        await self.page.fill("#resource-id", resource_id)
        return await self.click("set-viewing")

    async def publish(self, event_type: str, data: str) -> str:
        await self.page.fill("#event-type", event_type)
        await self.page.fill("#event-data", data)
        return await self.click("publish")

    async def members(self, panel: str) -> dict[str, str]:
        """user id -> what they view (space-separated ``type/id``), as the panel lists them."""
        return dict(await self.page.eval_on_selector_all(
            f"#{panel} [data-role=members] li",
            "items => items.map(item => [item.dataset.user, item.dataset.viewing])"))

    async def log(self, panel: str) -> list[Entry]:
        rows = await self.page.eval_on_selector_all(
            f"#{panel} [data-role=log] li",
            "items => items.map(item => [item.dataset.id, item.dataset.type, item.textContent])")
        entries = []
        for event_id, event_type, text in rows:
            _, actor, data = text.split(" · ", 2)
            entries.append(Entry(event_id, event_type, actor, json.loads(data)))
        return entries
