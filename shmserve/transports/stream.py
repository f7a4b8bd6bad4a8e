"""Stream-socket transport (spec section 5): the classic length-prefixed packets over a Unix
or TCP socket, one thread per connection, one request at a time per connection."""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time

import numpy as np

from .. import _stream
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


_PREFIX = 4  # the packet length; then the type byte, then the body


def _packet_buffer(n: int) -> memoryview:
    """n writable bytes for a packet read whole, prefix included, whose body (at byte 5,
    after the length and the type byte) is on a 64-byte boundary: tensors in an INFER body
    are then aligned for their dtype and reach the model as views of this buffer (3.1)."""
    raw = np.empty(n + _BODY_ALIGN, np.uint8)
    skip = -(raw.ctypes.data + _PREFIX + 1) % _BODY_ALIGN
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
    __slots__ = ("connection", "_unfinished")

    def __init__(self, connection: "Connection", msg_type: int, body: bytes):
        super().__init__(msg_type, body, connection.transport.recorder)
        self.connection = connection
        # Held until the final reply has been sent; a lock, since an Event costs several
        # times more to make, and this is per request.
        self._unfinished = threading.Lock()
        self._unfinished.acquire()

    def wait_finished(self) -> None:
        self._unfinished.acquire()

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
                self._unfinished.release()

    def cancelled(self) -> bool:
        return self.connection.closed


class Connection:
    """One client connection, served by one thread, one request at a time.

    Reads go into one buffer kept for the connection: a request's packet usually arrives in a
    single recv (length, type and body together), and the socket is blocking with kernel
    timeouts (SO_RCVTIMEO/SO_SNDTIMEO), so a request costs one recv and one send and no poll.
    The buffer is reused only after the request's final reply, which is also when its body
    stops being valid (Request.release)."""

    def __init__(self, sock: socket.socket, transport: "StreamTransport", peer):
        self.sock = sock
        self.transport = transport
        self.peer = peer
        self.closed = False
        self._send_lock = threading.Lock()
        self._buf = _packet_buffer(_FIRST_READ)
        self._filled = 0  # bytes of _buf read from the socket, from its start
        self._packet_started = 0.0  # when the first byte of the packet being read came
        self._recv_timeout: float | None = None
        sock.settimeout(None)
        self._fd = sock.fileno()
        # Larger echoes need the buffer budget, so Python answers them.
        self._largest_echo = min(transport.max_body, UNBUDGETED_PACKET)
        self._set_timeout(socket.SO_SNDTIMEO, transport.packet_timeout)

    def _set_timeout(self, option: int, seconds: float | None) -> None:
        seconds = seconds or 0.0  # 0: no timeout
        whole = int(seconds)
        micros = int((seconds - whole) * 1e6) if seconds else 0
        if seconds and not whole and not micros:
            micros = 1  # a positive remainder must not turn into "never"
        self.sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, micros))

    def _set_recv_timeout(self, seconds: float | None) -> None:
        """SO_RCVTIMEO, set only when it changes: one syscall saved per packet."""
        if seconds != self._recv_timeout:
            self._set_timeout(socket.SO_RCVTIMEO, seconds)
            self._recv_timeout = seconds

    def send_packet(self, msg_type: int, payload) -> None:
        """Header and payload in one gathering sendmsg: no copy of the payload, one syscall
        (more only when the socket buffer takes a big reply in parts)."""
        size = len(payload)
        parts = [packet_header(msg_type, size), payload]
        with self._send_lock:
            sent = self.sock.sendmsg(parts)
            if sent == size + _PREFIX + 1:
                return
            rest = memoryview(b"".join(parts) if size <= UNBUDGETED_PACKET else
                              parts[0] + bytes(payload))[sent:]
            self.sock.sendall(rest)

    def _fill(self, need: int, deadline: float | None) -> bool:
        """Reads until ``need`` bytes are buffered; False on a clean EOF before any byte of a
        new packet. ``deadline`` None: waiting for a packet (the idle timeout applies); else the
        monotonic time by which the packet must be complete (the packet timeout).

        The buffer grows with the bytes that arrive, not with the length a peer announces:
        1024 peers announcing 16 MiB each would otherwise cost 16 GiB before sending
        anything. A packet's first byte starts its clock, so a slow-loris client cannot hold
        a thread with one byte per interval."""
        while self._filled < need:
            timeout = (self.transport.idle_timeout if deadline is None
                       else deadline - time.monotonic())
            if deadline is not None and timeout <= 0:
                raise TimeoutError(f"packet incomplete after {self.transport.packet_timeout} s")
            self._set_recv_timeout(timeout)
            if self._filled == len(self._buf):
                bigger = _packet_buffer(min(2 * self._filled, need))
                bigger[:self._filled] = self._buf[:self._filled]
                self._buf = bigger
            try:
                count = self.sock.recv_into(self._buf[self._filled:])
            except BlockingIOError:  # EAGAIN: SO_RCVTIMEO expired
                raise TimeoutError("idle timeout" if deadline is None else
                                   f"packet incomplete after {self.transport.packet_timeout} s")
            if not count:
                if self._filled == 0 and deadline is None:
                    return False
                raise ConnectionError(f"peer closed mid-packet after {self._filled} bytes")
            if deadline is None:
                self._packet_started = time.monotonic()
                deadline = self._packet_started + self.transport.packet_timeout
            self._filled += count
        return True

    def _consume(self, used: int) -> None:
        """Drops the first ``used`` bytes: a pipelined next packet moves to the buffer's start
        (a copy, rare), and a buffer grown for one big packet goes back to its usual size."""
        rest = self._filled - used
        if len(self._buf) > _FIRST_READ and rest <= _FIRST_READ:
            small = _packet_buffer(_FIRST_READ)
            small[:rest] = self._buf[used:self._filled]
            self._buf = small
        elif rest:
            self._buf[:rest] = bytes(self._buf[used:self._filled])
        if rest:  # a pipelined packet's bytes are here already: its clock starts now
            self._packet_started = time.monotonic()
        self._filled = rest

    def serve(self) -> None:
        transport = self.transport
        try:
            while not transport.stopping:
                if not self._answer_echoes():
                    return
                if self._filled < _PREFIX and not self._fill(_PREFIX, self._packet_deadline()):
                    return
                (length,) = PACKET_LENGTH.unpack_from(self._buf)
                try:
                    check_packet_length(length, transport.max_body)
                except FramingError as exc:
                    code = ErrorCode.TOO_LARGE if exc.name == "TOO_LARGE" else ErrorCode.BAD_LENGTH
                    self.send_packet(MsgType.ERROR, encode_error(code, str(exc)))
                    return  # the stream cannot be resynchronised: section 5
                budgeted = length if length > UNBUDGETED_PACKET else 0
                if budgeted and not self._reserve(budgeted):
                    return
                try:
                    if self._filled < _PREFIX + length:
                        # The clock started with the packet's first byte, or, for a body
                        # that waited for the budget, after that wait (not the peer's doing).
                        started = time.monotonic() if budgeted else self._packet_started
                        self._fill(_PREFIX + length, started + transport.packet_timeout)
                    packet = self._buf[_PREFIX:_PREFIX + length]
                    if packet[0] == MsgType.ECHO:
                        # Every model echoes, and the dispatcher would only send the body
                        # back: answered here, as the ring answers it in its native loop.
                        recorder = transport.recorder
                        started = recorder.begin() if recorder is not None else 0
                        self.send_packet(MsgType.ECHO, packet[1:])
                        if recorder is not None:
                            recorder.end(MsgType.ECHO, 0, started)
                    else:
                        request = StreamRequest(self, packet[0], packet[1:])
                        transport.dispatcher.dispatch([request])
                        request.wait_finished()  # a model may answer from its own thread
                finally:
                    if budgeted:
                        transport.budget.release(budgeted)
                if self.closed:  # a reply could not be delivered: the stream is out of step
                    return
                self._consume(_PREFIX + length)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            self.closed = True
            self.sock.close()
            transport.forget(self)

    def _answer_echoes(self) -> bool:
        """ECHO packets answered in C (shmserve/_stream.c) until something else arrives;
        False when the peer closed between packets."""
        transport = self.transport
        self._set_recv_timeout(transport.idle_timeout)
        filled, answered, error = _stream.echo(self._fd, self._buf, self._filled,
                                               self._largest_echo)
        if answered and transport.recorder is not None:
            transport.recorder.inline(MsgType.ECHO, answered)
        if filled and (answered or not self._filled):  # bytes read in C: their clock starts
            self._packet_started = time.monotonic()
        self._filled = filled
        if error == _stream.STREAM_EOF:
            return False
        if error and error != errno.EINTR:  # EINTR: Python's next read runs the handlers
            raise OSError(error, os.strerror(error))  # EAGAIN: a socket timeout
        return True

    def _packet_deadline(self) -> float | None:
        """None while no byte of the next packet is here (the idle timeout applies), else
        when that packet must be complete."""
        return self._packet_started + self.transport.packet_timeout if self._filled else None

    def _reserve(self, length: int) -> bool:
        """Waits (at most the packet timeout) for room in the buffer budget; without room the
        peer gets TOO_LARGE and, its body unread, the connection is closed (section 5)."""
        budget, timeout = self.transport.budget, self.transport.packet_timeout
        if length <= budget.total and budget.reserve(length, timeout):
            return True
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
        self.recorder = dispatcher.recorder(name)
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
