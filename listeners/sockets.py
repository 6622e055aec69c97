"""Listening sockets, bound the way shoal's shards share them.

Knows nothing of MQTT. A listener is a group of N sockets on one address with
SO_REUSEPORT, bound in a fixed order: the kernel spreads new connections over
the group, and the bind order is the group's index order (what QUIC's
connection-id steering relies on). The router binds every group once and keeps
it for its whole life; a one-process broker binds a group of one.
"""

from __future__ import annotations

import socket


def make_stream_group(host: str, port: int, backlog: int, n: int) -> list[socket.socket]:
    """N listening TCP sockets on one address, in bind order. Port 0: the kernel picks
    one for the first socket and the others join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            port = s.getsockname()[1]
            s.listen(backlog)
            s.setblocking(False)
            socks.append(s)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks
