"""A complete ``stats`` snapshot (the shape of ``net.control.stats`` merged over two workers)
for the tests that render metrics without a server: every pool field, client and server state,
histograms with observations, errors, logins, client groups."""

from __future__ import annotations

from typing import Any

from pgcorral.pool.stats import BUCKETS_US, NBUCKETS

TALLY_FIELDS = ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time_us",
                "query_time_us", "wait_time_us", "wait_count", "hold_time_us")


def tally(n: int) -> dict[str, int]:
    return {name: n * (i + 1) for i, name in enumerate(TALLY_FIELDS)}


def hist(*observations: int) -> list[int]:
    counts = [0] * NBUCKETS
    for i in observations:
        counts[i] += 1
    return counts


def pool(database: str, user: str, n: int) -> dict[str, Any]:
    return {"database": database, "user": user, "pool_mode": "session",
            "cl_active": 1, "cl_waiting": 2, "cl_idle": 3, "cl_login": 0,
            "sv_active": 1, "sv_idle": 2, "sv_used": 0, "sv_tested": 1, "sv_login": 1,
            "maxwait_us": 1_500_000, "paused": n == 1, "pool_size": 10, "min_pool_size": 1,
            **tally(n),
            "errors": {"42": n, "08": 1},
            "logins": {"success": 5 * n, "bad_password": 1, "refused": 2, "error": 3},
            "prepared": {"hits": 7, "misses": 2, "evictions": 1},
            "hist": {"wait": hist(0, 0, 3), "xact": hist(2, 5, NBUCKETS - 1),
                     "query": hist(1, 1, 1, 4)},
            "hist_sum_us": {"wait": 300, "xact": 40_000_000, "query": 900}}


def client(worker: int, cid: int, state: str, app: str = "app") -> dict[str, Any]:
    return {"id": cid, "worker": worker, "database": "pgcorral_test", "user": "alice",
            "address": "127.0.0.1", "port": 40000 + cid, "application_name": app,
            "state": state, "tls": "", "connect_time": 1.7e9, "request_time": 1.7e9,
            "wait_us": 10, "hold_us": 20,
            "wait_current_us": 2_500_000 if state == "waiting" else 0,
            "server_pid": 100 + cid if state == "active" else 0,
            "server_id": cid if state == "active" else 0,
            **{k: v for k, v in tally(cid).items() if k not in ("wait_time_us", "hold_time_us")}}


def server(worker: int, sid: int, state: str, client_id: int = 0) -> dict[str, Any]:
    return {"id": sid, "worker": worker, "database": "pgcorral_test", "user": "alice",
            "state": state, "pid": 100 + sid, "server": "primary", "host": "127.0.0.1",
            "port": 5432, "tls": False, "connect_time": 1.7e9, "request_time": 1.7e9,
            "client_id": client_id, **tally(sid)}


def group(address: str, app: str, user: str, xacts: int, clients: int = 1) -> dict[str, Any]:
    return {"address": address, "application_name": app, "user": user, "clients": clients,
            "clients_total": clients + 1, **tally(1), "xact_count": xacts}


def complete_stats() -> dict[str, Any]:
    """Two workers, two pools, clients and server connections in every state."""
    return {
        "time": 1.75e9, "started": 1.7e9, "status": "running", "pipeline": "session",
        "max_connections": 20, "pid": 4242, "buckets_us": list(BUCKETS_US),
        "counters": {"client_connections": 9, "logins_refused_disabled": 1,
                     "flushed_connections": 2, "management_commands": 3,
                     "server_connections_adopted": 0, "logins_success": 20,
                     "logins_bad_password": 2, "logins_refused": 4, "logins_error": 6},
        "disabled": [],
        "server_sections": [{"name": "primary", "host": "127.0.0.1", "port": 5432,
                             "state": "primary"},
                            {"name": "standby", "host": "127.0.0.2", "port": 5432,
                             "state": "failed"}],
        "workers": [{"worker": 0, "pid": 1, "clients": 3, "servers": 3},
                    {"worker": 1, "pid": 2, "clients": 2, "servers": 2}],
        "pools": [pool("pgcorral_test", "alice", 3), pool("db2", "bob", 1)],
        "clients": [client(0, 1, "active", 'we"ird\\app\nname'), client(0, 2, "idle"),
                    client(0, 3, "waiting"), client(1, 1, "active"), client(1, 2, "login")],
        "servers": [server(0, 1, "active", 1), server(0, 2, "idle"), server(0, 3, "login"),
                    server(1, 1, "active", 1), server(1, 2, "tested")],
        "client_groups": [group("127.0.0.1", "app", "alice", 50, 2),
                          group("10.0.0.2", "batch", "bob", 500),
                          group("10.0.0.3", "", "bob", 5, 0),
                          group("(other)", "(other)", "(other)", 7, 0)],
    }
