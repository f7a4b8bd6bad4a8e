"""Stream-socket transport (spec section 5): the classic length-prefixed packets over a Unix
or TCP socket, one thread per connection, one request at a time per connection."""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time

import numpy as np

from ..dispatch import Request
from ..protocol import (MAX_PACKET_BODY, PACKET_HEADER, PACKET_LENGTH, ErrorCode, FramingError,
                        MsgType, check_packet_length, encode_error)

log = logging.getLogger("shmserve.stream")

_FIRST_READ = 64 * 1024
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                 errno.EPROTO, errno.EINTR}
_ACCEPT_BACKOFF_S = 0.05
_BODY_ALIGN = 64


def _aligned(n: int) -> memoryview:
    """n writable bytes whose byte 1, where a packet's body starts after its type byte, is on a
    64-byte boundary: tensors in an INFER body are then aligned for their dtype and reach the
    model as views of this buffer (section 3.1)."""
    raw = np.empty(n + _BODY_ALIGN, np.uint8)
    skip = -(raw.ctypes.data + 1) % _BODY_ALIGN
    return memoryview(raw[skip:skip + n])


class StreamRequest(Request):
    __slots__ = ("connection", "finished")

    def __init__(self, connection: "Connection", msg_type: int, body: bytes):
        super().__init__(msg_type, body)
        self.connection = connection
        self.finished = threading.Event()

    def _send(self, msg_type, payload, final):
        try:
            self.connection.send_packet(msg_type, payload)
        except OSError as exc:
            # The peer is gone (or too slow to take the reply): the model's thread must not
            # fail for it, and serve() ends the connection when it reads again.
            self.connection.closed = True
            log.debug("reply not delivered: %s", exc)
        finally:
            if final:
                self.finished.set()

    def cancelled(self) -> bool:
        return self.connection.closed


class Connection:
    def __init__(self, sock: socket.socket, transport: "StreamTransport"):
        self.sock = sock
        self.transport = transport
        self.closed = False
        self._send_lock = threading.Lock()
        self._packet_deadline: float | None = None

    def send_packet(self, msg_type: int, payload) -> None:
        header = PACKET_HEADER.pack(len(payload) + 1, msg_type)
        with self._send_lock:
            if len(payload) <= 65536:
                self.sock.sendall(header + bytes(payload))
            else:  # skip the concatenation copy for big bodies; TCP_NODELAY is set
                self.sock.sendall(header)
                self.sock.sendall(payload)

    def _read_exact(self, n: int, eof_ok: bool = False) -> memoryview | None:
        """n bytes; None on a clean EOF before a packet's first byte when ``eof_ok``.

        A packet's first byte starts its clock: the whole packet must arrive within the packet
        timeout however its bytes are spaced, so a slow-loris client cannot hold a thread with
        one byte per interval. The buffer grows with the bytes that arrive, not with the
        length a peer announces: 1024 peers announcing 16 MiB each would otherwise cost
        16 GiB before sending anything."""
        buf = _aligned(min(n, _FIRST_READ))
        got = 0
        while got < n:
            if self._packet_deadline is None:
                self.sock.settimeout(self.transport.idle_timeout)
            else:
                remaining = self._packet_deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"packet incomplete after {self.transport.packet_timeout} s")
                self.sock.settimeout(remaining)
            if got == len(buf):
                bigger = _aligned(min(2 * got, n))
                bigger[:got] = buf
                buf = bigger
            count = self.sock.recv_into(buf[got:])
            if not count:
                if got == 0 and eof_ok:
                    return None
                raise ConnectionError(f"peer closed mid-packet after {got} of {n} bytes")
            if self._packet_deadline is None:
                self._packet_deadline = time.monotonic() + self.transport.packet_timeout
            got += count
        return buf

    def serve(self) -> None:
        transport = self.transport
        try:
            while not transport.stopping:
                self._packet_deadline = None
                prefix = self._read_exact(4, eof_ok=True)
                if prefix is None:
                    return
                (length,) = PACKET_LENGTH.unpack(prefix)
                try:
                    check_packet_length(length, transport.max_body)
                except FramingError as exc:
                    code = ErrorCode.TOO_LARGE if exc.name == "TOO_LARGE" else ErrorCode.BAD_LENGTH
                    self.sock.settimeout(transport.packet_timeout)
                    self.send_packet(MsgType.ERROR, encode_error(code, str(exc)))
                    return  # the stream cannot be resynchronised: section 5
                packet = self._read_exact(length)
                self.sock.settimeout(transport.packet_timeout)  # the limit on sending the reply
                request = StreamRequest(self, packet[0], packet[1:])
                transport.dispatcher.dispatch([request])
                request.finished.wait()
                if self.closed:  # a reply could not be delivered: the stream is out of step
                    return
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            self.closed = True
            self.sock.close()
            transport.forget(self)


class StreamTransport:
    def __init__(self, dispatcher, sock: socket.socket, name: str, *, max_connections: int = 1024,
                 packet_timeout: float = 10.0, idle_timeout: float | None = None,
                 max_body: int = MAX_PACKET_BODY):
        self.dispatcher = dispatcher
        self.sock = sock
        self.name = name
        self.max_connections = max_connections
        self.packet_timeout = packet_timeout
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.stopping = False
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept",
                                        daemon=True)

    def start(self) -> None:
        self.sock.listen(128)
        self._thread.start()

    def set_ready(self) -> None:
        """Sockets are ready once listening."""

    def _accept_loop(self) -> None:
        starved = False
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError as exc:
                if self.stopping or exc.errno not in _ACCEPT_RETRY:
                    return  # listening socket closed by stop()
                # Out of descriptors or memory (a connection flood): the pending peers wait
                # in the backlog until some close; returning would stop serving for good.
                if not starved:
                    log.warning("accept failed (%s); retrying until it works", exc.strerror)
                starved = True
                time.sleep(_ACCEPT_BACKOFF_S)
                continue
            starved = False
            if client.family == socket.AF_INET:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if len(self._connections) >= self.max_connections:
                    log.warning("refusing connection: %d open", len(self._connections))
                    client.close()
                    continue
                connection = Connection(client, self)
                self._connections.add(connection)
            try:
                threading.Thread(target=connection.serve, name=f"{self.name}-conn",
                                 daemon=True).start()
            except RuntimeError as exc:  # out of threads: refuse this one, keep accepting
                log.warning("refusing connection: %s", exc)
                client.close()
                self.forget(connection)

    def forget(self, connection: Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for connection in list(self._connections):
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)


def listen_unix(path: str, mode: int) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing a stale socket file but never a live one."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
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
