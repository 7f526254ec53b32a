"""The key table: every key of ``pgcorral.conf``, its type, default, reload rule and doc.

This table is the single source of truth for configuration keys. ``MainConfig`` and
``ServerConfig`` mirror it (a unit test keeps them in step), the parser converts values by the
``type`` named here, and ``docs/CONFIGURATION.md`` is rendered from it. This module only describes
keys; it does not read files or convert values.

Types:
``string`` text as written; ``path`` text with ``$VAR`` and ``~`` expanded; ``int``; ``bool``
(on/off, yes/no, true/false, 1/0); ``duration`` (plain number = seconds, or a suffix ms/s/m/h/d/w;
stored as float seconds); ``duration_ms`` (same, but a plain number means milliseconds);
``size`` (plain number = bytes, or a suffix B, K/KB, M/MB, G/GB; stored as int bytes);
``enum`` (one of ``choices``, case-insensitive, stored lower-case); ``int_auto`` (an int, or
``auto`` stored as 0: the program decides).
"""

from __future__ import annotations

from dataclasses import dataclass

TYPES = ("string", "path", "int", "int_auto", "bool", "duration", "duration_ms", "size", "enum")


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key. ``default`` is the Python value used when the key is absent."""

    name: str
    type: str
    default: object
    reloadable: bool
    doc: str
    section: str = "main"  # 'main' or 'server'
    choices: tuple[str, ...] | None = None
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    #: enum only: other spellings accepted for a choice, (spelling, choice)
    aliases: tuple[tuple[str, str], ...] = ()


_OURS = "pgcorral only. "
_NOT_LIVE = False
_LIVE = True

KEYS: tuple[Key, ...] = (
    # -- listening ---------------------------------------------------------------------------
    Key("host", "string", "", _NOT_LIVE, "Listen address; `*` means all interfaces.",
        required=True),
    Key("port", "int", 0, _NOT_LIVE, "Listen port for clients.", required=True,
        minimum=1, maximum=65535),
    Key("unix_socket_dir", "path", "/tmp", _NOT_LIVE,
        "Directory of the client Unix socket `.s.PGSQL.<port>` and the internal sockets "
        "(pgagroal requires it; pgcorral defaults to /tmp)."),
    Key("backlog", "int", 0, _LIVE,
        "listen() backlog; 0 or absent means max(max_connections / 4, 128) (pgagroal: floor "
        "16; pgcorral raises it because clients outnumber server connections).", minimum=0),
    Key("keep_alive", "bool", True, _LIVE, "Set SO_KEEPALIVE on sockets."),
    Key("max_client_conn", "int_auto", 0, _LIVE,
        _OURS + "Client connections accepted at once (PgBouncer's key), shared evenly by the "
        "workers; a client beyond gets FATAL 53300 \"sorry, too many clients already\" at "
        "once. auto (0): as many as the file-descriptor limit allows, keeping max_connections "
        "+ 64 descriptors for server connections and pgcorral's own files.", minimum=0),
    Key("so_reuseport", "bool", False, _NOT_LIVE,
        _OURS + "Listen with SO_REUSEPORT, so that a second pgcorral can start on the same "
        "port for a rolling restart: the old one is then stopped with `shutdown "
        "wait_for_clients` (docs/RELIABILITY.md, rolling restarts); cancel requests reach the "
        "right process through peer sockets in unix_socket_dir."),
    Key("nodelay", "bool", True, _LIVE, "Set TCP_NODELAY on sockets."),
    Key("ev_backend", "enum", "auto", _NOT_LIVE,
        "pgagroal's event loop backend; accepted for compatibility.",
        choices=("auto", "io_uring", "epoll", "kqueue")),
    Key("hugepage", "enum", "try", _NOT_LIVE,
        "pgagroal's huge pages for shared memory; accepted for compatibility.",
        choices=("off", "try", "on")),
    Key("workers", "int_auto", 0, _NOT_LIVE,
        _OURS + "Number of worker processes that accept clients and share one pool; `auto`: "
        "the CPUs this process may use. `1` is one process with no supervisor. See "
        "docs/ARCHITECTURE.md (Processes).", minimum=1, maximum=1024),
    # -- pool ----------------------------------------------------------------------------------
    Key("pipeline", "enum", "auto", _NOT_LIVE, "Pooling pipeline.",
        choices=("auto", "performance", "session", "transaction")),
    Key("max_connections", "int", 100, _NOT_LIVE, "Total number of server connections.",
        minimum=1, maximum=10000),
    Key("blocking_timeout", "duration", 30.0, _LIVE,
        "Longest time a client waits for a pooled connection; 0 = do not wait."),
    Key("connection_retry_delay", "duration_ms", 0.25, _LIVE,
        "Cap of the retry back-off while waiting for a connection; a plain number is in "
        "milliseconds, valid range 1-999 ms (other values are clamped with a warning)."),
    Key("max_retries", "int", 5, _LIVE,
        "Acquisition attempts when blocking_timeout is 0.", minimum=0),
    Key("idle_timeout", "duration", 0.0, _LIVE,
        "Close a pooled server connection idle this long; 0 = never."),
    Key("max_connection_age", "duration", 0.0, _LIVE,
        "Close a server connection older than this; 0 = never."),
    Key("validation", "enum", "off", _LIVE, "Connection validation.",
        choices=("off", "foreground", "background")),
    Key("background_interval", "duration", 300.0, _LIVE,
        "Period of the background validation scan."),
    Key("server_connect_timeout", "duration", 10.0, _LIVE,
        _OURS + "Time allowed to connect and authenticate to a server."),
    Key("track_prepared_statements", "bool", False, _LIVE,
        "Transaction pipeline with max_prepared_statements = 0: DEALLOCATE ALL after a "
        "transaction that used a named Parse (pgagroal's behaviour)."),
    Key("max_prepared_statements", "int", 200, _LIVE,
        _OURS + "Transaction pipeline: protocol-level prepared statements kept per server "
        "connection (LRU), mapped for every client; 0 = no mapping.", minimum=0),
    Key("query_timeout", "duration", 0.0, _LIVE,
        _OURS + "A query running that long gets a cancel request (the client sees "
        "PostgreSQL's 57014 and keeps its connection); at twice that long the client is closed "
        "(57014, FATAL) and the server connection with it. 0 = off. PgBouncer's key."),
    Key("idle_transaction_timeout", "duration", 0.0, _LIVE,
        _OURS + "A client idle that long inside a transaction is closed with 25P03 (its "
        "transaction rolled back, the server connection given back). 0 = off. PgBouncer's "
        "key."),
    Key("transaction_timeout", "duration", 0.0, _LIVE,
        _OURS + "A transaction open that long is ended: its client is closed with 25P04 "
        "(rolled back). 0 = off. PgBouncer's key."),
    Key("pin_timeout", "duration", 0.0, _LIVE,
        _OURS + "Transaction pipeline: a client pinned to its server connection (session "
        "advisory lock, temporary table, WITH HOLD cursor: docs/TRANSACTION.md) and idle "
        "that long is closed (57P05); 0 = no limit."),
    Key("max_pinned_connections", "int_auto", 0, _LIVE,
        _OURS + "Transaction pipeline: server connections that pinned clients may hold at "
        "once, per worker; a client whose state would pin one more is closed (53300). auto "
        "(0) = half of the worker's max_connections.", minimum=0),
    Key("server_reset_query", "string", "DISCARD ALL", _LIVE,
        "Statement run when a server connection returns to the pool; empty = none."),
    Key("server_reset_query_always", "bool", False, _LIVE,
        "Also run server_reset_query in the transaction pipeline."),
    Key("server_reset_query_behavior_on_failure", "enum", "discard", _LIVE,
        "What to do when the reset query fails.", choices=("discard", "ignore", "try")),
    Key("disconnect_client", "duration", 0.0, _LIVE,
        "Disconnect clients idle longer than this; 0 = never."),
    Key("disconnect_client_force", "bool", False, _LIVE,
        "Apply disconnect_client even to active clients."),
    Key("flush_timeout", "duration", 60.0, _LIVE,
        "Deadline of a graceful flush or shutdown; 0 = unbounded."),
    Key("max_packet_size", "size", 1073741822, _LIVE,
        _OURS + "Largest message accepted from a client after startup, in bytes.",
        minimum=1024, maximum=1073741823),
    # -- authentication ------------------------------------------------------------------------
    Key("authentication_timeout", "duration", 5.0, _LIVE,
        "Time allowed for the client to finish startup and authentication."),
    Key("allow_unknown_users", "bool", True, _LIVE,
        "Let users missing from the users vault connect (pass-through authentication)."),
    Key("auth_query", "bool", False, _LIVE, "Fetch password verifiers from PostgreSQL."),
    Key("rotate_frontend_password_timeout", "duration", 0.0, _LIVE,
        "Regenerate frontend users' passwords on this period; 0 = never."),
    Key("rotate_frontend_password_length", "int", 8, _LIVE,
        "Length of generated frontend passwords.", minimum=8, maximum=1024),
    Key("tls", "bool", False, _LIVE,
        "TLS for clients: SSLRequest is answered 'S' and direct TLS is accepted (docs/TLS.md)."),
    Key("tls_cert_file", "path", "", _LIVE,
        "Certificate (chain, PEM) pgcorral presents to clients; re-read on reload."),
    Key("tls_key_file", "path", "", _LIVE, "Private key of tls_cert_file (PEM)."),
    Key("tls_ca_file", "path", "", _LIVE,
        "CA(s) that client certificates are verified against; set, clients may present one "
        "(hba `cert`, `clientcert=`)."),
    Key("tls_crl_file", "path", "", _LIVE,
        _OURS + "Certificate revocation list checked for client certificates."),
    Key("tls_min_protocol_version", "enum", "tlsv1.2", _LIVE,
        _OURS + "Oldest TLS version accepted from clients (PostgreSQL's "
        "ssl_min_protocol_version).", choices=("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")),
    Key("tls_max_protocol_version", "enum", "", _LIVE,
        _OURS + "Newest TLS version offered to clients; empty = the newest OpenSSL has.",
        choices=("", "tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")),
    Key("tls_ciphers", "string", "HIGH:MEDIUM:+3DES:!aNULL", _LIVE,
        _OURS + "OpenSSL cipher list for TLS 1.2 and older (PostgreSQL's ssl_ciphers)."),
    # -- failover and health ---------------------------------------------------------------
    Key("failover", "bool", False, _LIVE, "Enable failover (needs 2 servers and a script)."),
    Key("failover_script", "path", "", _LIVE, "Executable run when the primary fails."),
    Key("failover_notify_script", "path", "", _LIVE,
        "Executable run after a successful failover."),
    Key("health_check", "bool", False, _LIVE, "Probe every server in the background."),
    Key("health_check_period", "duration", 30.0, _LIVE, "Probe interval."),
    Key("health_check_timeout", "duration", 5.0, _LIVE, "Per-probe timeout."),
    Key("health_check_user", "string", "", _LIVE,
        "Role (and database) used for probes; required when health_check is on."),
    Key("startup_validation", "enum", "try", _LIVE,
        "Check servers' system_identifier at startup and reload.", choices=("off", "try", "on")),
    # -- read replicas (health_check = on finds them) ------------------------------------------
    Key("max_replica_lag", "duration", 0.0, _LIVE,
        _OURS + "A replica further behind than this (time since the last commit it replayed, "
        "when it has WAL left to replay) serves no reads; 0 = no bound. See docs/HA.md."),
    Key("max_replica_lag_bytes", "size", 0, _LIVE,
        _OURS + "A replica whose replay position is more than this many bytes of WAL behind "
        "the primary serves no reads; 0 = no bound.", minimum=0),
    Key("replica_balance", "enum", "least_busy", _LIVE,
        _OURS + "How reads are spread over the healthy replicas: `least_busy` (fewest server "
        "connections in use in the worker, ties in turn) or `round_robin`.",
        choices=("least_busy", "round_robin")),
    Key("read_only_suffix", "string", "", _LIVE,
        _OURS + "A client asking for database `<name><suffix>` (e.g. `app_ro` with `_ro`) gets "
        "database `<name>` on a replica; empty = off."),
    Key("read_your_writes", "bool", True, _LIVE,
        _OURS + "After a client's write transaction, its reads go only to replicas that have "
        "replayed it (or to the primary). Transaction pipeline; see docs/HA.md."),
    # -- management and metrics ----------------------------------------------------------------
    Key("management", "int", 0, _NOT_LIVE, "TCP port for remote management; 0 = off.",
        minimum=0, maximum=65535),
    Key("metrics", "int", 0, _NOT_LIVE, "Prometheus HTTP port; 0 = off.",
        minimum=0, maximum=65535),
    Key("metrics_cache_max_age", "duration", 0.0, _LIVE,
        "How long a rendered /metrics response is cached; 0 = no cache."),
    Key("metrics_cache_max_size", "size", 262144, _NOT_LIVE,
        "Largest cached /metrics response, in bytes (at most 1M).", minimum=0, maximum=1048576),
    Key("metrics_cert_file", "path", "", _NOT_LIVE, "Certificate that turns /metrics into HTTPS."),
    Key("metrics_key_file", "path", "", _NOT_LIVE, "Private key for HTTPS metrics."),
    Key("metrics_ca_file", "path", "", _NOT_LIVE,
        "CA that metrics client certificates are verified against."),
    Key("metrics_client_groups", "int", 100, _LIVE, _OURS + "Client groups (address, "
        "application_name, user) /metrics shows one by one: the most transactions first, the "
        "others added up under address `(other)`. Bounds the series of the per-client view.",
        minimum=0, maximum=100000),
    Key("console", "int", 0, _NOT_LIVE, "Port of the web console; 0 = off.",
        minimum=0, maximum=65535),
    Key("admin_users", "string", "", _LIVE,
        _OURS + "PgBouncer's key: comma-separated users who may run every command of the SQL admin "
        "console (database `pgcorral` or `pgbouncer`); admins.conf users may too."),
    Key("stats_users", "string", "", _LIVE,
        _OURS + "PgBouncer's key: comma-separated users who may run SHOW in the SQL admin "
        "console."),
    Key("pidfile", "path", "", _NOT_LIVE,
        "PID file; empty or absent means <unix_socket_dir>/pgcorral.<port>.pid."),
    Key("update_process_title", "enum", "verbose", _LIVE, "What the process title shows.",
        choices=("never", "off", "strict", "minimal", "verbose", "full")),
    Key("tracker", "bool", False, _LIVE, "Log one line for every pool state transition."),
    # -- logging -------------------------------------------------------------------------------
    Key("log_type", "enum", "console", _NOT_LIVE, "Where the log goes.",
        choices=("console", "file", "syslog")),
    Key("log_level", "enum", "info", _LIVE, "Log level; trace equals debug5 and may log secrets.",
        choices=("fatal", "error", "warn", "info", "debug", "debug1", "debug2", "debug3",
                 "debug4", "debug5", "trace")),
    Key("log_path", "path", "pgcorral.log", _LIVE,
        "Log file name when log_type is file; strftime patterns allowed."),
    Key("log_rotation_age", "duration", 0.0, _LIVE, "Rotate the log after this long; 0 = never."),
    Key("log_rotation_size", "size", 0, _LIVE, "Rotate the log after this many bytes; 0 = never.",
        minimum=0),
    Key("log_line_prefix", "string", "%Y-%m-%d %H:%M:%S", _LIVE, "strftime prefix of each line."),
    Key("log_mode", "enum", "append", _LIVE, "Open the log file for append or create.",
        choices=("append", "create")),
    Key("log_connections", "bool", False, _LIVE, "Log each client connection."),
    Key("log_disconnections", "bool", False, _LIVE, "Log each client disconnection."),
    # -- server sections -----------------------------------------------------------------------
    Key("host", "string", "", _NOT_LIVE,
        "Server host name or IP; a value starting with / is a Unix socket directory.",
        section="server", required=True),
    Key("port", "int", 0, _NOT_LIVE, "Server port.", section="server", required=True,
        minimum=1, maximum=65535),
    Key("primary", "bool", False, _LIVE, "This server is the primary (at most one).",
        section="server"),
    Key("tls", "enum", "disable", _LIVE,
        "TLS from pgcorral to this server, with libpq's sslmode meanings; `on` = require, "
        "`off` = disable. Not used over a Unix socket.", section="server",
        choices=("disable", "prefer", "require", "verify-ca", "verify-full"),
        aliases=(("on", "require"), ("off", "disable"), ("true", "require"),
                 ("false", "disable"), ("yes", "require"), ("no", "disable"),
                 ("1", "require"), ("0", "disable"), ("allow", "prefer"))),
    Key("tls_cert_file", "path", "", _LIVE,
        "Client certificate pgcorral presents to this server.", section="server"),
    Key("tls_key_file", "path", "", _LIVE, "Private key of the server section's "
        "tls_cert_file.", section="server"),
    Key("tls_ca_file", "path", "", _LIVE,
        "CA the server certificate is verified against (verify-ca, verify-full; `require` "
        "with a CA verifies too, as libpq does); empty = the system's CAs.", section="server"),
    Key("channel_binding", "enum", "prefer", _LIVE,
        "SCRAM channel binding toward a TLS server (libpq's channel_binding).",
        section="server", choices=("disable", "prefer", "require"),
        aliases=(("disabled", "disable"),)),
)

MAIN_KEYS: dict[str, Key] = {k.name: k for k in KEYS if k.section == "main"}
SERVER_KEYS: dict[str, Key] = {k.name: k for k in KEYS if k.section == "server"}

# Section names that hold global keys besides the main section.
MAIN_SECTIONS = ("pgcorral", "pgagroal")
GLOBAL_SECTIONS = ("prometheus", "health_check")


def _default_text(key: Key) -> str:
    if key.required:
        return "(required)"
    value = key.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if key.type == "duration_ms" and isinstance(value, float):
        return f"{round(value * 1000)}ms"
    if key.type == "duration" and isinstance(value, float):
        return f"{value:g}s"
    if value == "":
        return "—"
    if key.type == "int_auto" and value == 0:
        return "`auto`"
    return f"`{value}`"


def _type_text(key: Key) -> str:
    if key.choices:
        return " / ".join(key.choices)
    text = key.type
    if key.minimum is not None and key.maximum is not None:
        text += f" ({key.minimum}-{key.maximum})"
    elif key.minimum is not None:
        text += f" (>= {key.minimum})"
    return text


def render_reference_markdown() -> str:
    """Render the key table as markdown: one table for the main section, one for servers."""
    out = [
        "# pgcorral configuration reference",
        "",
        "Generated from `src/pgcorral/config/keys.py` by `devtools/gen_config_doc.py`; "
        "do not edit by hand.",
        "",
        "The main section is `[pgcorral]` or `[pgagroal]`; `[prometheus]` and `[health_check]` "
        "sections may hold main keys too. Every other section is a server. Durations are seconds "
        "or take a suffix ms/s/m/h/d/w; sizes take B, K/KB, M/MB, G/GB; booleans are "
        "on/off, yes/no, true/false, 1/0. \"Live\" keys apply on reload; the others need a "
        "restart.",
    ]
    for section, title in (("main", "Main section"), ("server", "Server sections")):
        out += ["", f"## {title}", "", "| Key | Type | Default | Live | Meaning |",
                "|---|---|---|---|---|"]
        for key in KEYS:
            if key.section != section:
                continue
            live = "yes" if key.reloadable else "no"
            doc = key.doc.replace("|", "\\|")
            out.append(f"| `{key.name}` | {_type_text(key)} | {_default_text(key)} | {live} "
                       f"| {doc} |")
    out.append("")
    return "\n".join(out)
