"""PostgreSQL protocol v3, sans-IO: bytes in, events and bytes out.

Nothing in this package may import asyncio, socket, ssl or time (``tests/unit/test_layering.py``
checks it): it is driven by the network layer and by unit tests alike.
"""
