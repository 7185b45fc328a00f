"""Free loopback ports for servers a test starts (slurmctld, a torch process group's store)."""

from __future__ import annotations

import socket


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now. They are held open together while chosen, so they
    differ; another process could take one before the caller binds it (rare; tests accept it)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
