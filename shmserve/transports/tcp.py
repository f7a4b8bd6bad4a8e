"""TCP transport: the same packets as uds on --tcp-host:--tcp-port (loopback by default)."""
import socket

from .stream import StreamTransport


class TcpTransport(StreamTransport):
    def __init__(self, dispatcher, host: str, port: int, **options):
        sock = socket.create_server((host, port))
        self.address = sock.getsockname()
        super().__init__(dispatcher, sock, "tcp", **options)

    def describe(self) -> dict:
        return {"tcp": f"{self.address[0]}:{self.address[1]}"}


def build(dispatcher, args):
    return TcpTransport(dispatcher, args.tcp_host, args.tcp_port,
                        packet_timeout=args.packet_timeout)
