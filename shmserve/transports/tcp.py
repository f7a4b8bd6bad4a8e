"""TCP transport: the same packets as the Unix socket on --tcp-host:--tcp-port (loopback by default).
Every local user can connect to a loopback port; ``--tcp-peers owner`` admits only the
server's own user (and group, with --group-access)."""
import socket

from .peers import owner_uids_allowed
from .stream import StreamTransport, stream_options


class TcpTransport(StreamTransport):
    def __init__(self, dispatcher, host: str, port: int, **options):
        sock = socket.create_server((host, port))
        self.address = sock.getsockname()
        super().__init__(dispatcher, sock, "tcp", **options)

    def describe(self) -> dict:
        host, port = self.address[:2]
        return {"address": f"tcp://{host}:{port}", "host": host, "port": port}


def build(dispatcher, args):
    admit = owner_uids_allowed(args.group_access) if args.tcp_peers == "owner" else None
    return TcpTransport(dispatcher, args.tcp_host, args.tcp_port, admit_peer=admit,
                        **stream_options(args))
