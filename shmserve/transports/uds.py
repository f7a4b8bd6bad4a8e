"""Unix-socket transport: classic packets at --socket PATH (0600 unless --group-access)."""
import os

from .stream import StreamTransport, listen_unix


class UnixTransport(StreamTransport):
    def __init__(self, dispatcher, path: str, group_access: bool = False, **options):
        self.path = path
        super().__init__(dispatcher, listen_unix(path, 0o660 if group_access else 0o600), "uds",
                         **options)

    def describe(self) -> dict:
        return {"socket": self.path}

    def stop(self) -> None:
        super().stop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def build(dispatcher, args):
    return UnixTransport(dispatcher, args.socket, args.group_access,
                         packet_timeout=args.packet_timeout)
