"""The web console (``console = PORT``): one page and the JSON API behind it.
(Being written: see issue 12.)"""

from __future__ import annotations

from pgcorral.management.commands import Controller
from pgcorral.management.http import Request, Response, Route, text


def routes(controller: Controller) -> dict[str, Route]:
    async def page(request: Request) -> Response:
        return text(503, "not yet")
    return {"/": page}
