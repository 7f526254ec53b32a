"""Streaming-replica clusters for the HA tests: ``ha_pair`` (a primary and a streaming
replica, fresh for each test) and ``ha_pair_delayed`` (the replica replays 2 s late).

tests/ha/conftest.py re-exports the fixtures; a test module elsewhere imports them:
``from tests.ha.fixtures import ha_pair  # noqa: F401``.

Both clusters trust loopback (pg_hba), so pgcorral's health user needs no password: role
``pgcorral_health`` with a database of the same name (pgagroal's health_check_user connects to
the database named like the user).  The primary also has the suite's usual ``pgcorral_test``
database and ``trustuser`` role, so ``Daemon.dsn()`` works unchanged.  Replicas inherit all of
it through pg_basebackup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from devtools.pgcluster import PgCluster

HEALTH_USER = "pgcorral_health"
TEST_DB = "pgcorral_test"
REPLICA_NAME = "replica1"  # application_name and slot name of the replica

#: Settings of the primary (replicas copy them).  synchronous_commit = on, unlike the suite's
#: base settings: an acknowledged commit must be in WAL before a crash test kills the server.
PRIMARY_SETTINGS = {
    "log_min_messages": "warning",
    "synchronous_commit": "on",
    "max_connections": "200",
    "wal_receiver_status_interval": "1s",
}


@dataclass
class HaPair:
    """A primary and its streaming replica (``replica`` replays from ``primary``)."""

    primary: PgCluster
    replica: PgCluster
    basedir: str
    replica_name: str = REPLICA_NAME
    extra: list[PgCluster] = field(default_factory=list)  # more replicas (add_replica)

    def servers(self) -> list[tuple[str, str, int]]:
        """Server sections for the ``pgcorral`` fixture factory: primary first."""
        out = [("primary", self.primary.host, self.primary.port),
               (self.replica_name, self.replica.host, self.replica.port)]
        out += [(f"replica{i + 2}", c.host, c.port) for i, c in enumerate(self.extra)]
        return out

    def sync(self, timeout: float = 30.0) -> str:
        """Wait until every replica replayed everything committed on the primary so far;
        returns that LSN."""
        lsn = self.primary.current_lsn()
        for replica in (self.replica, *self.extra):
            replica.wait_replayed(lsn, timeout)
        return lsn

    def make_synchronous(self) -> None:
        """synchronous_standby_names = the replica: a commit returns once the replica has
        flushed it (so a kill of the primary loses no acknowledged commit)."""
        self.primary.set_synchronous_standby_names(self.replica_name)

    def add_replica(self, **options: object) -> PgCluster:
        """One more replica of the primary (PgCluster.replica_of options)."""
        name = f"replica{len(self.extra) + 2}"
        replica = PgCluster.replica_of(
            self.primary, os.path.join(self.basedir, name), name=name, slot=name,
            **options,
        )
        self.extra.append(replica)
        return replica

    def destroy(self) -> None:
        for cluster in (*self.extra, self.replica, self.primary):
            cluster.destroy()
        shutil.rmtree(self.basedir, ignore_errors=True)


def make_primary_template(basedir: str, settings: dict[str, str] | None = None) -> PgCluster:
    """An initialized, stopped primary with replication on, the health role and database,
    ``pgcorral_test`` and ``trustuser``: make_pair() copies it (PgCluster.init_from)."""
    template = PgCluster(basedir)
    template.init(settings={**PRIMARY_SETTINGS, **(settings or {})})
    template.enable_replication()
    template.start()
    template.psql(
        f"CREATE ROLE {HEALTH_USER} LOGIN;"
        f"CREATE DATABASE {HEALTH_USER} OWNER {HEALTH_USER};"
        "CREATE ROLE trustuser LOGIN;"
        f"CREATE DATABASE {TEST_DB};"
    )
    template.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=TEST_DB)
    template.stop()
    return template


def make_pair(
    *,
    template: PgCluster | None = None,
    apply_delay: str | None = None,
    slot: bool = True,
    hot_standby_feedback: bool = False,
    synchronous: bool = False,
    settings: dict[str, str] | None = None,
) -> HaPair:
    """Build and start a primary (a copy of ``template``, else made here) and a streaming
    replica under a new temp directory.  ``settings``: more postgresql.conf lines for the
    primary (the replica copies them)."""
    basedir = tempfile.mkdtemp(prefix="pgcorral-ha-")
    os.chmod(basedir, 0o755)
    primary: PgCluster | None = None
    replica: PgCluster | None = None
    try:
        if template is None:
            primary = make_primary_template(os.path.join(basedir, "primary"))
        else:
            primary = PgCluster(os.path.join(basedir, "primary"))
            primary.init_from(template)
        if settings:
            primary.append_conf(settings)
        primary.start()
        replica = PgCluster.replica_of(
            primary,
            os.path.join(basedir, REPLICA_NAME),
            name=REPLICA_NAME,
            slot=REPLICA_NAME if slot else None,
            apply_delay=apply_delay,
            hot_standby_feedback=hot_standby_feedback,
        )
        pair = HaPair(primary, replica, basedir)
        if synchronous:
            pair.make_synchronous()
        return pair
    except BaseException:
        for cluster in (replica, primary):
            if cluster is not None:
                cluster.destroy()
        shutil.rmtree(basedir, ignore_errors=True)
        raise


HaPairFactory = Callable[..., HaPair]


@pytest.fixture(scope="session")
def ha_template() -> Iterator[PgCluster]:
    """The stopped primary every pair of the session is copied from."""
    basedir = tempfile.mkdtemp(prefix="pgcorral-ha-template-")
    os.chmod(basedir, 0o755)
    try:
        template = make_primary_template(os.path.join(basedir, "primary"))
        yield template
        template.destroy()
    finally:
        shutil.rmtree(basedir, ignore_errors=True)


@pytest.fixture
def ha_pair_factory(ha_template: PgCluster) -> Iterator[HaPairFactory]:
    """Factory: ``ha_pair_factory(apply_delay=None, slot=True, hot_standby_feedback=False,
    synchronous=False, settings=None)`` -> a fresh HaPair, destroyed after the test."""
    pairs: list[HaPair] = []

    def make(**options: object) -> HaPair:
        pair = make_pair(template=ha_template, **options)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.destroy()


@pytest.fixture
def ha_pair(ha_pair_factory: HaPairFactory) -> HaPair:
    """A fresh primary + streaming replica (asynchronous, slot ``replica1``); the test may
    kill, promote or restart either."""
    return ha_pair_factory()


@pytest.fixture
def ha_pair_delayed(ha_pair_factory: HaPairFactory) -> HaPair:
    """Like ha_pair, with the replica at recovery_min_apply_delay = 2s: it receives at once
    but replays each commit 2 s after the primary's commit time."""
    return ha_pair_factory(apply_delay="2s")
