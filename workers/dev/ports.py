"""Local TCP ports for the servers and processes a development fleet starts.

Apart from `workers.dev.embedded` so that tools and tests can pick ports without
the embedded servers' packages (the `dev` extra).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below: ports that well-known servers use


def free_port() -> int:
    """A free port outside the kernel's ephemeral range, where one can be found.

    The kernel hands ephemeral ports to every outgoing connection and every bind to
    port 0 on the machine. A server stopped for a while (a restart, `fleet chaos
    pg-stop`) could find its port taken by one of them when it starts again; its
    clients keep the old URL, so it must get the same port back.
    """
    try:
        ephemeral_low = int(LOCAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    for _ in range(50):
        port = random.randrange(LOWEST, max(ephemeral_low, LOWEST + 1))
        if port_is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if a server could listen on the port (servers set SO_REUSEADDR, so TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
