"""Vault files for tests: users and passwords under one master key in a directory."""

from __future__ import annotations

from pathlib import Path

from pgcorral.security.vault import MasterKey, Vault


def write_vault(tmp: Path, entries: dict[str, str], name: str = "users.conf"
                ) -> tuple[str, dict[str, str]]:
    """A vault file ``tmp/name`` of ``entries`` under the master key of ``tmp`` (made the first
    time, cheaply); (its path, the daemon's environment naming the key)."""
    key = tmp / "key" / "master.key"
    master = (MasterKey.load(str(key)) if key.exists()
              else MasterKey.create("Str0ng!Passphrase", str(key), iterations=1000))
    vault = Vault(master)
    for user, password in entries.items():
        vault.set(user, password)
    path = tmp / name
    vault.save(str(path))
    return str(path), {"PGCORRAL_MASTER_KEY_FILE": str(key)}
