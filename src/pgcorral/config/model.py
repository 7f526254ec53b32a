"""The frozen configuration snapshot: MainConfig, ServerConfig, HbaRule, LimitRule and Config.

These are plain immutable values with Python types (durations as float seconds, sizes as int
bytes, enums as lower-case str). ``MainConfig`` has exactly one field per main-section key of
``keys.KEYS`` (a unit test checks it). This module does not parse or validate anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    host: str
    port: int
    primary: bool = False
    tls: str = "disable"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    channel_binding: str = "prefer"


@dataclass(frozen=True, slots=True)
class HbaRule:
    line: int
    type: str  # 'host', 'hostssl', 'hostnossl', 'local'
    database: str
    user: str
    address: str  # as written; '' for 'local' lines
    method: str  # trust, reject, password, md5, scram-sha-256, all, cert
    network: IPNetwork | None  # None means 'all' or a local line
    clientcert: str = ""  # '', 'verify-ca' or 'verify-full' (hostssl only; cert: verify-full)


@dataclass(frozen=True, slots=True)
class LimitRule:
    line: int
    database: str
    aliases: tuple[str, ...]
    user: str
    max_size: int
    initial_size: int
    min_size: int


@dataclass(frozen=True, slots=True)
class MainConfig:
    # listening
    host: str
    port: int
    unix_socket_dir: str = "/tmp"
    backlog: int = 0
    keep_alive: bool = True
    max_client_conn: int = 0
    so_reuseport: bool = False
    nodelay: bool = True
    ev_backend: str = "auto"
    hugepage: str = "try"
    workers: int = 0  # 0: auto
    # pool
    pipeline: str = "auto"
    max_connections: int = 100
    blocking_timeout: float = 30.0
    connection_retry_delay: float = 0.25
    max_retries: int = 5
    idle_timeout: float = 0.0
    max_connection_age: float = 0.0
    validation: str = "off"
    background_interval: float = 300.0
    server_connect_timeout: float = 10.0
    track_prepared_statements: bool = False
    max_prepared_statements: int = 200
    query_timeout: float = 0.0
    idle_transaction_timeout: float = 0.0
    transaction_timeout: float = 0.0
    pin_timeout: float = 0.0
    max_pinned_connections: int = 0
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_reset_query_behavior_on_failure: str = "discard"
    disconnect_client: float = 0.0
    disconnect_client_force: bool = False
    flush_timeout: float = 60.0
    max_packet_size: int = 1073741822
    # authentication
    authentication_timeout: float = 5.0
    allow_unknown_users: bool = True
    auth_query: bool = False
    rotate_frontend_password_timeout: float = 0.0
    rotate_frontend_password_length: int = 8
    tls: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_crl_file: str = ""
    tls_min_protocol_version: str = "tlsv1.2"
    tls_max_protocol_version: str = ""
    tls_ciphers: str = "HIGH:MEDIUM:+3DES:!aNULL"
    # failover and health
    failover: bool = False
    failover_script: str = ""
    failover_notify_script: str = ""
    health_check: bool = False
    health_check_period: float = 30.0
    health_check_timeout: float = 5.0
    health_check_user: str = ""
    startup_validation: str = "try"
    # read replicas
    max_replica_lag: float = 0.0
    max_replica_lag_bytes: int = 0
    replica_balance: str = "least_busy"
    read_only_suffix: str = ""
    read_your_writes: bool = True
    # management and metrics
    management: int = 0
    metrics: int = 0
    metrics_cache_max_age: float = 0.0
    metrics_cache_max_size: int = 262144
    metrics_cert_file: str = ""
    metrics_key_file: str = ""
    metrics_ca_file: str = ""
    metrics_client_groups: int = 100
    console: int = 0
    admin_users: str = ""
    stats_users: str = ""
    pidfile: str = ""
    update_process_title: str = "verbose"
    tracker: bool = False
    # logging
    log_type: str = "console"
    log_level: str = "info"
    log_path: str = "pgcorral.log"
    log_rotation_age: float = 0.0
    log_rotation_size: int = 0
    log_line_prefix: str = "%Y-%m-%d %H:%M:%S"
    log_mode: str = "append"
    log_connections: bool = False
    log_disconnections: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    main: MainConfig
    servers: tuple[ServerConfig, ...]
    hba: tuple[HbaRule, ...]
    limits: tuple[LimitRule, ...]
    warnings: tuple[str, ...]
    config_path: str
    hba_path: str | None
    limits_path: str | None

    def aliases(self) -> dict[str, str]:
        """Map every database alias of the limits file to its real database name."""
        return {alias: rule.database for rule in self.limits for alias in rule.aliases}

    def current_server(self, switched_to: str | None) -> ServerConfig:
        """The server new connections go to: the ``switch-to`` one, else the first marked
        primary, else the first section."""
        for server in self.servers:
            if server.name == switched_to:
                return server
        for server in self.servers:
            if server.primary:
                return server
        return self.servers[0]

    def server_named(self, name: str) -> ServerConfig | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    def real_database(self, name: str) -> str:
        """The real database name for ``name``: an alias is resolved, any other name unchanged."""
        for rule in self.limits:
            if name in rule.aliases:
                return rule.database
        return name
