"""The Prometheus endpoint against a running pooler: every scrape parsed with prometheus-client's
parser; pgagroal's names and labels; traffic moves pgcorral's counters and histograms; two
workers count as one pooler; ``clear prometheus``; the cache; HTTPS with and without client
certificates; and bad scrapers (garbage, slow, POST, unknown paths, a hundred at once)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from devtools.pgcluster import find_free_port
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import PGCORRAL_PATH
from tests.integration.test_management import cli, cli_json, poll

if TYPE_CHECKING:
    from devtools.certs import Pki
    from tests.conftest import Daemon, DaemonFactory

HOST = "127.0.0.1"
POOL = {"database": "pgcorral_test", "user": "trustuser"}

#: pgagroal's families pgcorral serves, with their labels (../shared/reference/pgagroal.md 7.2)
PGAGROAL = {
    "pgagroal_state": (), "pgagroal_pipeline_mode": (),
    "pgagroal_server_error": ("name", "state"), "pgagroal_failed_servers": (),
    "pgagroal_wait_time": (), "pgagroal_query_count": (),
    "pgagroal_connection_query_count": ("id", "user", "database", "application_name"),
    "pgagroal_tx_count": (), "pgagroal_active_connections": (),
    "pgagroal_total_connections": (), "pgagroal_max_connections": (),
    "pgagroal_connection": ("id", "user", "database", "application_name", "state"),
    "pgagroal_limit": ("user", "database", "type"),
    "pgagroal_limit_awaiting": ("user", "database"), "pgagroal_connection_awaiting": (),
    "pgagroal_auth_user_success": (), "pgagroal_auth_user_bad_password": (),
    "pgagroal_auth_user_error": (), "pgagroal_client_wait": (), "pgagroal_client_active": (),
    "pgagroal_network_sent": (), "pgagroal_network_received": (),
    "pgagroal_client_sockets": (), "pgagroal_self_sockets": (),
    "pgagroal_os_info": ("os", "major", "minor", "patch"),
    "pgagroal_logging_info": (), "pgagroal_logging_warn": (), "pgagroal_logging_error": (),
    "pgagroal_logging_fatal": (),
}


# --- helpers ---------------------------------------------------------------------------------


def request(port: int, path: str = "/metrics", method: str = "GET",
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request."""
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(HOST, port, context=context, timeout=15)
        if context is not None else http.client.HTTPConnection(HOST, port, timeout=15))
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        conn.close()


class Scrape:
    """One parsed /metrics body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def samples(self, metric: str, **labels: str) -> list[Any]:
        """The samples named ``metric`` (``x_total``, ``x_bucket``... included) whose labels
        include ``labels``."""
        family = None
        for base in (metric, metric.removesuffix("_total"), metric.rsplit("_", 1)[0]):
            family = family or self.families.get(base)
        if family is None:
            return []
        return [s for s in family.samples if s.name == metric
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, metric: str, **labels: str) -> float:
        found = self.samples(metric, **labels)
        assert len(found) == 1, (metric, labels, found)
        return float(found[0].value)

    def total(self, metric: str, **labels: str) -> float:
        return float(sum(s.value for s in self.samples(metric, **labels)))


def scrape(port: int, context: ssl.SSLContext | None = None) -> Scrape:
    status, headers, body = request(port, context=context)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(body)


def start(pgcorral: DaemonFactory, conf: dict[str, str] | None = None,
          env: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
          **kwargs: Any) -> tuple[Daemon, int]:
    """A pooler with ``metrics`` on a free port, once that port answers."""
    port = find_free_port()
    d = pgcorral({"metrics": str(port), **(conf or {})}, env=env, **kwargs)

    def answers() -> bool:
        try:
            return request(port, context=context)[0] == 200
        except OSError:
            return False
    poll(answers, "the metrics port")
    return d, port


def raw(port: int, data: bytes, *, shut: bool = False, timeout: float = 15.0) -> tuple[bytes,
                                                                                      float]:
    """Send ``data`` on a new connection (then half-close when ``shut``); everything the
    server sends until it closes, and how long that took."""
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - t0


def queries(d: Daemon, n: int, **params: str) -> None:
    with psycopg.connect(d.dsn(**params), autocommit=True) as conn:
        for i in range(n):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)


# --- the exposition --------------------------------------------------------------------------


def test_pgagroal_names_and_labels(pgcorral: DaemonFactory) -> None:
    d, port = start(pgcorral)
    with psycopg.connect(d.dsn(application_name="dash"), autocommit=True) as conn:
        conn.execute("select 1")
        m = scrape(port)
        for name, labels in PGAGROAL.items():
            found = m.samples(name)
            assert found, f"{name} missing"
            for sample in found:
                assert tuple(sorted(sample.labels)) == tuple(sorted(labels)), sample
        assert m.value("pgagroal_state") == 1
        assert m.value("pgagroal_pipeline_mode") == 1  # auto: session pooling
        assert m.value("pgagroal_max_connections") == 20
        assert m.value("pgagroal_total_connections") == 1
        assert m.value("pgagroal_active_connections") == 1
        assert m.value("pgagroal_client_sockets") == 1
        assert m.value("pgagroal_client_active") == 1
        assert m.value("pgagroal_server_error", name="primary", state="primary") == 0
        (slot,) = m.samples("pgagroal_connection")
        assert slot.labels["state"] == "in_use" and slot.labels["application_name"] == "dash"
        assert (slot.labels["database"], slot.labels["user"]) == ("pgcorral_test", "trustuser")
        assert m.value("pgagroal_limit", type="max", **POOL) == 20
        assert m.value("pgagroal_limit", type="backend", **POOL) == 1
        assert m.value("pgagroal_logging_info") >= 1  # "started", at least
        assert m.value("pgcorral_up") == 1
        assert m.value("pgcorral_server", name="primary", state="primary") == 1
    poll(lambda: len(scrape(port).samples("pgagroal_connection", **POOL, id=slot.labels["id"],
                                          application_name="", state="free")) == 1,
         "the server connection to be free")
    status, headers, body = request(port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<code>pgagroal_tx_count</code>" in body
    assert b"<code>pgcorral_pool_query_seconds</code>" in body
    status, headers, body = request(port, "/metrics", "HEAD")
    assert (status, body) == (200, b"") and int(headers["content-length"]) > 1000


def test_traffic_moves_the_counters_and_histograms(pgcorral: DaemonFactory) -> None:
    d, port = start(pgcorral)
    before = scrape(port)
    queries(d, 25, application_name="metrics-test")
    with psycopg.connect(d.dsn(), autocommit=True) as conn, pytest.raises(
            psycopg.errors.DivisionByZero):
        conn.execute("select 1/0")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(d.dsn(user="md5user", password="wrong"), connect_timeout=10).close()
    m = scrape(port)
    assert m.value("pgcorral_pool_transactions_total", **POOL) >= 25
    assert m.value("pgcorral_pool_queries_total", **POOL) >= 25
    assert m.value("pgagroal_tx_count") >= 25 and m.value("pgagroal_query_count") >= 25
    assert m.value("pgagroal_tx_count") == m.total("pgcorral_pool_transactions_total")
    assert m.value("pgcorral_pool_received_bytes_total", **POOL) > 25 * 10
    assert m.value("pgcorral_pool_sent_bytes_total", **POOL) > 25 * 10
    assert m.value("pgagroal_network_received") == m.total("pgcorral_pool_received_bytes_total")
    assert m.value("pgcorral_pool_query_time_seconds_total", **POOL) > 0
    assert m.value("pgcorral_pool_hold_time_seconds_total", **POOL) > 0
    assert m.value("pgcorral_pool_server_requests_total", **POOL) >= 2
    assert m.value("pgcorral_pool_errors_total", **POOL, **{"class": "22"}) == 1
    assert m.value("pgcorral_pool_logins_total", **POOL, outcome="success") >= 2
    assert m.value("pgagroal_auth_user_bad_password") == 1
    assert m.value("pgagroal_auth_user_success") >= 2
    assert m.value("pgcorral_client_connections_total") - \
        before.value("pgcorral_client_connections_total") == 3
    group = {"address": "127.0.0.1", "application_name": "metrics-test", "user": "trustuser"}
    assert m.value("pgcorral_client_group_transactions_total", **group) >= 25
    assert m.value("pgcorral_client_group_queries_total", **group) >= 25
    assert m.value("pgcorral_client_group_connections_total", **group) == 1
    assert m.value("pgcorral_client_group_clients", **group) == 0  # it left
    assert m.value("pgcorral_client_group_hold_time_seconds_total", **group) > 0
    for name in ("pgcorral_pool_query_seconds", "pgcorral_pool_transaction_seconds",
                 "pgcorral_pool_wait_seconds"):
        buckets = m.samples(name + "_bucket", **POOL)
        counts = [b.value for b in buckets]
        assert buckets[-1].labels["le"] == "+Inf" and counts == sorted(counts), name
        assert [float(b.labels["le"]) for b in buckets[:-1]] == sorted(
            float(b.labels["le"]) for b in buckets[:-1])
        assert counts[-1] == m.value(name + "_count", **POOL) >= 2, name
        if name != "pgcorral_pool_wait_seconds":  # (a wait for an idle connection may be 0)
            assert m.value(name + "_sum", **POOL) > 0, name
    assert m.value("pgcorral_pool_query_seconds_count", **POOL) >= 25


def test_waiting_clients_show(pgcorral: DaemonFactory) -> None:
    d, port = start(pgcorral, {"max_connections": "1", "pipeline": "session"})
    with psycopg.connect(d.dsn(), autocommit=True) as holder:
        holder.execute("select 1")
        waiter = threading.Thread(target=queries, args=(d, 1), daemon=True)
        waiter.start()
        poll(lambda: scrape(port).value("pgagroal_connection_awaiting") == 1, "a waiting client")
        m = scrape(port)
        assert m.value("pgagroal_limit_awaiting", **POOL) == 1
        assert m.value("pgcorral_pool_clients", state="waiting", **POOL) == 1
        assert m.value("pgagroal_client_wait") == 1
        poll(lambda: scrape(port).value("pgagroal_wait_time") > 0.05, "the wait to grow")
        assert scrape(port).value("pgcorral_pool_maxwait_seconds", **POOL) > 0.05
    waiter.join(15)
    assert not waiter.is_alive()
    m = scrape(port)
    assert m.value("pgagroal_connection_awaiting") == 0
    assert m.value("pgcorral_pool_wait_time_seconds_total", **POOL) > 0.05
    assert m.value("pgcorral_pool_wait_seconds_bucket", le="+Inf", **POOL) >= 2


def test_two_workers_are_one_pooler(pgcorral: DaemonFactory) -> None:
    """Clients spread over both workers (the kernel picks; we open until both have some) are
    all counted, and so are their transactions."""
    # each worker its own listening socket (SO_REUSEPORT): the kernel spreads connections by
    # a hash; on one shared socket one worker may take nearly all of them (CI saw 48 to 2)
    d, port = start(pgcorral, {"workers": "2", "max_connections": "60"},
                    env={"PGCORRAL_LISTEN": "reuseport"})
    conns: list[psycopg.Connection[Any]] = []
    try:
        per_worker: dict[int, int] = {}
        while len(conns) < 50 and (len(per_worker) < 2 or min(per_worker.values()) < 3):
            conns.append(psycopg.connect(d.dsn(), autocommit=True))
            conns[-1].execute("select 1")
            per_worker = {}
            for c in cli_json(d, "stats")["clients"]:
                per_worker[c["worker"]] = per_worker.get(c["worker"], 0) + 1
        assert sorted(per_worker) == [0, 1] and min(per_worker.values()) >= 3, per_worker
        for conn in conns:
            for _ in range(3):
                conn.execute("select 1")
        m = scrape(port)
        n = len(conns)
        assert m.value("pgcorral_workers") == 2
        assert m.value("pgagroal_client_sockets") == n
        assert m.value("pgagroal_client_active") == n
        assert m.value("pgagroal_total_connections") == n
        assert m.total("pgcorral_clients") == n
        assert m.value("pgcorral_pool_clients", state="active", **POOL) == n
        assert len(m.samples("pgagroal_connection")) == n
        assert {s.labels["id"].split(".")[0] for s in m.samples("pgagroal_connection")} == {
            "0", "1"}
        assert m.value("pgcorral_pool_transactions_total", **POOL) >= 4 * n
        assert m.value("pgcorral_pool_query_seconds_count", **POOL) >= 4 * n
        group = {"address": "127.0.0.1", "application_name": "", "user": "trustuser"}
        assert m.value("pgcorral_client_group_clients", **group) == n
        assert m.value("pgcorral_client_group_transactions_total", **group) >= 4 * n
    finally:
        for conn in conns:
            conn.close()


def test_clear_prometheus_zeroes_counters_not_gauges(pgcorral: DaemonFactory) -> None:
    d, port = start(pgcorral)
    queries(d, 10)
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        m = scrape(port)
        counters = [name for name, f in m.families.items() if f.type == "counter"]
        assert m.value("pgcorral_pool_transactions_total", **POOL) >= 11
        assert m.value("pgcorral_pool_query_seconds_count", **POOL) >= 11
        assert m.value("pgcorral_client_connections_total") >= 2
        assert m.value("pgagroal_tx_count") >= 11
        assert cli_json(d, "clear", "prometheus")["cleared"] == "prometheus"
        m = scrape(port)
        for name in counters:
            if name == "pgcorral_management_commands":  # the clear command itself may count
                continue
            if name == "pgcorral_client_group_connections":  # counts the live clients too
                assert m.total(name + "_total") == 1
                continue
            if name in ("pgcorral_client_group_hold_time_seconds",
                        "pgcorral_client_group_wait_time_seconds"):
                continue  # include the session's hold in progress (net.control.stats)
            assert m.total(name + "_total") == 0, name
        for name in ("pgagroal_tx_count", "pgagroal_query_count", "pgagroal_network_sent",
                     "pgagroal_auth_user_success", "pgcorral_pool_query_seconds_count",
                     "pgcorral_pool_wait_seconds_count"):
            assert m.total(name) == 0, name
        assert all(s.value == 0 for s in m.samples("pgcorral_pool_query_seconds_bucket"))
        # gauges stay (the first client's connection may still be in its reset, or idle)
        assert m.value("pgagroal_total_connections") >= 1
        assert m.value("pgagroal_client_active") == 1
        assert m.value("pgcorral_pool_servers", state="active", **POOL) == 1
        conn.execute("select 1")
        assert scrape(port).value("pgcorral_pool_transactions_total", **POOL) == 1


def test_cache_serves_one_body_for_max_age(pgcorral: DaemonFactory) -> None:
    age = 2.0
    _d, port = start(pgcorral, {"metrics_cache_max_age": "2s"})

    def renewed(body: bytes) -> Scrape:
        """The first body other than ``body`` (polling)."""
        deadline = time.monotonic() + age + 10
        while True:
            scraped = scrape(port)
            if scraped.body != body:
                return scraped
            assert time.monotonic() < deadline, "the cached body was never renewed"
            time.sleep(0.02)

    def stamp(m: Scrape) -> float:
        return m.value("pgcorral_snapshot_timestamp_seconds")

    for _ in range(5):  # a second scrape well inside the age of a fresh body
        fresh = renewed(scrape(port).body)
        t0 = time.monotonic()
        again = scrape(port)
        if time.monotonic() - t0 < age / 2:
            break
    else:
        pytest.fail("no two scrapes fitted in half of metrics_cache_max_age")
    assert again.body == fresh.body  # the same body, byte for byte
    later = renewed(fresh.body)  # and a new one once it is old enough, not before
    assert age - 0.05 <= stamp(later) - stamp(fresh) < age + 10
    assert time.monotonic() - t0 < age + 10


def test_a_body_over_the_max_size_is_not_cached(pgcorral: DaemonFactory) -> None:
    _d, port = start(pgcorral, {"metrics_cache_max_age": "60s", "metrics_cache_max_size": "1K"})
    first = scrape(port)
    assert len(first.body) > 1024
    assert scrape(port).value("pgcorral_snapshot_timestamp_seconds") > \
        first.value("pgcorral_snapshot_timestamp_seconds")


# --- HTTPS -----------------------------------------------------------------------------------


def client_context(pki: Pki, cert: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


def refused(port: int, context: ssl.SSLContext | None) -> bool:
    """The request fails (handshake refused, or the connection closed without an answer)."""
    try:
        request(port, context=context)
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError):
        return True
    return False


def test_https_with_the_test_ca(pgcorral: DaemonFactory, pki: Pki) -> None:
    context = client_context(pki)
    d, port = start(pgcorral, {"metrics_cert_file": str(pki.server.cert),
                               "metrics_key_file": str(pki.server.key)}, context=context)
    m = scrape(port, context)
    assert m.value("pgcorral_up") == 1
    assert refused(port, None)  # plain HTTP on the HTTPS port
    old = ssl.create_default_context(cafile=str(pki.ca.cert))
    with warnings.catch_warnings():  # (TLSv1_1 itself is deprecated, as it should be)
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert refused(port, old)  # TLS 1.2 at least
    with socket.create_connection((HOST, port)) as s, context.wrap_socket(
            s, server_hostname=HOST) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    queries(d, 1)  # the pooler is fine


def test_client_certificate_required_with_metrics_ca_file(pgcorral: DaemonFactory,
                                                          pki: Pki) -> None:
    alice = client_context(pki, pki.clients["alice"])
    _d, port = start(pgcorral, {"metrics_cert_file": str(pki.server.cert),
                               "metrics_key_file": str(pki.server.key),
                               "metrics_ca_file": str(pki.ca.cert)}, context=alice)
    assert scrape(port, alice).value("pgcorral_up") == 1
    assert refused(port, client_context(pki))  # no certificate
    assert refused(port, client_context(pki, pki.client_wrong_ca))
    assert refused(port, client_context(pki, pki.client_expired))
    assert scrape(port, alice).value("pgcorral_up") == 1


@pytest.mark.parametrize("broken", ["missing cert", "garbage key", "ca without cert"])
def test_broken_metrics_tls_file_at_startup(tmp_path: Path, pki: Pki, broken: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    lines = {"metrics_cert_file": str(pki.server.cert), "metrics_key_file": str(pki.server.key)}
    if broken == "missing cert":
        lines["metrics_cert_file"] = str(tmp_path / "missing.crt")
        expect = ("metrics_cert_file", 5, lines["metrics_cert_file"])
    elif broken == "garbage key":
        lines["metrics_key_file"] = str(garbage)
        expect = ("metrics_key_file", 6, str(garbage))
    else:
        lines = {"metrics_ca_file": str(pki.ca.cert)}
        expect = ("metrics_ca_file", 5, "metrics_cert_file is not set")
    conf = tmp_path / "pgcorral.conf"
    conf.write_text("[pgcorral]\nhost = 127.0.0.1\nport = 1\nmetrics = 2\n"
                    + "".join(f"{k} = {v}\n" for k, v in lines.items())
                    + "\n[primary]\nhost = 127.0.0.1\nport = 5432\n")
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all all all\n")
    out = subprocess.run([sys.executable, "-m", "pgcorral", "-c", str(conf), "-a", str(hba)],
                         capture_output=True, text=True, timeout=20, check=False,
                         env=dict(os.environ, PYTHONPATH=PGCORRAL_PATH))
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    key, number, text = expect
    assert line.startswith(f"pgcorral: {conf}:{number}: {key}: "), line
    assert text in line, line


# --- bad scrapers ----------------------------------------------------------------------------


def test_garbage_gets_400_and_the_connection_closed(pgcorral: DaemonFactory) -> None:
    d, port = start(pgcorral)
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n",
                    b"GET /metrics\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                    b"\x00\xff\xfe" * 10 + b"\n"):
        answer, took = raw(port, garbage)  # no half-close: answered on the request line
        assert answer.startswith(b"HTTP/1.1 400 "), (garbage, answer)
        assert b"Connection: close" in answer
        assert took < 2.5, "a garbage request line waited for the read timeout"
    answer, _ = raw(port, b"\x00\x01garbage without a newline", shut=True)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    answer, _ = raw(port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    answer, _ = raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert scrape(port).value("pgcorral_up") == 1
    queries(d, 1)


def test_slow_scraper_is_dropped_and_the_pooler_answers(pgcorral: DaemonFactory) -> None:
    timeout = 2.0
    d, port = start(pgcorral, env={"PGCORRAL_HTTP_READ_TIMEOUT": str(timeout)})
    answer: list[bytes] = []
    sent: list[int] = []

    def trickle() -> None:
        t0 = time.monotonic()
        with socket.create_connection((HOST, port), timeout=30) as s:
            s.settimeout(1.0)
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                try:
                    s.sendall(bytes([byte]))
                    sent.append(byte)
                    chunk = s.recv(65536)  # waits the second between bytes
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                answer.append(chunk)
            else:
                answer.append(b"complete request sent")
            answer.append(f"{time.monotonic() - t0:.3f}".encode())

    slow = threading.Thread(target=trickle, daemon=True)
    slow.start()
    poll(lambda: len(sent) >= 1, "the slow scraper to start")
    with psycopg.connect(d.dsn(), autocommit=True) as conn:  # meanwhile, the pooler answers
        for _ in range(3):
            t0 = time.monotonic()
            conn.execute("select 1")
            assert time.monotonic() - t0 < 0.5
        assert slow.is_alive()  # still dangling
    assert scrape(port).value("pgcorral_up") == 1  # and so does the endpoint
    slow.join(timeout + 10)
    assert not slow.is_alive()
    assert answer[0].startswith(b"HTTP/1.1 408 "), answer
    took = float(answer[-1])
    assert timeout - 0.5 <= took < timeout + 3, took
    assert len(sent) < 10  # dropped long before the request was complete


def test_methods_and_paths(pgcorral: DaemonFactory) -> None:
    _d, port = start(pgcorral)
    status, headers, _ = request(port, "/metrics", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert request(port, "/metrics", "DELETE")[0] == 405
    assert request(port, "/nothing")[0] == 404
    assert request(port, "/metrics/")[0] == 404
    assert request(port, "/metrics?x=1")[0] == 200
    answer, _ = raw(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"pgcorral_up 1.0" in answer


def test_a_hundred_concurrent_scrapes(pgcorral: DaemonFactory) -> None:
    """At most MAX_CONNECTIONS (64) at once are served; more get 503 (or, racing the close,
    a reset): every answered scrape parses, at least 64 are answered, the pooler is fine."""
    d, port = start(pgcorral, {"workers": "2"})

    def one(_: int) -> tuple[str, bytes]:
        try:
            status, _, body = request(port)
        except (ConnectionError, http.client.HTTPException):
            return "reset", b""
        return str(status), body

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    outcomes = [r[0] for r in results]
    assert set(outcomes) <= {"200", "503", "reset"}, outcomes
    assert outcomes.count("200") >= 64, outcomes
    for status, body in results:
        if status == "200":
            assert Scrape(body).value("pgcorral_up") == 1
    assert scrape(port).value("pgcorral_workers") == 2
    queries(d, 2)
    assert cli(d, "ping").returncode == 0
