"""The HTTP services beside management: the Prometheus endpoint (``metrics = PORT``) and the
web console (``console = PORT``). Started by whoever serves management (``supervisor.main``
with one process, ``supervisor.multi`` with several workers); both read the pooler through the
same ``Controller`` the management commands use (``stats``, all workers added up).
"""

from __future__ import annotations

from pgcorral.management import console, metrics
from pgcorral.management.commands import Controller
from pgcorral.management.http import HttpServer


async def start_http(controller: Controller) -> list[HttpServer]:
    """Start the services the configuration asks for; the servers (``close`` each at exit)."""
    main = controller.config.main
    servers: list[HttpServer] = []
    if main.metrics:
        server = HttpServer("metrics", metrics.routes(controller), metrics.tls_context(main))
        await server.start(main.host, main.metrics)
        servers.append(server)
    if main.console:
        routes, state = console.service(controller)
        server = HttpServer("console", routes, metrics.tls_context(main))
        await server.start(main.host, main.console)
        server.run_beside(state.run())  # the history sampler
        servers.append(server)
    return servers
