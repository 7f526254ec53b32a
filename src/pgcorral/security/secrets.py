"""The passwords pgcorral knows, loaded from the vault files named on the command line.

``users`` (-u) holds the passwords pgcorral logs in to PostgreSQL with; ``frontend`` (-F) the
passwords clients must give pgcorral when they differ from those; ``admins`` (-A) the remote
management users. All are decrypted with the master key at start and on reload; a problem in
any file is a ConfigError naming file and line, and a reload that fails keeps the old secrets.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgcorral.errors import ConfigError
from pgcorral.security.vault import MasterKey, Vault


@dataclass(frozen=True, slots=True)
class Secrets:
    users: Vault | None = None
    frontend: Vault | None = None
    admins: Vault | None = None
    superuser: Vault | None = None  # -S: the one user auth_query logs in as

    def superuser_login(self) -> tuple[str, str] | None:
        """(user, password) of the auth_query user, if a superuser file was given."""
        if self.superuser is None or not self.superuser.users():
            return None
        user = self.superuser.users()[0]
        password = self.superuser.get(user)
        return None if password is None else (user, password)

    def backend_password(self, user: str) -> str | None:
        """The password pgcorral logs in to PostgreSQL with, if the user is in the vault."""
        return self.users.get(user) if self.users is not None else None

    def client_password(self, user: str) -> str | None:
        """The password a client must give: the frontend one, else the vault one."""
        if self.frontend is not None:
            password = self.frontend.get(user)
            if password is not None:
                return password
        return self.backend_password(user)


def load_secrets(users: str | None, frontend: str | None = None,
                 admins: str | None = None, superuser: str | None = None,
                 master_key: str | None = None) -> Secrets:
    """Decrypt the given vault files (none given: no secrets and no master key needed)."""
    if not (users or frontend or admins or superuser):
        return Secrets()
    master = MasterKey.load(master_key)
    loaded = Secrets(
        users=Vault.load(users, master) if users else None,
        frontend=Vault.load(frontend, master) if frontend else None,
        admins=Vault.load(admins, master) if admins else None,
        superuser=Vault.load(superuser, master) if superuser else None,
    )
    if loaded.superuser is not None and len(loaded.superuser) != 1:
        raise ConfigError([f"{superuser}: must hold exactly one user "
                           f"(it holds {len(loaded.superuser)})"])
    return loaded
