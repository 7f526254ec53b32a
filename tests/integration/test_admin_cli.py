"""``pgcorral-admin`` end to end, as a subprocess with HOME in a temporary directory.

No PostgreSQL needed. The master key is written through the API with few PBKDF2 iterations (the
count is stored in the file), except in the one test that runs ``master-key`` for real.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgcorral.security.vault import PBKDF2_ITERATIONS, MasterKey, Vault

REPO = Path(__file__).resolve().parents[2]
KEY = "Corral-Key-1"


class Admin:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.users = home / "pgcorral_users.conf"
        self.key_path = home / ".pgcorral" / "master.key"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PGCORRAL_MASTER_KEY_FILE", "PGCORRAL_PASSWORD")}
        env.update(HOME=str(self.home), PYTHONPATH=str(REPO / "src"), **extra)
        return env

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgcorral.cli.admin", *args],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env=self.env(**env), cwd=self.home)

    def ok(self, *args: str, **env: str) -> str:
        done = self.run(*args, **env)
        assert (done.returncode, done.stderr) == (0, ""), done
        return done.stdout

    def fail(self, *args: str, status: int = 1, **env: str) -> str:
        done = self.run(*args, **env)
        assert done.returncode == status, done
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pgcorral-admin: "), done.stderr
        return lines[0]

    def master(self) -> MasterKey:
        return MasterKey.load(str(self.key_path))

    def vault(self) -> Vault:
        return Vault.load(str(self.users), self.master())


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


@pytest.fixture
def keyed(admin: Admin) -> Admin:
    MasterKey.create(KEY, str(admin.key_path), iterations=1000)
    return admin


def test_master_key_created_with_the_real_count(admin: Admin) -> None:
    out = admin.ok("-P", KEY, "master-key")
    assert out == f"master key stored in {admin.key_path}\n"
    assert f":{PBKDF2_ITERATIONS}:" in admin.key_path.read_text()
    assert oct(admin.key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(admin.key_path.parent.stat().st_mode & 0o777) == "0o700"
    admin.ok("-f", str(admin.users), "-U", "alice", "-P", "pw", "user", "add")
    assert admin.vault().get("alice") == "pw"
    assert "already exists" in admin.fail("-P", "Other-Key-2", "master-key")


def test_master_key_from_environment(admin: Admin) -> None:
    admin.ok("master-key", "-F", "json", PGCORRAL_PASSWORD="Env-Key-12")
    assert "RW52LUtleS0xMg==" in admin.key_path.read_text()  # base64 of the passphrase


def test_generated_master_key(admin: Admin) -> None:
    assert "at least 8 characters" in admin.fail("-g", "-l", "7", "master-key")
    doc = json.loads(admin.ok("-g", "-l", "12", "-F", "json", "master-key"))
    assert doc["outcome"] == "ok" and len(doc["password"]) == 12
    admin.ok("-f", str(admin.users), "-U", "alice", "-P", "pw", "user", "add")  # key loads


@pytest.mark.parametrize(("key", "rule"), [
    ("Ab1!", "at least 8 characters"),
    ("abcd1234!", "at least one upper case letter"),
    ("ABCD1234!", "at least one lower case letter"),
    ("ABCDabcd!", "at least one digit"),
    ("ABCDabcd1", "at least one special character"),
])
def test_weak_master_keys_refused(admin: Admin, key: str, rule: str) -> None:
    line = admin.fail("-P", key, "master-key")
    assert rule in line
    assert key not in line
    assert not admin.key_path.exists()


def test_master_key_refused_in_an_open_directory(admin: Admin) -> None:
    admin.key_path.parent.mkdir(mode=0o755)
    admin.key_path.parent.chmod(0o755)
    line = admin.fail("-P", KEY, "master-key")
    assert line.endswith(f"chmod 0700 {admin.key_path.parent}")


def test_add_edit_del_ls(keyed: Admin) -> None:
    f = str(keyed.users)
    assert keyed.ok("-f", f, "-U", "alice", "-P", "alice-pw", "user", "add") == \
        f"user 'alice' added to {f}\n"
    keyed.ok("-u", f, "-U", "bob", "user", "add", PGCORRAL_PASSWORD="bob-pw")
    assert keyed.ok("-f", f, "user", "ls") == "alice\nbob\n"
    assert keyed.vault().get("bob") == "bob-pw"
    keyed.ok("-f", f, "-U", "alice", "-P", "new-pw", "user", "edit")
    assert keyed.vault().get("alice") == "new-pw"
    keyed.ok("-f", f, "-U", "alice", "user", "del")
    assert keyed.ok("-f", f, "user", "ls") == "bob\n"
    assert oct(keyed.users.stat().st_mode & 0o777) == "0o600"
    assert "new-pw" not in keyed.users.read_text()
    assert "already exists" in keyed.fail("-f", f, "-U", "bob", "-P", "x", "user", "add")
    assert "no user 'carol'" in keyed.fail("-f", f, "-U", "carol", "-P", "x", "user", "edit")
    assert "no user 'carol'" in keyed.fail("-f", f, "-U", "carol", "user", "del")
    assert "may not contain ':'" in keyed.fail("-f", f, "-U", "a:b", "-P", "x", "user", "add")
    assert "longer than 8192 bytes" in keyed.fail("-f", f, "-U", "big", "user", "add",
                                                  PGCORRAL_PASSWORD="x" * 8193)


def test_pgagroal_050_names(keyed: Admin) -> None:
    f = str(keyed.users)
    keyed.ok("-u", f, "-U", "alice", "-P", "a", "add-user")
    keyed.ok("-u", f, "-U", "alice", "-P", "b", "update-user")
    assert keyed.vault().get("alice") == "b"
    assert keyed.ok("-u", f, "list-users") == "alice\n"
    keyed.ok("-u", f, "-U", "alice", "remove-user")
    assert keyed.ok("-u", f, "list-users") == ""


def test_json_output(keyed: Admin) -> None:
    f = str(keyed.users)
    added = json.loads(keyed.ok("-F", "json", "-f", f, "-U", "alice", "-P", "pw", "user", "add"))
    assert added == {"command": "user add", "outcome": "ok", "file": f, "user": "alice"}
    listed = json.loads(keyed.ok("-F", "json", "-f", f, "list-users"))
    assert listed == {"command": "user ls", "outcome": "ok", "file": f, "users": ["alice"]}
    done = keyed.run("-F", "json", "-f", f, "-U", "zed", "user", "del")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"command": "user del", "outcome": "error", "file": f,
                                       "user": "zed", "error": f"no user 'zed' in {f}"}
    bad = keyed.run("-F", "json", "frobnicate")
    assert bad.returncode == 2 and json.loads(bad.stdout)["outcome"] == "error"


def test_generated_password_is_printed_once_and_decrypts(keyed: Admin) -> None:
    f = str(keyed.users)
    out = keyed.ok("-f", f, "-U", "alice", "-g", "-l", "32", "user", "add")
    first, second = out.splitlines()
    assert first.startswith("password: ") and second == f"user 'alice' added to {f}"
    password = first.removeprefix("password: ")
    assert len(password) == 32 and keyed.vault().get("alice") == password
    doc = json.loads(keyed.ok("-F", "json", "-f", f, "-U", "alice", "-g", "user", "edit"))
    assert len(doc["password"]) == 64 and keyed.vault().get("alice") == doc["password"]


def test_passwords_never_printed(keyed: Admin) -> None:
    f = str(keyed.users)
    for args in (("-U", "alice", "-P", "s3cr3t-value", "user", "add"),
                 ("-U", "alice", "-P", "s3cr3t-value", "user", "add"),  # fails: exists
                 ("-U", "alice", "-P", "s3cr3t-value", "-F", "json", "user", "edit")):
        done = keyed.run("-f", f, *args)
        assert "s3cr3t-value" not in done.stdout + done.stderr


def test_missing_input_without_a_terminal(keyed: Admin) -> None:
    f = str(keyed.users)
    assert "no password" in keyed.fail("-f", f, "-U", "alice", "user", "add")
    assert "no user name" in keyed.fail("-f", f, "-P", "x", "user", "add")
    assert "no vault file" in keyed.fail("-U", "alice", "-P", "x", "user", "add")
    assert not keyed.users.exists()


def test_usage_errors(admin: Admin) -> None:
    assert "unknown command 'user foo'" in admin.fail("user", "foo", status=2)
    assert "no command" in admin.fail(status=2)
    assert "-x" in admin.fail("-x", "user", "ls", status=2)
    assert "-g and -P" in admin.fail("-g", "-P", "x", "master-key", status=2)
    assert admin.ok("-V").startswith("pgcorral-admin ")
    assert "user edit" in admin.ok("-?")


def test_vault_problems_reported_without_traceback(keyed: Admin) -> None:
    keyed.users.write_text("alice:AAAA\n")
    line = keyed.fail("-f", str(keyed.users), "user", "ls")
    assert line == (f"pgcorral-admin: {keyed.users}:1: user 'alice': the encrypted password "
                    "is too short")
    keyed.key_path.chmod(0o644)
    line = keyed.fail("-f", str(keyed.users), "user", "ls")
    assert line.endswith(f"chmod 0600 {keyed.key_path}")


def _read_until(fd: int, text: bytes, deadline: float) -> bytes:
    seen = b""
    while text not in seen:
        assert time.monotonic() < deadline, seen
        try:
            seen += os.read(fd, 1024)
        except OSError:
            break
    return seen


def test_interactive_prompts(keyed: Admin) -> None:
    """On a terminal, user name and password are asked for; the password twice, not echoed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcorral.cli.admin", "-f", str(keyed.users), "user", "add"],
        stdin=follower, stdout=subprocess.PIPE, stderr=follower, env=keyed.env(),
        start_new_session=True)
    os.close(follower)
    try:
        deadline = time.monotonic() + 20
        _read_until(leader, b"User: ", deadline)
        os.write(leader, b"alice\n")
        _read_until(leader, b"Password: ", deadline)
        os.write(leader, b"typed-pw\n")
        assert b"typed-pw" not in _read_until(leader, b"Verify: ", deadline)  # no echo
        os.write(leader, b"typed-pw\n")
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        os.close(leader)
    assert proc.returncode == 0
    assert b"typed-pw" not in out
    assert keyed.vault().get("alice") == "typed-pw"
