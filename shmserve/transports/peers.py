"""Who is on the other end of a socket, how many connections each peer may hold, and a
warning that does not flood the log when a transport refuses connections by the thousand.

A peer is a user id wherever the kernel can tell: SO_PEERCRED on a Unix socket, and the
socket table (/proc/net/tcp, /proc/net/tcp6) for a TCP peer on this host, where every local
user shares one loopback address. A remote TCP peer is its address.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import socket
import struct
import threading
import time

_UCRED = struct.Struct("3i")  # pid, uid, gid
REFUSAL_LOG_INTERVAL_S = 10.0


def unix_peer_uid(sock: socket.socket) -> int:
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def _proc_net_address(host: str, port: int) -> tuple[str, str]:
    """``host:port`` as /proc/net/tcp{,6} prints it: the address's 32-bit words in host
    (little-endian) order, each as 8 upper-case hex digits, then the port as 4."""
    packed = ipaddress.ip_address(host).packed
    words = "".join(f"{word:08X}" for word in struct.unpack(f"<{len(packed) // 4}I", packed))
    return ("tcp" if len(packed) == 4 else "tcp6"), f"{words}:{port:04X}"


def local_tcp_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of a TCP connection whose peer is on this host, or None
    (a remote peer, or one that has already closed)."""
    peer_host, peer_port = sock.getpeername()[:2]
    local_host, local_port = sock.getsockname()[:2]
    table, peer = _proc_net_address(peer_host, peer_port)
    _, local = _proc_net_address(local_host, local_port)
    # The peer's own socket is the row whose local address is our peer and whose remote
    # address is us; our row has them the other way round.
    try:
        with open(f"/proc/net/{table}") as f:
            text = f.read()
    except OSError:
        return None
    at = text.find(f" {peer} {local} ")
    if at < 0:
        return None
    fields = text[at:text.find("\n", at)].split()
    return int(fields[6])  # local, remote, st, tx:rx, tr:when, retrnsmt, uid


def peer_of(sock: socket.socket):
    """A hashable key for the peer: its uid where the kernel tells us, else its address."""
    if sock.family == socket.AF_UNIX:
        return unix_peer_uid(sock)
    uid = local_tcp_peer_uid(sock)
    return uid if uid is not None else sock.getpeername()[0]


def owner_uids_allowed(group_access: bool):
    """The peer test of ``--tcp-peers owner``: this server's uid, and with group access any
    user whose groups include the server's group (the same users the 0660 objects admit)."""
    me, my_gid = os.geteuid(), os.getegid()

    def allowed(peer) -> bool:
        if not isinstance(peer, int):  # a remote address: no local user to check
            return False
        uid = peer
        if uid == me:
            return True
        if not group_access:
            return False
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return my_gid in os.getgrouplist(user.pw_name, user.pw_gid)

    return allowed


class RefusalLog:
    """Logs the first refused connection at once, then at most one line per interval with
    the count: a flood of refused connects must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, what: str):
        self.logger, self.what = logger, what
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def refused(self, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + REFUSAL_LOG_INTERVAL_S
        more = f" ({suppressed} more refused since the last report)" if suppressed else ""
        self.logger.warning("%s: refusing connection: %s%s", self.what, reason, more)


class ConnectionGate:
    """Admits a connection while the transport holds fewer than ``max_connections`` and its
    peer fewer than ``max_per_peer``: one user's idle connections can then fill only its own
    share, never lock every other user out."""

    def __init__(self, max_connections: int, max_per_peer: int):
        self.max_connections, self.max_per_peer = max_connections, max_per_peer
        self._lock = threading.Lock()
        self._total = 0
        self._per_peer: dict[object, int] = {}

    def admit(self, peer) -> str | None:
        """None when admitted (call ``release`` later), else why not."""
        with self._lock:
            if self._total >= self.max_connections:
                return f"{self._total} open (--max-connections {self.max_connections})"
            held = self._per_peer.get(peer, 0)
            if held >= self.max_per_peer:
                return (f"peer {_describe(peer)} holds {held} (--max-peer-connections "
                        f"{self.max_per_peer})")
            self._total += 1
            self._per_peer[peer] = held + 1
            return None

    def release(self, peer) -> None:
        with self._lock:
            self._total -= 1
            if self._per_peer[peer] == 1:
                del self._per_peer[peer]
            else:
                self._per_peer[peer] -= 1

    @property
    def total(self) -> int:
        return self._total


def _describe(peer) -> str:
    return f"uid {peer}" if isinstance(peer, int) else str(peer)
