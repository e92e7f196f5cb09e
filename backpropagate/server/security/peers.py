"""Who is on the other end of a loopback connection: the OS user owning the client's socket (Linux).

The kernel's socket tables (``/proc/net/tcp``, ``/proc/net/tcp6``) list every TCP socket on this
host with the uid of its owner. For a loopback connection the client's socket is one of them: its
local address is our peer's, its remote address is ours. Another local user cannot fake that entry,
so it tells this user's own processes (CLI, scripts, cloudflared) from everyone else's.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from backpropagate.server.security.asgi import Scope

_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_ESTABLISHED = "01"
# A reverse proxy running as this user would otherwise make every visitor look like the user.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip", b"cf-connecting-ip")


def _hex_endpoint(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """An address as the socket tables print it: 32-bit words in host byte order, then the port."""
    packed = address.packed
    if sys.byteorder == "little":
        packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{packed.hex().upper()}:{port:04X}"


def _forms(ip: str, port: int) -> set[str]:
    """Every way the tables may print this endpoint (an IPv4 peer of a dual-stack socket shows as
    ``::ffff:a.b.c.d`` on one side and plain IPv4 on the other)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    forms = {_hex_endpoint(address, port)}
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        forms.add(_hex_endpoint(address.ipv4_mapped, port))
    elif isinstance(address, ipaddress.IPv4Address):
        forms.add(_hex_endpoint(ipaddress.IPv6Address(f"::ffff:{address}"), port))
    return forms


def socket_owner(scope: Scope) -> int | None:
    """The uid owning the client's socket of a loopback connection; None when unknown (a client on
    another machine, or no socket tables on this system)."""
    client, server = scope.get("client"), scope.get("server")
    if not client or not server or not client[1] or server[1] is None:
        return None
    try:
        if not _is_loopback(str(client[0])):
            return None
        mine, theirs = _forms(str(client[0]), int(client[1])), _forms(str(server[0]), int(server[1]))
    except ValueError:
        return None
    for table in _TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # Established only: a socket in TIME_WAIT has no owner any more and is listed as uid 0.
            if len(fields) > 7 and fields[1] in mine and fields[2] in theirs and fields[3] == _ESTABLISHED:
                return int(fields[7])
    return None


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def is_same_user(scope: Scope) -> bool:
    """Whether the client is a process of the OS user this server runs as, on this machine.

    False for a request that names a forwarded client: it came through a proxy, and whoever runs
    the proxy, the visitor behind it is not this user.
    """
    if any(k.lower() in FORWARDING_HEADERS for k, _ in scope.get("headers", [])):
        return False
    return socket_owner(scope) == os.getuid()
