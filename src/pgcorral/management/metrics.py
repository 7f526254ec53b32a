"""The Prometheus endpoint: pgagroal's metric names and labels, and pgcorral's own under
``pgcorral_``. (Being written: see issue 12.)"""

from __future__ import annotations

import ssl

from pgcorral.config.model import MainConfig
from pgcorral.management.commands import Controller
from pgcorral.management.http import Request, Response, Route, text


def tls_context(main: MainConfig) -> ssl.SSLContext | None:
    """HTTPS for the metrics and console ports when ``metrics_cert_file`` and
    ``metrics_key_file`` are set."""
    return None


def routes(controller: Controller) -> dict[str, Route]:
    async def metrics(request: Request) -> Response:
        return text(503, "not yet")
    return {"/metrics": metrics}
