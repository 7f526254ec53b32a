"""Session pooling: a server connection belongs to one client for the client's whole session.

While linked, bytes flow untouched (see ``net.client`` / ``net.server`` ``data_received``).
When the client leaves, ``reusable`` decides whether the server connection can serve another
client: only if the client's stream stopped on a message boundary and the server's last words
were a ReadyForQuery. Then an open transaction is rolled back and ``server_reset_query`` runs,
and the replies are checked one by one; anything unexpected closes the connection instead
(``net.client.ClientConnection.release``). The ``performance`` pipeline is the same code:
pgcorral's session path already does the minimum.
"""

from __future__ import annotations

#: Seconds a reset may take before the connection is closed instead.
RESET_TIMEOUT = 10.0


def reusable(clean: bool, client_dirty: bool, at_boundary: bool, server_status: int,
             poolable: bool, closed: bool) -> bool:
    """May the server connection be reset and pooled when its client leaves?

    ``clean``: the client left normally; ``client_dirty``: the server saw a partial message
    (a Terminate split across chunks); ``at_boundary``: the client's stream stopped between
    messages; ``server_status``: the status byte of the server's last ReadyForQuery, -1 when
    its last chunk did not end with one."""
    return (clean and not client_dirty and at_boundary and server_status != -1 and poolable
            and not closed)
