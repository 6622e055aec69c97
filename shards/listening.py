"""Which listeners the configuration enables, and their socket groups.

Shared by the router (which binds a group of N, one socket per shard) and the
one-process broker (a group of one), so both serve exactly the same listeners.
Each transport adds one entry to ``BINDERS`` (how its group is bound) and one to
:data:`shards.worker.SERVERS` (how a shard serves a socket of it).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from listeners.quic import attach_steering, ensure_self_signed, make_udp_group, server_configuration
from listeners.sockets import make_stream_group
from listeners.tls import server_context
from shards.config import Config

log = logging.getLogger("shoal.listeners")

# name -> (config, the listener's config table, n) -> sockets; bound in this order
Binder = Callable[[Config, Any, int], list[socket.socket]]


def _bind_stream(cfg: Config, table: Any, n: int) -> list[socket.socket]:
    return make_stream_group(table.bind, table.port, table.backlog, n)


def _bind_tls(cfg: Config, table: Any, n: int) -> list[socket.socket]:
    # load the certificate files once before binding, so a missing or mismatched file
    # stops the router (or the one-process broker) at start, not each shard later
    try:
        tls_context(table)
    except (OSError, ValueError) as err:
        raise OSError(f"[{table.section_path}]: cannot use certfile {table.certfile!r}, "
                      f"keyfile {table.keyfile!r}, cafile {table.cafile!r}: {err}") from err
    return _bind_stream(cfg, table, n)


def quic_cert(cfg: Config) -> tuple[str, str]:
    """(certfile, keyfile) of the QUIC listener: configured, or the generated self-signed one."""
    table = cfg.listeners.quic
    if table.certfile:
        return table.certfile, table.keyfile
    return ensure_self_signed(cfg.runtime.data_dir)


def _bind_quic(cfg: Config, table: Any, n: int) -> list[socket.socket]:
    # made (or loaded) once here, before any shard starts, so every shard loads the same
    # certificate and a bad file stops the start instead of each shard
    certfile, keyfile = quic_cert(cfg)
    try:
        server_configuration(certfile, keyfile, table.idle_timeout)
    except (OSError, ValueError) as err:
        raise OSError(f"[{table.section_path}]: cannot use certfile {certfile!r}, "
                      f"keyfile {keyfile!r}: {err}") from err
    socks = make_udp_group(table.bind, table.port, n)
    if table.steering == "bpf" and n > 1:
        try:
            attach_steering(socks[0], n)
            log.info("QUIC steering: BPF program attached to the UDP group (%d sockets)", n)
        except OSError as err:
            log.warning("QUIC steering: this kernel refused the BPF program (%s); datagrams "
                        "that reach the wrong shard are forwarded to their owner over the bus",
                        err)
    return socks


def tls_context(table: Any) -> Any:
    """The SSLContext of a [listeners.tls] or [listeners.wss] table."""
    return server_context(table.certfile, table.keyfile, table.cafile, table.verify_client,
                          table.min_version)


BINDERS: dict[str, Binder] = {
    "tcp": _bind_stream,
    "tls": _bind_tls,
    "ws": _bind_stream,
    "wss": _bind_tls,
    "quic": _bind_quic,
}


def bind_listeners(cfg: Config, n: int) -> list[tuple[str, str, int, list[socket.socket]]]:
    """(name, host, port, sockets) for every enabled listener; closes all on failure."""
    bound: list[tuple[str, str, int, list[socket.socket]]] = []
    try:
        for name, binder in BINDERS.items():
            table = getattr(cfg.listeners, name)
            if not table.enabled:
                continue
            socks = binder(cfg, table, n)
            bound.append((name, table.bind, socks[0].getsockname()[1], socks))
    except OSError:
        for _, _, _, socks in bound:
            for s in socks:
                s.close()
        raise
    return bound
