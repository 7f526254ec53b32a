"""The user vault: master key file rules, entry encryption, file parsing and rewriting."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcorral.errors import ConfigError
from pgcorral.security import vault as vault_mod
from pgcorral.security.vault import (
    MAX_PASSWORD_BYTES,
    PBKDF2_ITERATIONS,
    MasterKey,
    Vault,
    master_key_weakness,
)

FAST = 1000  # PBKDF2 iterations for tests; the real count is tested once
PASSPHRASE = "Corral-Key-1"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    home = tmp_path / "home" / ".pgcorral"
    return home / "master.key"


@pytest.fixture
def master(key_path: Path) -> MasterKey:
    return MasterKey.create(PASSPHRASE, str(key_path), iterations=FAST)


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


# ------------------------------------------------------------------ master key


def test_master_key_round_trip_with_the_real_iteration_count(key_path: Path) -> None:
    created = MasterKey.create(PASSPHRASE, str(key_path))
    assert len(created.key) == 32
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    fields = key_path.read_text().strip().split(":")
    assert fields[:3] == ["pgcorral-master-key", "1", str(PBKDF2_ITERATIONS)]
    assert len(base64.b64decode(fields[3])) == 16
    assert MasterKey.load(str(key_path)).key == created.key
    assert PASSPHRASE not in repr(created) and "key=" not in repr(created)


def test_master_key_path_from_home_and_override(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCORRAL_MASTER_KEY_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert vault_mod.default_master_key_path() == str(tmp_path / ".pgcorral" / "master.key")
    monkeypatch.setenv("PGCORRAL_MASTER_KEY_FILE", str(tmp_path / "k"))
    assert vault_mod.default_master_key_path() == str(tmp_path / "k")


def test_master_key_is_never_replaced(master: MasterKey, key_path: Path) -> None:
    before = key_path.read_bytes()
    with pytest.raises(ConfigError) as e:
        MasterKey.create("Other-Key-2", str(key_path), iterations=FAST)
    assert "already exists" in problems(e)[0]
    assert key_path.read_bytes() == before


def test_master_key_derivation_depends_on_salt(tmp_path: Path) -> None:
    a = MasterKey.create(PASSPHRASE, str(tmp_path / "a" / "k"), iterations=FAST)
    b = MasterKey.create(PASSPHRASE, str(tmp_path / "b" / "k"), iterations=FAST)
    assert a.key != b.key


@pytest.mark.parametrize(("passphrase", "rule"), [
    ("Aa1!", "at least 8 characters"),
    ("aaaa1111!", "upper case"),
    ("AAAA1111!", "lower case"),
    ("AAAAaaaa!", "digit"),
    ("AAAAaaaa1", "special character"),
])
def test_weak_master_keys_are_refused_naming_the_rule(key_path: Path, passphrase: str,
                                                      rule: str) -> None:
    weakness = master_key_weakness(passphrase)
    assert weakness is not None and rule in weakness
    with pytest.raises(ConfigError) as e:
        MasterKey.create(passphrase, str(key_path), iterations=FAST)
    assert rule in problems(e)[0]
    assert not key_path.exists()


def test_master_key_file_mode_0644_refused(master: MasterKey, key_path: Path) -> None:
    key_path.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        MasterKey.load(str(key_path))
    assert problems(e) == [f"{key_path} has mode 0644, which lets other users in: "
                           f"chmod 0600 {key_path}"]


def test_master_key_directory_mode_0755_refused(master: MasterKey, key_path: Path) -> None:
    key_path.parent.chmod(0o755)
    with pytest.raises(ConfigError) as e:
        MasterKey.load(str(key_path))
    assert f"chmod 0700 {key_path.parent}" in problems(e)[0]
    with pytest.raises(ConfigError) as e:  # nor is a new key put there
        MasterKey.create(PASSPHRASE, str(key_path.parent / "other.key"), iterations=FAST)
    assert f"chmod 0700 {key_path.parent}" in problems(e)[0]


def test_master_key_symlink_and_missing(master: MasterKey, key_path: Path) -> None:
    link = key_path.parent / "link.key"
    link.symlink_to(key_path)
    with pytest.raises(ConfigError):
        MasterKey.load(str(link))
    with pytest.raises(ConfigError) as e:
        MasterKey.load(str(key_path.parent / "none.key"))
    assert "pgcorral-admin master-key" in problems(e)[0]


@pytest.mark.parametrize("content", [
    b"", b"garbage\n", b"\xff\xfe", b"pgcorral-master-key:1:x:AAAA:AAAA\n",
    b"pgcorral-master-key:2:1000:AAAAAAAAAAAAAAAAAAAAAA==:QQ==\n",
    b"pgcorral-master-key:1:0:AAAAAAAAAAAAAAAAAAAAAA==:QQ==\n",
])
def test_garbled_master_key_file(key_path: Path, content: bytes) -> None:
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        MasterKey.load(str(key_path))
    assert problems(e)[0].startswith(f"{key_path}: ")


# ------------------------------------------------------------------ vault files


def test_round_trip_keeps_comments_and_order(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    path.write_text("# backend passwords\n\n")
    v = Vault.load(str(path), master)
    v.set("alice", "secret-a")
    v.set("bob", "pässwörd ☃")
    v.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# backend passwords\n\nalice:")
    assert "secret-a" not in text
    again = Vault.load(str(path), master)
    assert again.users() == ["alice", "bob"]
    assert again.get("bob") == "pässwörd ☃" and again.get("carol") is None
    again.set("alice", "changed")
    again.delete("bob")
    again.save()
    third = Vault.load(str(path), master)
    assert third.users() == ["alice"] and third.get("alice") == "changed"
    assert sorted(os.listdir(tmp_path)) == ["home", "users.conf"]  # no temporary file left


def test_unchanged_entries_are_kept_byte_for_byte(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    v = Vault(master)
    v.set("alice", "a")
    v.set("bob", "b")
    v.save(str(path))
    alice_line = path.read_text().splitlines()[0]
    v2 = Vault.load(str(path), master)
    v2.set("bob", "b2")
    v2.save()
    lines = path.read_text().splitlines()
    assert lines[0] == alice_line


def test_same_password_encrypts_differently(master: MasterKey, tmp_path: Path) -> None:
    v = Vault(master)
    v.set("alice", "same")
    v.set("bob", "same")
    blobs = [line.split(":", 1)[1] for line in v.dumps().splitlines()]
    assert blobs[0] != blobs[1]


def test_wrong_master_key_is_a_clear_error(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    v = Vault(master)
    v.set("alice", "a")
    v.set("bob", "b")
    v.save(str(path))
    other = MasterKey.create("Other-Key-2", str(tmp_path / "o" / "k"), iterations=FAST)
    with pytest.raises(ConfigError) as e:
        Vault.load(str(path), other)
    assert problems(e) == [f"{path}: no entry decrypts with the master key {other.path}: "
                           "wrong master key for this file, or every entry altered (files "
                           "written by pgagroal must be re-created with pgcorral-admin)"]


def test_tampered_blob_is_a_clear_error(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    v = Vault(master)
    v.set("alice", "a")
    v.set("bob", "b")
    v.save(str(path))
    lines = path.read_text().splitlines()
    blob = bytearray(base64.b64decode(lines[1].split(":", 1)[1]))
    blob[30] ^= 1
    lines[1] = "bob:" + base64.b64encode(bytes(blob)).decode()
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        Vault.load(str(path), master)
    assert problems(e) == [f"{path}:2: the entry does not decrypt with the master key "
                           f"{master.path} (it was altered, or written with another master key)"]


def test_entry_moved_to_another_user_does_not_decrypt(master: MasterKey,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    v = Vault(master)
    v.set("alice", "a")
    v.set("bob", "b")
    lines = v.dumps().splitlines()
    path.write_text(lines[0] + "\nbob:" + lines[0].split(":", 1)[1] + "\n")
    with pytest.raises(ConfigError) as e:
        Vault.load(str(path), master)
    assert problems(e)[0].startswith(f"{path}:2: the entry does not decrypt")


def test_garbled_lines_name_file_and_line(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    good = Vault(master)
    good.set("alice", "a")
    alice = good.dumps().strip()
    path.write_bytes(
        b"# comment\n"
        + alice.encode() + b"\n"
        + b"no colon here\n"
        + b"bob:!!!not base64!!!\n"
        + b"carol:AAAA\n"
        + alice.encode() + b"\n"
        + b"\xff\xfe:AAAA\n"
        + b":AAAA\n"
    )
    with pytest.raises(ConfigError) as e:
        Vault.load(str(path), master)
    assert problems(e) == [
        f"{path}:3: expected 'user:base64(encrypted password)'",
        f"{path}:4: user 'bob': the encrypted password is not valid base64",
        f"{path}:5: user 'carol': the encrypted password is too short",
        f"{path}:6: user 'alice' appears twice",
        f"{path}:7: not valid UTF-8",
        f"{path}:8: the user name is empty",
    ]


def test_missing_file(master: MasterKey, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        Vault.load(str(tmp_path / "none.conf"), master)
    assert problems(e) == [f"{tmp_path / 'none.conf'}: no such file"]
    assert Vault.load(str(tmp_path / "none.conf"), master, missing_ok=True).users() == []


def test_password_of_8192_bytes(master: MasterKey, tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    token = "é" * (MAX_PASSWORD_BYTES // 2)  # 8192 UTF-8 bytes, like a cloud IAM token
    v = Vault(master)
    v.set("iam", token)
    v.save(str(path))
    assert Vault.load(str(path), master).get("iam") == token
    with pytest.raises(ConfigError) as e:
        v.set("iam", token + "x")
    assert "longer than 8192 bytes" in problems(e)[0]


@pytest.mark.parametrize(("user", "password", "why"), [
    ("", "p", "empty"), ("a:b", "p", "':'"), ("a\nb", "p", "control"), (" a", "p", "space"),
    ("#a", "p", "'#'"), ("a" * 129, "p", "longer"), ("a", "", "empty"), ("a", "a\0b", "NUL"),
    ("a", "\udc80", "UTF-8"),
])
def test_bad_users_and_passwords_refused(master: MasterKey, user: str, password: str,
                                         why: str) -> None:
    v = Vault(master)
    with pytest.raises(ConfigError) as e:
        v.set(user, password)
    assert why in problems(e)[0]
    assert v.users() == []


def test_delete_unknown_user(master: MasterKey) -> None:
    with pytest.raises(ConfigError) as e:
        Vault(master).delete("nobody")
    assert "no user 'nobody'" in problems(e)[0]


def test_save_failure_leaves_no_temporary_file(master: MasterKey, tmp_path: Path) -> None:
    target = tmp_path / "dir-in-the-way"
    target.mkdir()
    v = Vault(master)
    v.set("alice", "a")
    with pytest.raises(ConfigError) as e:
        v.save(str(target))
    assert problems(e)[0].startswith(f"{target}: cannot write")
    assert sorted(os.listdir(tmp_path)) == ["dir-in-the-way", "home"]


_USER = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":"),
    min_size=1, max_size=40,
).filter(lambda u: u == u.strip() and not u.startswith("#"))
_PASSWORD = st.text(
    alphabet=st.characters(codec="utf-8", blacklist_characters="\0"),
    min_size=1, max_size=200,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.dictionaries(_USER, _PASSWORD, max_size=6))
def test_round_trip_of_random_users_and_passwords(master: MasterKey, tmp_path: Path,
                                                  entries: dict[str, str]) -> None:
    path = tmp_path / "random.conf"
    v = Vault(master)
    for user, password in entries.items():
        v.set(user, password)
    v.save(str(path))
    loaded = Vault.load(str(path), master)
    assert loaded.users() == list(entries)
    assert {u: loaded.get(u) for u in loaded.users()} == entries
