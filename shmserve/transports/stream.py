"""Stream-socket transport (spec section 5): the classic length-prefixed packets over a Unix
or TCP socket, one thread per connection, one request at a time per connection."""
from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import numpy as np

from ..dispatch import Request
from ..protocol import (MAX_PACKET_BODY, PACKET_LENGTH, ErrorCode, FramingError,
                        MsgType, check_packet_length, encode_error, packet_header)
from .peers import ConnectionGate, RefusalLog, peer_of

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
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PEER_CONNECTIONS = 256
DEFAULT_BUFFER_BUDGET = 256 * 1024 * 1024
# Packets up to this size are read without asking the budget: a full budget must not stall
# the small requests of everyone else, and 1024 connections x 64 KiB is a bound of its own.
UNBUDGETED_PACKET = 64 * 1024


class ByteBudget:
    """The bytes of large requests held at once across connections, each from the moment its
    body is read until its final reply has been sent (an echo's reply is its request's bytes).
    A client that never reads its reply holds its share until the send times out."""

    def __init__(self, total: int):
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    def reserve(self, n: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= n, timeout):
                return False
            self._free -= n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


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
    def __init__(self, sock: socket.socket, transport: "StreamTransport", peer):
        self.sock = sock
        self.transport = transport
        self.peer = peer
        self.closed = False
        self._send_lock = threading.Lock()
        self._packet_deadline: float | None = None

    def send_packet(self, msg_type: int, payload) -> None:
        header = packet_header(msg_type, len(payload))
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
                budgeted = length if length > UNBUDGETED_PACKET else 0
                if budgeted and not self._reserve(budgeted):
                    return
                try:
                    packet = self._read_exact(length)
                    self.sock.settimeout(transport.packet_timeout)  # the limit on sending the reply
                    request = StreamRequest(self, packet[0], packet[1:])
                    transport.dispatcher.dispatch([request])
                    request.finished.wait()
                finally:
                    if budgeted:
                        transport.budget.release(budgeted)
                if self.closed:  # a reply could not be delivered: the stream is out of step
                    return
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            self.closed = True
            self.sock.close()
            transport.forget(self)

    def _reserve(self, length: int) -> bool:
        """Waits (at most the packet timeout) for room in the buffer budget; without room the
        peer gets TOO_LARGE and, its body unread, the connection is closed (section 5)."""
        budget, timeout = self.transport.budget, self.transport.packet_timeout
        if length <= budget.total and budget.reserve(length, timeout):
            self._packet_deadline = time.monotonic() + timeout  # the wait was not the peer's
            return True
        self.sock.settimeout(timeout)
        self.send_packet(MsgType.ERROR, encode_error(
            ErrorCode.TOO_LARGE, f"a {length}-byte packet does not fit the server's buffer "
            f"budget of {budget.total} bytes (--buffer-budget) within {timeout} s"))
        return False


class StreamTransport:
    def __init__(self, dispatcher, sock: socket.socket, name: str, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_peer_connections: int = DEFAULT_MAX_PEER_CONNECTIONS,
                 packet_timeout: float = 10.0, idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_S,
                 buffer_budget: int = DEFAULT_BUFFER_BUDGET, max_body: int = MAX_PACKET_BODY,
                 admit_peer=None):
        self.dispatcher = dispatcher
        self.sock = sock
        self.name = name
        self.gate = ConnectionGate(max_connections, max_peer_connections)
        self.packet_timeout = packet_timeout
        self.idle_timeout = idle_timeout
        self.budget = ByteBudget(buffer_budget)
        self.max_body = max_body
        self.admit_peer = admit_peer  # a predicate on the peer, or None: everyone who can connect
        self.refusals = RefusalLog(log, name)
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
            try:
                peer = peer_of(client)
            except OSError:  # the peer is already gone
                client.close()
                continue
            if self.admit_peer is not None and not self.admit_peer(peer):
                self.refusals.refused(f"peer {peer} is not allowed (--tcp-peers)")
                client.close()
                continue
            refusal = self.gate.admit(peer)
            if refusal:
                self.refusals.refused(refusal)
                client.close()
                continue
            if client.family in (socket.AF_INET, socket.AF_INET6):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(client, self, peer)
            with self._lock:
                self._connections.add(connection)
            try:
                threading.Thread(target=connection.serve, name=f"{self.name}-conn",
                                 daemon=True).start()
            except RuntimeError as exc:  # out of threads: refuse this one, keep accepting
                self.refusals.refused(str(exc))
                client.close()
                self.forget(connection)

    def forget(self, connection: Connection) -> None:
        with self._lock:
            if connection not in self._connections:
                return
            self._connections.discard(connection)
        self.gate.release(connection.peer)

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


def stream_options(args) -> dict:
    """The limits every stream transport takes from the command line."""
    return dict(packet_timeout=args.packet_timeout, idle_timeout=args.idle_timeout,
                max_connections=args.max_connections,
                max_peer_connections=args.max_peer_connections, buffer_budget=args.buffer_budget)
