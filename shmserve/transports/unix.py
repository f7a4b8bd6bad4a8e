"""Unix-socket transport: classic packets at --socket PATH (0600 unless --group-access)."""
import os
import socket
import stat

from .. import layout as L
from ..trust import UntrustedFileError, check_directories, private_directory
from .stream import StreamTransport, stream_options


class UnixTransport(StreamTransport):
    def __init__(self, dispatcher, path: str, group_access: bool = False, **options):
        self.path = secure_socket_path(path, group_access)
        super().__init__(dispatcher, listen_unix(self.path, 0o660 if group_access else 0o600),
                         "unix", **options)

    def describe(self) -> dict:
        return {"address": f"unix://{self.path}", "path": self.path}

    def stop(self) -> None:
        super().stop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def secure_socket_path(path: str, group_access: bool) -> str:
    """The path to bind: in the default directory (made private first) or in directories no
    other user can change, with symlinks resolved so none can be swapped after the check."""
    directory = os.path.dirname(os.path.abspath(path))
    if directory == L.default_socket_dir():
        private_directory(directory, group_access)
    real = os.path.realpath(directory)
    check_directories(real)
    return os.path.join(real, os.path.basename(path))


def listen_unix(path: str, mode: int) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing a stale socket file but never a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise UntrustedFileError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise FileExistsError(f"{path} is in use by a live server")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # no window in which the socket is wider than mode
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    return sock


def build(dispatcher, args):
    return UnixTransport(dispatcher, args.socket, args.group_access, **stream_options(args))

