"""A chat-completions endpoint of a test's own, on a real aiohttp server over loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A minimal streamed request body, as the client sends it.
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'


async def serve(aiohttp_server: Any, handler: Handler) -> str:
    """The URL of ``POST /v1/chat/completions`` answered by ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1/chat/completions"))
