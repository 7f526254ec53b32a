"""The daemon as an operating-system process: daemon mode (-d), the pidfile, and systemd's
sd_notify (READY, RELOADING, STOPPING) when started with Type=notify.

A pidfile held by a live process refuses the start with one line; a stale one (its process is
gone) is replaced. The pidfile is removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket

from pgcorral.errors import ConfigError


def check_pidfile(path: str) -> None:
    """Refuse to start when another live process holds ``path``."""
    try:
        with open(path, encoding="ascii") as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the pidfile: {exc.strerror}"]) from None
    if pid > 0 and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # stale
        except PermissionError:
            pass  # alive, another user's
        raise ConfigError([f"{path}: another pgcorral (pid {pid}) is running; stop it or "
                           "remove the pidfile if that process is not pgcorral"])


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` (after ``check_pidfile``) and remove it at exit."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)
    mine = os.getpid()

    def remove() -> None:
        if os.getpid() != mine:
            return
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="ascii") as f:
                if int(f.read().strip() or "0") != mine:
                    return  # a newer pgcorral on the port took it over (so_reuseport)
            os.unlink(path)

    atexit.register(remove)


def check_port_free(host: str, port: int) -> None:
    """Before detaching: fail in the foreground if the listening port is taken."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("" if host in ("*", "") else host, port))
    except OSError as exc:
        raise ConfigError([f"cannot listen on {host}:{port}: {exc.strerror}"]) from None
    finally:
        probe.close()


def daemonize() -> None:
    """Detach from the terminal: double fork, new session, standard streams to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def sd_notify(state: str) -> bool:
    """Tell systemd our state (``READY=1``, ``RELOADING=1``, ``STOPPING=1``) when it started us
    with Type=notify; a no-op (False) otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
