"""The user vault: the master key and the encrypted password files (users, frontend users,
admins, superuser).

Owns the two file formats, their encryption, and the permission rules of the master key. It does
no networking, prompts for nothing and prints nothing: problems are raised as one
``ConfigError`` holding one line per problem (``file:line: what is wrong``), never a traceback.

Master key file (``~/.pgcorral/master.key``; ``$PGCORRAL_MASTER_KEY_FILE`` overrides the path).
One line of five fields separated by ``:``::

    pgcorral-master-key:1:600000:<base64 16-byte salt>:<base64 UTF-8 passphrase>

The passphrase is stretched with PBKDF2-HMAC-SHA256 over the salt for the given number of
iterations (600,000 when created by pgcorral, as pgagroal 2.1) into the 32-byte master key. The
result is cached per process, so a process pays the stretching once. The file must be a regular
file owned by the current user with no group or other permission bits (``0600``), in a directory
owned by the current user with none either (``0700``); otherwise it is refused with the
``chmod`` that fixes it.

Vault files: one ``user:base64(blob)`` line per user; ``#`` comments and blank lines are allowed
and kept when the file is rewritten. ``blob`` is a 16-byte salt, a 12-byte nonce and the
AES-256-GCM ciphertext of the UTF-8 password followed by its 16-byte tag. The entry key is
``HKDF-SHA256(master key, salt, info=b"pgcorral vault entry v1")``, 32 bytes, and the user name
is the associated data, so an entry moved to another user's line does not decrypt.

Limits: user names are 1-128 characters without ``:``, control characters or surrounding
spaces, and do not start with ``#``; passwords are 1-8192 UTF-8 bytes without NUL.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgcorral.errors import ConfigError

#: PBKDF2 iterations for a new master key (pgagroal 2.1's count). Tests pass a lower count to
#: ``MasterKey.create``; the count is stored in the file, so loading follows it.
PBKDF2_ITERATIONS = 600_000
MAX_PASSWORD_BYTES = 8192
MAX_USER_CHARS = 128
MASTER_KEY_MIN_CHARS = 8

_MAGIC = "pgcorral-master-key"
_FORMAT_VERSION = "1"
_SALT_LEN = 16
_NONCE_LEN = 12
_TAG_LEN = 16
_HKDF_INFO = b"pgcorral vault entry v1"
_MAX_MASTER_KEY_FILE = 64 * 1024


def default_master_key_path() -> str:
    """``$PGCORRAL_MASTER_KEY_FILE``, else ``$HOME/.pgcorral/master.key``."""
    override = os.environ.get("PGCORRAL_MASTER_KEY_FILE")
    if override:
        return override
    return os.path.join(os.path.expanduser("~"), ".pgcorral", "master.key")


def master_key_weakness(passphrase: str) -> str | None:
    """The first master key rule ``passphrase`` breaks, or None when it follows them all."""
    if len(passphrase) < MASTER_KEY_MIN_CHARS:
        return f"the master key must have at least {MASTER_KEY_MIN_CHARS} characters"
    if not any(c.isupper() for c in passphrase):
        return "the master key must have at least one upper case letter"
    if not any(c.islower() for c in passphrase):
        return "the master key must have at least one lower case letter"
    if not any(c.isdigit() for c in passphrase):
        return "the master key must have at least one digit"
    if not any(not c.isalnum() and not c.isspace() for c in passphrase):
        return "the master key must have at least one special character (!, @, #, ...)"
    if len(passphrase.encode("utf-8", "replace")) > MAX_PASSWORD_BYTES:
        return f"the master key must not be longer than {MAX_PASSWORD_BYTES} bytes"
    return None


def master_key_exists(path: str) -> str | None:
    """The refusal to replace an existing master key at ``path``, or None when there is none."""
    return _already_exists(path) if os.path.lexists(path) else None


def _already_exists(path: str) -> str:
    return (f"{path}: a master key already exists; every vault file is encrypted with it, so it "
            "is never replaced (to change it, remove it yourself and re-add every user)")


@functools.lru_cache(maxsize=16)
def _stretch(passphrase: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", passphrase, salt, iterations, 32)


def _check_private(path: str, st: os.stat_result, *, directory: bool) -> str | None:
    """Why ``path`` may not hold a master key (owner, type, mode), or None."""
    if directory and not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is not owned by the current user: chown {os.geteuid()} {path}"
    if st.st_mode & 0o077:
        mode = "0700" if directory else "0600"
        return (f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, which lets other users in: "
                f"chmod {mode} {path}")
    return None


@dataclass(frozen=True, repr=False)
class MasterKey:
    """The 32-byte key every vault file is encrypted with, and the file it came from."""

    key: bytes
    path: str

    def __repr__(self) -> str:  # never show the key
        return f"MasterKey(path={self.path!r})"

    @classmethod
    def create(cls, passphrase: str, path: str | None = None, *,
               iterations: int = PBKDF2_ITERATIONS) -> MasterKey:
        """Write a new master key file (never overwriting one) and return the key.

        The directory is created 0700 when missing; an existing directory must already be
        private. A passphrase breaking a rule of ``master_key_weakness`` is refused.
        """
        path = path or default_master_key_path()
        weakness = master_key_weakness(passphrase)
        if weakness:
            raise ConfigError([f"{path}: {weakness}"])
        if iterations < 1:
            raise ConfigError([f"{path}: iterations must be positive"])
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            problem = _check_private(directory, os.stat(directory), directory=True)
            if problem:
                raise ConfigError([problem])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise ConfigError([_already_exists(path)])
        except OSError as e:
            raise ConfigError([f"{path}: cannot create the master key: {e.strerror}"])
        salt = secrets.token_bytes(_SALT_LEN)
        secret = passphrase.encode("utf-8")
        line = ":".join((_MAGIC, _FORMAT_VERSION, str(iterations),
                         base64.b64encode(salt).decode(), base64.b64encode(secret).decode()))
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(_stretch(secret, salt, iterations), path)

    @classmethod
    def load(cls, path: str | None = None) -> MasterKey:
        """Read, check and stretch the master key file (the stretching is cached)."""
        path = path or default_master_key_path()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            problem = _check_private(directory, os.stat(directory), directory=True)
            if problem:
                raise ConfigError([problem])
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no master key: create one with "
                               "'pgcorral-admin master-key'"])
        except OSError as e:
            raise ConfigError([f"{path}: cannot read the master key: {e.strerror}"])
        with os.fdopen(fd, "rb") as f:
            problem = _check_private(path, os.fstat(f.fileno()), directory=False)
            if problem:
                raise ConfigError([problem])
            raw = f.read(_MAX_MASTER_KEY_FILE + 1)
        return cls(_parse_master_key(path, raw), path)


def _parse_master_key(path: str, raw: bytes) -> bytes:
    bad = ConfigError([f"{path}: not a pgcorral master key file (expected one line "
                       f"'{_MAGIC}:{_FORMAT_VERSION}:ITERATIONS:SALT:KEY')"])
    try:
        fields = raw.decode("ascii").strip().split(":")
    except UnicodeDecodeError:
        raise bad
    if len(raw) > _MAX_MASTER_KEY_FILE or len(fields) != 5 or fields[0] != _MAGIC:
        raise bad
    if fields[1] != _FORMAT_VERSION:
        raise ConfigError([f"{path}: master key format version {fields[1]!r} is not supported"])
    try:
        iterations = int(fields[2])
        salt = base64.b64decode(fields[3], validate=True)
        secret = base64.b64decode(fields[4], validate=True)
    except (ValueError, binascii.Error):
        raise bad
    if iterations < 1 or len(salt) < _SALT_LEN or not secret:
        raise bad
    return _stretch(secret, salt, iterations)


def user_problem(user: str) -> str | None:
    """Why ``user`` cannot name a vault entry, or None."""
    if not user:
        return "the user name is empty"
    if len(user) > MAX_USER_CHARS:
        return f"the user name is longer than {MAX_USER_CHARS} characters"
    if ":" in user:
        return "a user name may not contain ':'"
    if any(ord(c) < 32 or ord(c) == 127 for c in user):
        return "a user name may not contain control characters"
    if user != user.strip():
        return "a user name may not start or end with a space"
    if user.startswith("#"):
        return "a user name may not start with '#'"
    return None


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot go into a vault, or None."""
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        return "the password is not valid UTF-8"
    if not data:
        return "the password is empty"
    if len(data) > MAX_PASSWORD_BYTES:
        return f"the password is longer than {MAX_PASSWORD_BYTES} bytes"
    if b"\0" in data:
        return "the password contains a NUL character"
    return None


def _entry_key(master: MasterKey, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=_HKDF_INFO).derive(master.key)


def encrypt_password(master: MasterKey, user: str, password: str) -> bytes:
    """One vault blob: salt | nonce | AES-256-GCM(password, aad=user) | tag."""
    problem = password_problem(password)
    if problem:
        raise ValueError(problem)
    data = password.encode("utf-8")
    salt, nonce = secrets.token_bytes(_SALT_LEN), secrets.token_bytes(_NONCE_LEN)
    sealed = AESGCM(_entry_key(master, salt)).encrypt(nonce, data, user.encode("utf-8"))
    return salt + nonce + sealed


def decrypt_password(master: MasterKey, user: str, blob: bytes) -> str:
    """The password in ``blob``; InvalidTag when the key is wrong or the blob was altered."""
    salt, nonce = blob[:_SALT_LEN], blob[_SALT_LEN:_SALT_LEN + _NONCE_LEN]
    sealed = blob[_SALT_LEN + _NONCE_LEN:]
    data = AESGCM(_entry_key(master, salt)).decrypt(nonce, sealed, user.encode("utf-8"))
    return data.decode("utf-8")


@dataclass
class _Entry:
    user: str
    password: str
    line: str | None  # the file's line while unchanged; None once set() replaced it


class Vault:
    """The users of one vault file with their passwords, decrypted at load time.

    Keeps the file's comments, blank lines and order; ``save`` rewrites only changed entries.
    """

    def __init__(self, master: MasterKey, path: str | None = None) -> None:
        self.master = master
        self.path = path
        self._items: list[_Entry | str] = []  # entries, and comment/blank lines as text
        self._by_user: dict[str, _Entry] = {}

    @classmethod
    def load(cls, path: str, master: MasterKey, *, missing_ok: bool = False) -> Vault:
        """Read and decrypt every entry of ``path``; all problems raised in one ConfigError."""
        vault = cls(master, path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if missing_ok:
                return vault
            raise ConfigError([f"{path}: no such file"])
        except OSError as e:
            raise ConfigError([f"{path}: cannot read: {e.strerror}"])
        problems: list[str] = []
        undecryptable: list[str] = []
        entries = 0
        for number, line in enumerate(raw.splitlines(), 1):
            where = f"{path}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{where}: not valid UTF-8")
                continue
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                vault._items.append(text)
                continue
            entries += 1
            parsed = vault._parse_entry(where, stripped)
            if isinstance(parsed, str):
                problems.append(parsed)
            elif parsed is None:
                undecryptable.append(f"{where}: the entry does not decrypt with the master key "
                                     f"{master.path} (it was altered, or written with another "
                                     "master key)")
        if undecryptable and len(undecryptable) == entries and not problems:
            problems.append(f"{path}: no entry decrypts with the master key {master.path}: "
                            "wrong master key for this file, or every entry altered (files "
                            "written by pgagroal must be re-created with pgcorral-admin)")
        else:
            problems += undecryptable
        if problems:
            raise ConfigError(problems)
        return vault

    def _parse_entry(self, where: str, text: str) -> _Entry | str | None:
        """The entry on a line; a problem as text; None when it does not decrypt."""
        user, sep, encoded = text.partition(":")
        user = user.strip()
        if not sep:
            return f"{where}: expected 'user:base64(encrypted password)'"
        problem = user_problem(user)
        if problem:
            return f"{where}: {problem}"
        if user in self._by_user:
            return f"{where}: user {user!r} appears twice"
        try:
            blob = base64.b64decode(encoded.strip(), validate=True)
        except (ValueError, binascii.Error):
            return f"{where}: user {user!r}: the encrypted password is not valid base64"
        if len(blob) < _SALT_LEN + _NONCE_LEN + _TAG_LEN + 1:
            return f"{where}: user {user!r}: the encrypted password is too short"
        if len(blob) > _SALT_LEN + _NONCE_LEN + _TAG_LEN + MAX_PASSWORD_BYTES:
            return f"{where}: user {user!r}: the encrypted password is too long"
        try:
            password = decrypt_password(self.master, user, blob)
        except InvalidTag:
            return None
        except UnicodeDecodeError:
            return f"{where}: user {user!r}: the password is not valid UTF-8"
        entry = _Entry(user, password, text)
        self._items.append(entry)
        self._by_user[user] = entry
        return entry

    def get(self, user: str) -> str | None:
        entry = self._by_user.get(user)
        return entry.password if entry else None

    def __contains__(self, user: object) -> bool:
        return user in self._by_user

    def __len__(self) -> int:
        return len(self._by_user)

    def users(self) -> list[str]:
        """User names in file order."""
        return [item.user for item in self._items if isinstance(item, _Entry)]

    def set(self, user: str, password: str) -> None:
        """Add ``user`` or replace its password (encrypted afresh on ``save``)."""
        where = self.path or "vault"
        problem = user_problem(user)
        if problem:
            raise ConfigError([f"{where}: {problem}"])
        problem = password_problem(password)
        if problem:
            raise ConfigError([f"{where}: user {user!r}: {problem}"])
        entry = self._by_user.get(user)
        if entry is None:
            entry = _Entry(user, password, None)
            self._items.append(entry)
            self._by_user[user] = entry
        else:
            entry.password, entry.line = password, None

    def delete(self, user: str) -> None:
        entry = self._by_user.pop(user, None)
        if entry is None:
            raise ConfigError([f"{self.path or 'vault'}: no user {user!r}"])
        self._items.remove(entry)

    def dumps(self) -> str:
        """The file text: kept lines as they were, changed entries encrypted afresh."""
        out: list[str] = []
        for item in self._items:
            if isinstance(item, str):
                out.append(item)
            elif item.line is not None:
                out.append(item.line)
            else:
                blob = encrypt_password(self.master, item.user, item.password)
                item.line = f"{item.user}:{base64.b64encode(blob).decode()}"
                out.append(item.line)
        return "".join(line + "\n" for line in out)

    def save(self, path: str | None = None) -> None:
        """Write atomically (temporary file in the same directory, fsync, rename), mode 0600."""
        path = path or self.path
        if path is None:
            raise ConfigError(["vault: no file to save to"])
        text = self.dumps()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".pgcorral-vault-", dir=directory)
        except OSError as e:
            raise ConfigError([f"{path}: cannot write: {e.strerror}"])
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ConfigError([f"{path}: cannot write: {e.strerror}"])
        _fsync_directory(directory)
        self.path = path


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
