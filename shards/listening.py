"""Which listeners the configuration enables, and their socket groups.

Shared by the router (which binds a group of N, one socket per shard) and the
one-process broker (a group of one), so both serve exactly the same listeners.
Each transport adds one entry to ``BINDERS`` (how its group is bound) and one to
:data:`shards.worker.SERVERS` (how a shard serves a socket of it).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from listeners.sockets import make_stream_group
from listeners.tls import server_context
from shards.config import Config

# name -> (the listener's config table, n) -> sockets; bound in this order
Binder = Callable[[Any, int], list[socket.socket]]


def _bind_stream(table: Any, n: int) -> list[socket.socket]:
    return make_stream_group(table.bind, table.port, table.backlog, n)


def _bind_tls(table: Any, n: int) -> list[socket.socket]:
    # load the certificate files once before binding, so a missing or mismatched file
    # stops the router (or the one-process broker) at start, not each shard later
    try:
        tls_context(table)
    except (OSError, ValueError) as err:
        raise OSError(f"[{table.section_path}]: cannot use certfile {table.certfile!r}, "
                      f"keyfile {table.keyfile!r}, cafile {table.cafile!r}: {err}") from err
    return _bind_stream(table, n)


def tls_context(table: Any) -> Any:
    """The SSLContext of a [listeners.tls] or [listeners.wss] table."""
    return server_context(table.certfile, table.keyfile, table.cafile, table.verify_client,
                          table.min_version)


BINDERS: dict[str, Binder] = {
    "tcp": _bind_stream,
    "tls": _bind_tls,
    "ws": _bind_stream,
    "wss": _bind_tls,
}


def bind_listeners(cfg: Config, n: int) -> list[tuple[str, str, int, list[socket.socket]]]:
    """(name, host, port, sockets) for every enabled listener; closes all on failure."""
    bound: list[tuple[str, str, int, list[socket.socket]]] = []
    try:
        for name, binder in BINDERS.items():
            table = getattr(cfg.listeners, name)
            if not table.enabled:
                continue
            socks = binder(table, n)
            bound.append((name, table.bind, socks[0].getsockname()[1], socks))
    except OSError:
        for _, _, _, socks in bound:
            for s in socks:
                s.close()
        raise
    return bound
