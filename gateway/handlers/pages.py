"""What a web page loads from the gateway: the browser client module, and the demo page.

``GET /client/mm-sync.js`` is always served: a page imports the client from the gateway it
talks to (an allowed origin may import it cross-origin: CORS headers come with it). The
demo page (``/demo/``) is served in dev mode or with ``--demo``. Only the files named here
are served: no directory listing, no path from the request touches the file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

STATIC: Final = Path(__file__).resolve().parent.parent / "static"
CLIENT_MODULE: Final = STATIC / "client" / "mm-sync.js"
DEMO_FILES: Final = {
    "": STATIC / "demo" / "index.html",
    "demo.js": STATIC / "demo" / "demo.js",
    "demo.css": STATIC / "demo" / "demo.css",
}
_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
# The page runs only its own files and talks only to the gateway that served it; event data
# is shown as text, and no other site may frame it.
DEMO_POLICY: Final = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                      "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _file(path: Path, **headers: str) -> web.FileResponse:
    return web.FileResponse(path, headers={
        "Content-Type": f"{_TYPES[path.suffix]}; charset=utf-8",
        # Served from a stable path: revalidate (ETag / Last-Modified) so an upgraded gateway's
        # client reaches pages at once.
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        **headers,
    })


async def client_module(request: web.Request) -> web.FileResponse:
    return _file(CLIENT_MODULE)


async def demo_redirect(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/demo/")


async def demo_file(request: web.Request) -> web.FileResponse:
    path = DEMO_FILES.get(request.match_info.get("name", ""))
    if path is None:
        raise web.HTTPNotFound()  # the error middleware answers with the 404 envelope
    return _file(path, **{"Content-Security-Policy": DEMO_POLICY, "Referrer-Policy": "no-referrer"})


def routes(demo: bool) -> list[web.RouteDef]:
    """The client module's route, and the demo page's when ``demo``."""
    served = [web.get("/client/mm-sync.js", client_module, allow_head=True)]
    if demo:
        served += [
            web.get("/demo", demo_redirect),
            web.get("/demo/", demo_file),
            web.get("/demo/{name}", demo_file),
        ]
    return served
