"""Management: the protocol pgcorral-cli speaks with the daemon, the daemon's management server
(local unix socket, authenticated remote TCP) and the command dispatch table.

``protocol`` is pure (framing, command names); ``client`` is the blocking client the CLI uses;
``server`` and ``commands`` run inside the daemon and act only through ``net.context.Context``
and the supervisor's controller interface.
"""
