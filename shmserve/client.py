"""Python clients for the ring and the packet sockets: for tests, tools and Python callers.

``RingClient`` is safe for the threads of one process only: CPython has no atomic
compare-and-swap on shared memory, so it claims slots by plain stores guarded by a process
lock. Several processes must each use a distinct ``slots`` range (or use the Go client).
"""
from __future__ import annotations

import mmap
import os
import socket
import threading
import time

import posix_ipc

from . import _ring
from . import layout as L
from .protocol import (PACKET_LENGTH, ErrorCode, MsgType, decode_error,
                       encode_packet, encode_prompt)


class ServerError(Exception):
    """An ERROR reply."""

    def __init__(self, code: int, message: str):
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        super().__init__(f"{name}: {message}")
        self.code = code
        self.message = message


def _raise_if_error(msg_type: int, body: bytes) -> None:
    if msg_type == MsgType.ERROR:
        raise ServerError(*decode_error(body))


class RingClient:
    def __init__(self, name: str, slots: range | None = None, spin_s: float = 0.0002):
        shm = posix_ipc.SharedMemory(L.shm_name(name))
        try:
            self.mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
        finally:
            shm.close_fd()
        self.geometry, self.generation = L.parse_header(self.mm, len(self.mm))
        self._words32 = memoryview(self.mm).cast("I")
        self._words64 = memoryview(self.mm).cast("Q")
        self.request_sem = posix_ipc.Semaphore(L.request_sem_name(name))
        self.slot_sems = [posix_ipc.Semaphore(L.slot_sem_name(name, i))
                          for i in range(self.geometry.slot_count)]
        self.spin_s = spin_s
        self._free = list(slots if slots is not None else range(self.geometry.slot_count))
        self._lock = threading.Lock()
        self._available = threading.Semaphore(len(self._free))
        self._next_id = 0

    def close(self) -> None:
        for sem in [self.request_sem, *self.slot_sems]:
            sem.close()
        self._words32.release()
        self._words64.release()
        self.mm.close()

    # Words go through memoryview casts: one aligned 4- or 8-byte load/store each. struct
    # packs little-endian integers byte by byte, so a concurrent reader could see a torn word
    # (an owner pid that names no process, a req_seq that was never published).
    def _u32(self, offset: int) -> int:
        return self._words32[offset >> 2]

    def _put_u32(self, offset: int, value: int) -> None:
        self._words32[offset >> 2] = value & 0xFFFFFFFF

    def _ring_bell(self) -> None:
        """Section 8 step 4: the doorbell after what it announces, the semaphore's value read
        after the doorbell store is visible (both fences are full ones: Python's stores have no
        order of their own)."""
        index = L.H_DOORBELL >> 3
        _ring.fence()
        self._words64[index] = (self._words64[index] + 1) & (1 << 64) - 1
        _ring.fence()
        if self.request_sem.value == 0:
            self.request_sem.release()

    def call(self, msg_type: int, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
        """Send one request; returns the (type, body) of its reply, frames joined."""
        frames = list(self.frames(msg_type, body, timeout))
        kind = frames[-1][0]
        return kind, b"".join(data for frame_type, data in frames if frame_type == kind)

    def frames(self, msg_type: int, body: bytes, timeout: float = 5.0):
        """Yield (type, data) per reply frame; acknowledges each non-final frame."""
        if len(body) > self.geometry.req_capacity:
            raise ValueError(f"{len(body)} bytes exceed the ring's req_capacity "
                             f"{self.geometry.req_capacity}")
        deadline = time.monotonic() + timeout
        if not self._available.acquire(timeout=timeout):
            raise TimeoutError("no free slot")
        with self._lock:
            slot = self._free.pop()
            self._next_id += 1
            req_id = (os.getpid() << 32) | self._next_id
        base = self.geometry.slot_offset(slot)
        try:
            self._put_u32(base + L.S_OWNER, os.getpid())
            while True:
                try:
                    self.slot_sems[slot].acquire(0)
                except posix_ipc.BusyError:
                    break
            seen = self._u32(base + L.S_FRAME_SEQ)
            seq = (self._u32(base + L.S_REQ_SEQ) + 1) & 0xFFFFFFFF
            data = self.geometry.request_data_offset(slot)
            self.mm[data:data + len(body)] = body
            L.write_request_fields(self.mm, base, req_id, len(body), msg_type)
            _ring.fence()  # release: the body and fields are seen before req_seq (section 10)
            self._put_u32(base + L.S_REQ_SEQ, seq)
            self._ring_bell()
            while True:
                seen = self._wait_frame(slot, base, seen, deadline)
                frame = L.read_frame(self.mm, base)
                L.check_frame(frame, seq, req_id, self.geometry.resp_capacity)
                reply = self.geometry.reply_data_offset(slot)
                payload = bytes(self.mm[reply:reply + frame.length])
                if frame.final:
                    _raise_if_error(frame.msg_type, payload)
                    yield frame.msg_type, payload
                    return
                yield frame.msg_type, payload
                self._put_u32(base + L.S_ACK_SEQ, seen)
                self._ring_bell()
        finally:
            _ring.fence()  # release: done reading the slot before giving it back
            self._put_u32(base + L.S_OWNER, 0)
            with self._lock:
                self._free.append(slot)
            self._available.release()

    def _wait_frame(self, slot: int, base: int, seen: int, deadline: float) -> int:
        spin_until = time.monotonic() + self.spin_s
        while True:
            current = self._u32(base + L.S_FRAME_SEQ)
            if current != seen:
                _ring.fence()  # acquire: the frame's fields and data are read after frame_seq
                return current
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no reply in slot {slot}")
            if now > spin_until:
                try:
                    self.slot_sems[slot].acquire(min(0.05, deadline - now))
                except posix_ipc.BusyError:
                    pass

    def echo(self, data: bytes, timeout: float = 5.0) -> bytes:
        return self.call(MsgType.ECHO, data, timeout)[1]

    def prompt(self, text: str, steps: int, timeout: float = 60.0) -> str:
        return self.call(MsgType.PROMPT, encode_prompt(text, steps), timeout)[1].decode()


class PacketClient:
    """One connection speaking section 5 packets over a Unix socket or TCP."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def send(self, msg_type: int, body: bytes = b"") -> None:
        self.sock.sendall(encode_packet(msg_type, body))

    def read(self) -> tuple[int, bytes]:
        (length,) = PACKET_LENGTH.unpack(self._read_exact(4))
        packet = self._read_exact(length)
        return packet[0], packet[1:]

    def _read_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                raise ConnectionError("server closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def call(self, msg_type: int, body: bytes = b"") -> tuple[int, bytes]:
        self.send(msg_type, body)
        msg_type, reply = self.read()
        _raise_if_error(msg_type, reply)
        return msg_type, reply

    def stream(self, text: str, steps: int):
        """Yield STREAM_CHUNK texts of a PROMPT_STREAM until STREAM_END."""
        self.send(MsgType.PROMPT_STREAM, encode_prompt(text, steps))
        while True:
            msg_type, body = self.read()
            _raise_if_error(msg_type, body)
            if msg_type == MsgType.STREAM_END:
                return
            yield body.decode()
