"""SCRAM-SHA-256 building blocks shared by ``scram_server`` and ``scram_client``.

Owns: the key schedule of RFC 5802 / RFC 7677 (SaltedPassword, ClientKey, StoredKey, ServerKey),
SASLprep of passwords as PostgreSQL applies it, the PBKDF2 cache, PostgreSQL's verifier string
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (``ScramVerifier``), the key set
that logs in without the plaintext (``ScramKeys``), and the attribute reader both sides parse
SCRAM messages with; and the channel-binding data of a certificate for SCRAM-SHA-256-PLUS
(``tls_server_end_point``, RFC 5929 section 4.1, the only binding type PostgreSQL supports).

PBKDF2 costs about 1 ms per 1000 iterations here; ``salted_password`` computes it at most once per
(password, salt, iterations), in a bounded LRU (``CACHE_SIZE`` entries) keyed by the SHA-256 of
the prepared password (the plaintext is not kept as a key). The cache is thread-safe, so callers
may run a derivation in a worker thread; two threads asking for the same secret wait for one
derivation.

Nothing here does I/O or keeps time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
#: The channel-binding type of SCRAM-SHA-256-PLUS (RFC 5929), the only one PostgreSQL knows.
TLS_SERVER_END_POINT = "tls-server-end-point"
#: The gs2-header of a channel-bound exchange (no authzid: PostgreSQL refuses one).
GS2_HEADER_PLUS = b"p=" + TLS_SERVER_END_POINT.encode() + b",,"
KEY_LENGTH = 32
DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
DEFAULT_SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN
NONCE_RAW_LENGTH = 18  # SCRAM_RAW_NONCE_LEN
CACHE_SIZE = 1024

# --- primitives -------------------------------------------------------------------------------


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def b64decode(data: bytes | str) -> bytes | None:
    """Strict base64 (alphabet and padding checked); None when invalid."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def new_nonce() -> bytes:
    """A fresh nonce as PostgreSQL makes them: 18 random bytes, base64 (printable, no comma)."""
    return b64encode(os.urandom(NONCE_RAW_LENGTH))


def is_printable(value: bytes) -> bool:
    """RFC 5802 ``printable``: %x21-2B / %x2D-7E (ASCII without controls, space and comma)."""
    return all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


# --- channel binding (RFC 5929) ----------------------------------------------------------------

def tls_server_end_point(cert_der: bytes) -> bytes:
    """The ``tls-server-end-point`` channel-binding data of a DER certificate (RFC 5929 section
    4.1): its hash with the hash of its signature algorithm, SHA-256 instead of MD5 or SHA-1.

    Raises ValueError for bytes that are not a certificate, and for a certificate whose
    signature has no hash (Ed25519, Ed448) or an unknown one: RFC 5929 defines no binding data
    for them and PostgreSQL (``be_tls_get_certificate_hash``) refuses them too."""
    # imported here: loading cryptography.x509 costs ~80 ms, and most users of this module
    # (every SCRAM exchange without TLS, the management client) never need it
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"channel binding: unknown signature algorithm in the certificate "
                         f"({exc})") from None
    if algorithm is None:
        oid = cert.signature_algorithm_oid.dotted_string
        raise ValueError(f"channel binding: the certificate's signature algorithm ({oid}) uses "
                         "no hash, so it has no tls-server-end-point data")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# --- SASLprep (RFC 4013), as PostgreSQL's pg_saslprep ------------------------------------------

def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


_PROHIBITED: tuple[Callable[[str], bool], ...] = (
    stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
    stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
    stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9, stringprep.in_table_a1,
)


def _saslprep_or_none(password: str) -> str | None:
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in password if not stringprep.in_table_b1(c))
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not prepared:
        return None
    for c in prepared:
        if any(table(c) for table in _PROHIBITED):
            return None
    if any(stringprep.in_table_d1(c) for c in prepared) and (
            any(stringprep.in_table_d2(c) for c in prepared)
            or not (stringprep.in_table_d1(prepared[0])
                    and stringprep.in_table_d1(prepared[-1]))):
        return None
    return prepared


def saslprep(password: str) -> bytes:
    """The bytes PBKDF2 hashes: SASLprep'd UTF-8, or the password's own bytes when SASLprep
    refuses it (prohibited characters, invalid UTF-8), as PostgreSQL and libpq both do. ASCII
    passwords are used as they are."""
    if password.isascii():
        return password.encode("ascii")
    prepared = _saslprep_or_none(password)
    return _utf8(password if prepared is None else prepared)


# --- PBKDF2 with a cache ----------------------------------------------------------------------

_CacheKey = tuple[bytes, bytes, int]
_cache: OrderedDict[_CacheKey, bytes] = OrderedDict()
_inflight: dict[_CacheKey, threading.Event] = {}
_lock = threading.Lock()


def _cache_key(password: str, salt: bytes, iterations: int) -> tuple[_CacheKey, bytes]:
    prepared = saslprep(password)
    return (sha256(prepared), bytes(salt), iterations), prepared


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """``Hi(SASLprep(password), salt, iterations)``, computed at most once per secret."""
    if iterations < 1:
        raise ValueError("iteration count must be positive")
    key, prepared = _cache_key(password, salt, iterations)
    while True:
        with _lock:
            value = _cache.get(key)
            if value is not None:
                _cache.move_to_end(key)
                return value
            event = _inflight.get(key)
            owner = event is None
            if event is None:
                event = _inflight[key] = threading.Event()
        if not owner:
            event.wait()
            continue  # the owner stored it (or failed: then derive ourselves)
        try:
            value = hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations)
            with _lock:
                _cache[key] = value
                while len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
            return value
        finally:
            with _lock:
                del _inflight[key]
            event.set()


def is_derived(password: str, salt: bytes, iterations: int) -> bool:
    """Is the SaltedPassword for this secret cached (so deriving it costs nothing)?"""
    key, _ = _cache_key(password, salt, iterations)
    with _lock:
        return key in _cache


def clear_cache() -> None:
    with _lock:
        _cache.clear()


# --- keys and verifiers -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (``pg_authid.rolpassword``).

    Knowing it lets pgcorral check a client's proof (StoredKey) and sign as the server
    (ServerKey); it does not let anyone log in to PostgreSQL by itself."""

    iterations: int
    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.iterations < 1 or not self.salt:
            raise ValueError("SCRAM verifier needs a salt and a positive iteration count")
        if len(self.stored_key) != KEY_LENGTH or len(self.server_key) != KEY_LENGTH:
            raise ValueError("SCRAM verifier keys must be 32 bytes")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``; ValueError."""
        scheme, sep1, rest = text.partition("$")
        params, sep2, keys = rest.partition("$")
        iterations, sep3, salt_b64 = params.partition(":")
        stored_b64, sep4, server_b64 = keys.partition(":")
        if scheme != SCRAM_SHA_256 or not (sep1 and sep2 and sep3 and sep4):
            raise ValueError("not a SCRAM-SHA-256 verifier")
        if not iterations.isascii() or not iterations.isdigit() or len(iterations) > 10:
            raise ValueError("invalid iteration count in SCRAM verifier")
        salt = b64decode(salt_b64)
        stored = b64decode(stored_b64)
        server = b64decode(server_b64)
        if salt is None or stored is None or server is None:
            raise ValueError("invalid base64 in SCRAM verifier")
        return cls(int(iterations), salt, stored, server)

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS) -> ScramVerifier:
        """Build a verifier as PostgreSQL does. Pass the same ``salt`` for a user every time
        (or keep the verifier): a new salt means a new PBKDF2 derivation."""
        return ScramKeys.from_password(password, salt, iterations).verifier

    def __str__(self) -> str:
        return (f"{SCRAM_SHA_256}${self.iterations}:{b64encode(self.salt).decode()}"
                f"${b64encode(self.stored_key).decode()}:{b64encode(self.server_key).decode()}")


def is_scram_verifier(text: str) -> bool:
    try:
        ScramVerifier.parse(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """Enough to log in to PostgreSQL as a user without the plaintext: the ClientKey (which
    produces proofs), and the ServerKey (which checks the server's signature; None means the
    server is not authenticated). Valid only against the verifier with this salt and count."""

    client_key: bytes = field(repr=False)
    server_key: bytes | None = field(repr=False)
    salt: bytes = field(repr=False)
    iterations: int

    def __post_init__(self) -> None:
        if len(self.client_key) != KEY_LENGTH or (
                self.server_key is not None and len(self.server_key) != KEY_LENGTH):
            raise ValueError("SCRAM keys must be 32 bytes")

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS) -> ScramKeys:
        if salt is None:
            salt = os.urandom(DEFAULT_SALT_LENGTH)
        salted = salted_password(password, salt, iterations)
        return cls(hmac_sha256(salted, b"Client Key"), hmac_sha256(salted, b"Server Key"),
                   salt, iterations)

    @property
    def stored_key(self) -> bytes:
        return sha256(self.client_key)

    @property
    def verifier(self) -> ScramVerifier:
        if self.server_key is None:
            raise ValueError("no ServerKey: the verifier is not known")
        return ScramVerifier(self.iterations, self.salt, self.stored_key, self.server_key)


def verify_plain_password(password: str, verifier: ScramVerifier) -> bool:
    """Does a cleartext password (AuthenticationCleartextPassword) match a SCRAM verifier?"""
    keys = ScramKeys.from_password(password, verifier.salt, verifier.iterations)
    return hmac.compare_digest(keys.stored_key, verifier.stored_key) and (
        keys.server_key is not None
        and hmac.compare_digest(keys.server_key, verifier.server_key))


# --- message parsing --------------------------------------------------------------------------

def sanitize_char(c: int | None) -> str:
    """How PostgreSQL quotes a character in SCRAM error details (``None``: end of string)."""
    if c is None:
        c = 0
    return f"\"'{chr(c)}'\"" if 0x21 <= c <= 0x7E else f'"0x{c:02x}"'


def sanitize_str(value: bytes) -> str:
    """How PostgreSQL quotes a client's string in SCRAM errors: printable ASCII kept, anything
    else ``?``, at most 30 characters."""
    return "".join(chr(c) if 0x21 <= c <= 0x7E else "?" for c in value[:30])


class AttributeReader:
    """Reads ``a=value`` attributes separated by commas, as PostgreSQL's ``read_attr_value`` /
    ``read_any_attr``. ``fail(detail)`` builds the exception to raise for malformed input."""

    __slots__ = ("data", "fail", "pos")

    def __init__(self, data: bytes, fail: Callable[[str], Exception], pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.fail = fail

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def _value(self) -> bytes:
        end = self.data.find(b",", self.pos)
        if end < 0:
            value, self.pos = self.data[self.pos:], len(self.data)
        else:
            value, self.pos = self.data[self.pos:end], end + 1
        return value

    def expect(self, attr: str) -> bytes:
        c = self.peek()
        if c != ord(attr):
            raise self.fail(f'Expected attribute "{attr}" but found {sanitize_char(c)}.')
        if self.data[self.pos + 1:self.pos + 2] != b"=":
            raise self.fail(f'Expected character "=" for attribute "{attr}".')
        self.pos += 2
        return self._value()

    def any(self) -> tuple[str, bytes]:
        c = self.peek()
        if c is None:
            raise self.fail("Attribute expected, but found end of string.")
        if not (0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A):
            raise self.fail(f"Attribute expected, but found invalid character "
                            f"{sanitize_char(c)}.")
        if self.data[self.pos + 1:self.pos + 2] != b"=":
            raise self.fail(f'Expected character "=" for attribute "{chr(c)}".')
        self.pos += 2
        return chr(c), self._value()


def auth_message(client_first_bare: bytes, server_first: bytes,
                 client_final_without_proof: bytes) -> bytes:
    return client_first_bare + b"," + server_first + b"," + client_final_without_proof
