"""TLS under a connection: ``TlsLink`` sits between a socket's transport and an Endpoint.

Toward the socket it is the asyncio protocol (ciphertext in); toward the Endpoint it is the
transport (plaintext out): the Endpoint keeps calling ``self.transport.write``,
``pause_reading`` and ``close`` and does not know TLS is there. The records go through
``ssl.MemoryBIO`` pairs of an ``ssl.SSLObject``, so:

* a handshake can start on bytes already read (direct TLS: the ClientHello arrived where a
  startup packet was expected), which ``loop.start_tls`` cannot do;
* every decrypted byte of a read is handed on in one ``data_received`` call (a chunk of
  several records is one relay write, as without TLS);
* flow control stays cross-wired: the socket's ``pause_writing`` reaches the Endpoint, and
  the Endpoint's ``pause_reading`` reaches the socket.

Renegotiation is refused by the contexts (``security.tls``: OP_NO_RENEGOTIATION; TLS 1.3 has
none). A TLS connection costs the SSLObject, two BIOs and this object: bench/README.md has
the measured memory per idle client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pgcorral.tls")

#: Plaintext read from the SSLObject per call: a call returns at most one TLS record, which
#: holds at most 16 KiB (a larger buffer would be allocated, and maybe mmapped, per call).
READ_SIZE = 1 << 14

#: The app and the BIOs of a link whose connection is gone (``_release``): they keep nothing
#: alive (nothing is written into the BIO once the link let go of its SSLObject).
_DETACHED = asyncio.Protocol()
_EMPTY = ssl.MemoryBIO()

#: Called once the handshake is done (the link is ready), or with the error that ended it.
Ready = Callable[["TlsLink"], None]
Failed = Callable[["TlsLink", Exception], None]


class TlsLink(asyncio.Protocol):
    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, *, server_side: bool,
                 app: asyncio.Protocol, on_ready: Ready, on_failed: Failed,
                 hostname: str | None = None) -> None:
        self.raw = raw
        self.app = app
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=hostname)
        self.ready = False
        self.closed = False
        self._on_ready: Ready | None = on_ready
        self._on_failed: Failed | None = on_failed
        raw.set_protocol(self)

    @property
    def ssl(self) -> ssl.SSLObject:
        """The TLS connection (until it is gone: ``connection_lost``)."""
        obj = self._ssl
        if obj is None:
            raise ConnectionResetError("the TLS connection is gone")
        return obj

    # --- handshake ---------------------------------------------------------------------------

    def start(self, received: bytes = b"") -> None:
        """Begin the handshake, with ``received`` the bytes of it already read (direct TLS)."""
        if received:
            self._in.write(received)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self._flush()  # the alert that says why
            self._fail(exc)
            return
        self._flush()
        self.ready = True
        on_ready, self._on_ready, self._on_failed = self._on_ready, None, None
        if on_ready is not None:
            on_ready(self)
        if not self.closed and self._in.pending:
            self._read()  # application data that came with the last handshake flight

    def _fail(self, exc: Exception) -> None:
        on_failed, self._on_ready, self._on_failed = self._on_failed, None, None
        self.closed = True
        self.raw.close()
        if on_failed is not None:
            on_failed(self, exc)

    # --- the socket's protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ssl is None:
            return
        self._in.write(data)
        if self.ready:
            self._read()
        elif self._on_ready is not None:
            self._handshake()

    def _read(self) -> None:
        sslobj = self._ssl
        if sslobj is None:
            return
        read = sslobj.read
        incoming = self._in
        try:
            data = read(READ_SIZE)
            # more records came (or, the buffer full, more of this one is decrypted): one
            # chunk for the Endpoint
            if data and (incoming.pending or (len(data) == READ_SIZE and sslobj.pending())):
                parts = [data]
                while incoming.pending or sslobj.pending():
                    try:
                        more = read(READ_SIZE)
                    except ssl.SSLWantReadError:  # a record's start, the rest still to come
                        break
                    if not more:
                        break
                    parts.append(more)
                data = b"".join(parts)
        except ssl.SSLWantReadError:
            if self._out.pending:
                self._flush()
            return
        except ssl.SSLZeroReturnError:
            data = b""
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS error, closing the connection: %s", exc)
            self._flush()
            self.abort()
            return
        if self._out.pending:  # e.g. a TLS 1.3 key update answered
            self._flush()
        if data:
            self.app.data_received(data)
        elif not self.closed:  # close_notify from the peer
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._on_failed is not None:  # lost during the handshake
            self._fail(exc if isinstance(exc, Exception) else ConnectionResetError(
                "connection closed during the TLS handshake"))
        elif self.ready:
            self.app.connection_lost(exc)
        self._release()

    def _release(self) -> None:
        """Let go of the OpenSSL object, its buffers and the Endpoint once the connection is
        gone. The Endpoint (and whatever it is in a reference cycle with: its task, its bound
        callbacks) may wait for the cyclic GC, which does not count OpenSSL's memory (~10 KiB
        a connection, more after big writes): it piled up by tens of MiB under connection
        churn (bench/tls_memory.py) before this."""
        self.app = _DETACHED
        self._ssl = None
        self._in = self._out = _EMPTY

    def eof_received(self) -> bool:
        return False  # no half-open TLS: the transport closes

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # --- the Endpoint's transport ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        obj = self._ssl
        if self.closed or obj is None:
            return
        # one call: OpenSSL writes the whole buffer into a memory BIO (no partial writes;
        # a memoryview slicing loop here also misbehaved when compiled with mypyc); records
        # always come out of it
        obj.write(data)
        self.raw.write(self._out.read())

    def can_write_eof(self) -> bool:
        return False  # a TLS stream ends with close_notify, not a half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot half-close")

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        out = self._out
        if out.pending:
            self.raw.write(out.read())

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return bool(self.raw.is_reading())

    def close(self) -> None:
        """close_notify, then the socket closes once its buffer is written."""
        if self.closed:
            return
        self.closed = True
        if self.ready and self._ssl is not None:
            try:
                self._ssl.unwrap()
            except (ssl.SSLError, OSError):
                pass  # SSLWantReadError: the peer's close_notify is not awaited
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.closed = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.closed or bool(self.raw.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        obj = self._ssl
        if name == "ssl_object":
            return obj
        if name == "peercert":
            return obj.getpeercert() if obj is not None else default
        if name == "cipher":
            return obj.cipher() if obj is not None else default
        if name == "socket":
            return None  # the socket alone is not the connection (no hand-over of TLS)
        return self.raw.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return int(self.raw.get_write_buffer_size())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.app = protocol
