"""What happens between a linked client and server, and when a server goes back to the pool.

``session`` serves the ``performance``, ``session`` and ``auto`` pipelines: the server is held
for the whole client session.
"""
