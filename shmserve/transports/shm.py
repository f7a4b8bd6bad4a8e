"""Shared-memory ring transport: the server side of spec/PROTOCOL.md sections 6-11.

One thread owns the ring: it is the only writer of every server field, so no server-side
locks are needed. Models that answer from their own threads (Gemma) hand frames to that
thread through ``_outbox`` and wake it with the request semaphore.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import glob
import logging
import mmap
import os
import platform
import re
import secrets
import stat
import struct
import threading
import time
from threading import get_ident

import numpy as np
import posix_ipc

from .. import layout as L
from .. import trust
from ..dispatch import Request
from ..protocol import ErrorCode, MsgType, encode_error

log = logging.getLogger("shmserve.shm")

# frame_req_seq, frame_req_id, frame_len, frame_type, frame_flags: one pack_into, then the
# frame_seq publish store on its own.
_FRAME_FIELDS = struct.Struct("<IQIBB")
assert L.S_FRAME_REQ_SEQ + 4 == L.S_FRAME_REQ_ID and L.S_FRAME_FLAGS == L.S_FRAME_REQ_SEQ + 17
_REQUEST_FIELDS = struct.Struct("<QIB")  # req_id, req_len, req_type
assert L.S_REQ_ID + 8 == L.S_REQ_LEN and L.S_REQ_LEN + 4 == L.S_REQ_TYPE

LOCK_RETRY_S = 0.2
_U32 = 0xFFFFFFFF
# Payload types that are already flat bytes; anything else (numpy arrays) is cast once.
_FLAT_BUFFERS = (bytes, bytearray, memoryview)
_TEXT_TYPES = frozenset({MsgType.CLASSIFY, MsgType.PROMPT, MsgType.STREAM_CHUNK,
                         MsgType.METADATA})
_PID_MAX = 0x7FFFFFFF  # pid_t is a signed 32-bit integer


def _wake(sem: posix_ipc.Semaphore) -> None:
    """sem_post as the wake-up hint it is. A count already at SEM_VALUE_MAX (anyone who can
    write the ring can also set it: the semaphore is a file beside it with the same mode)
    fails with EOVERFLOW; it has tokens enough to wake its waiter, and the exception would
    end the ring loop or skip the unlinks at stop."""
    try:
        sem.release()
    except OSError as exc:
        if exc.errno != errno.EOVERFLOW:
            raise


class RingInUseError(RuntimeError):
    """Another live server holds the ring's liveness lock."""


class RingSquattedError(trust.UntrustedFileError):
    """Another user's file holds one of the ring's names, and this server may not remove it."""


class RingObjects:
    """Creates, owns and removes the named objects of one ring (section 11)."""

    def __init__(self, name: str, geometry: L.Geometry, group_access: bool = False,
                 shm_dir: str = "/dev/shm"):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError("the ring's memory ordering is defined for x86-64 only "
                               f"(spec section 10); this CPU is {platform.machine()}: use uds")
        self.name = L.check_name(name)
        self.geometry = geometry
        self.mode = 0o660 if group_access else 0o600
        self.shm_dir = shm_dir
        self.generation = secrets.randbits(64) or 1
        self._lock_fd = self._take_lock()
        try:
            self._remove_stale()
            self._create()
        except BaseException:
            self._release_lock(unlink=False)
            raise

    def _take_lock(self) -> int:
        path = L.lock_path(self.name, self.shm_dir)
        fd = self._open_own_lock(path)
        # Clients probe liveness with a brief shared lock (section 11); retry for a moment so
        # a probe that happens to overlap a restart is not mistaken for a live server.
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                os.close(fd)
                raise RingInUseError(f"ring {self.name!r} is served by another live process "
                                     f"(it holds {path}); pick another --name") from None
        os.fchmod(fd, self.mode)
        return fd

    def _open_own_lock(self, path: str) -> int:
        """Opens the lock file, never through a symlink and never one of another user's: a
        lock anyone can create and flock first would deny the name, and a planted link made
        the server flock and chmod the link's target (section 6.1)."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(2):
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, self.mode)
                return fd
            except FileExistsError:
                pass
            try:
                fd = os.open(path, flags | os.O_NONBLOCK)  # a FIFO planted there must not block
            except FileNotFoundError:
                continue  # removed meanwhile: create it
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                self._remove_foreign(path, f"{path} is a symlink")
                continue
            try:
                trust.check_own(os.fstat(fd), path, "regular file", stat.S_ISREG)
            except trust.UntrustedFileError as exc:
                os.close(fd)
                self._remove_foreign(path, str(exc))
                continue
            os.set_blocking(fd, True)
            return fd
        raise trust.UntrustedFileError(f"{path} keeps being replaced by another process")

    def _remove_foreign(self, path: str, why: str) -> None:
        """Unlinks a file that is not ours from sticky /dev/shm: only root (or the file's
        owner) may, so any other server stops with the reason instead of trusting it."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except PermissionError:
            raise RingSquattedError(f"ring {self.name!r} cannot be served: {why}; its owner "
                                    "or root must remove it, or pick another --name") from None
        log.warning("removed %s: %s", path, why)

    def _sem_files(self) -> list[str]:
        # Exactly this ring's names, never another ring's whose name merely starts the same
        # (when names could hold dots, "NAME.*" also matched a live ring "NAME.x").
        own = re.compile(re.escape(f"sem.shmserve.{self.name}.") + r"(req|s(0|[1-9][0-9]*))")
        pattern = os.path.join(self.shm_dir, glob.escape(f"sem.shmserve.{self.name}.") + "*")
        return [path for path in glob.glob(pattern) if own.fullmatch(os.path.basename(path))]

    def _remove_stale(self) -> None:
        """Holding the lock proves any object under this name belongs to a dead server, or to
        another user who created it first: that one goes too where we may remove it."""
        removed = 0
        for path in [os.path.join(self.shm_dir, L.shm_name(self.name)[1:]), *self._sem_files()]:
            try:
                owner = os.lstat(path).st_uid
            except FileNotFoundError:
                continue
            if owner != os.geteuid():
                self._remove_foreign(path, f"{path} is owned by uid {owner}")
                continue
            os.unlink(path)
            removed += 1
        if removed:
            log.warning("removed %d stale object(s) of a dead server named %r", removed,
                        self.name)

    def _create(self) -> None:
        g = self.geometry
        shm = posix_ipc.SharedMemory(L.shm_name(self.name), posix_ipc.O_CREX, mode=self.mode,
                                     size=g.total_size)
        try:
            os.fchmod(shm.fd, self.mode)  # the umask may have narrowed a group-access mode
            self.inode = os.fstat(shm.fd).st_ino
            self.mm = mmap.mmap(shm.fd, g.total_size)
        finally:
            shm.close_fd()
        # Every word the other side reads while it changes goes through these views: one
        # whole-word store or load each (section 10), where struct works byte by byte.
        self.words32 = memoryview(self.mm).cast("I")
        self.words64 = memoryview(self.mm).cast("Q")
        self.request_sem = self._make_sem(L.request_sem_name(self.name))
        self.slot_sems = [self._make_sem(L.slot_sem_name(self.name, i)) for i in range(g.slot_count)]
        mm = self.mm
        struct.pack_into("<HHIIIII", mm, L.H_VERSION_MAJOR, L.VERSION_MAJOR, L.VERSION_MINOR,
                         L.HEADER_SIZE, g.slot_count, g.slot_stride, g.req_capacity,
                         g.resp_capacity)
        struct.pack_into("<QQII", mm, L.H_TOTAL_SIZE, g.total_size, self.generation, os.getpid(),
                         L.HEADER_FLAG_GROUP_ACCESS if self.mode == 0o660 else 0)
        self.set_state(L.ServerState.STARTING)
        self.heartbeat()
        mm[L.H_MAGIC:L.H_MAGIC + 8] = L.MAGIC  # last: attachers never see a half header

    def _make_sem(self, sem_name: str) -> posix_ipc.Semaphore:
        sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=self.mode, initial_value=0)
        # Widen past the umask through a descriptor of the file we just created, never by
        # a path that could have become something else.
        path = os.path.join(self.shm_dir, "sem." + sem_name[1:])
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            trust.check_own(os.fstat(fd), path, "regular file", stat.S_ISREG)
            os.fchmod(fd, self.mode)
        finally:
            os.close(fd)
        return sem

    def set_state(self, state: L.ServerState) -> None:
        self.words32[L.H_SERVER_STATE >> 2] = state

    def heartbeat(self) -> None:
        self.words64[L.H_HEARTBEAT_NS >> 3] = time.monotonic_ns()

    def close(self) -> None:
        """Section 11 Stop, last steps: wake every waiter, unlink everything, drop the lock.
        Views of ``mm`` should be released first; one still held (a request body a model
        thread kept) must not stop the unlinks, so the mapping is then left to process exit."""
        self.set_state(L.ServerState.STOPPED)
        self.words32.release()
        self.words64.release()
        try:
            self.mm.close()
        except BufferError:
            log.debug("ring mapping still referenced at stop; unmapped at exit")
        for sem in self.slot_sems:
            _wake(sem)
        for sem in [self.request_sem, *self.slot_sems]:
            sem.close()
        for path in self._sem_files():
            os.unlink(path)
        try:
            posix_ipc.unlink_shared_memory(L.shm_name(self.name))
        except posix_ipc.ExistentialError:
            pass
        self._release_lock(unlink=True)

    def _release_lock(self, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(L.lock_path(self.name, self.shm_dir))
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)


class RingRequest(Request):
    __slots__ = ("transport", "slot", "seq", "req_id", "cancel_flag")

    def __init__(self, transport: "ShmTransport", slot: int, seq: int, req_id: int,
                 msg_type: int, body):
        super().__init__(msg_type, body)
        self.transport = transport
        self.slot = slot
        self.seq = seq
        self.req_id = req_id
        self.cancel_flag = False

    def cancelled(self) -> bool:
        return self.cancel_flag

    def _send(self, msg_type, payload, final):
        self.transport.send(self, msg_type, payload, final)


class ShmTransport:
    """Serves one ring on its own thread until ``stop``."""

    name = "shm"

    def __init__(self, dispatcher, ring_name: str, geometry: L.Geometry, *, spin_us: float = 50.0,
                 max_batch: int = 64, batch_wait_us: float = 0.0, group_access: bool = False,
                 stop_grace_s: float = 2.0):
        self.dispatcher = dispatcher
        self.objects = RingObjects(ring_name, geometry, group_access)
        self.geometry = g = geometry
        self.spin_ns = int(spin_us * 1000)
        self.max_batch = max_batch
        self.batch_wait_ns = int(batch_wait_us * 1000)
        self.stop_grace_s = stop_grace_s
        mm = self.objects.mm
        self._mv = memoryview(mm)
        self._u32 = self.objects.words32
        self._u64 = self.objects.words64
        self._doorbell_index = L.H_DOORBELL // 8
        self._slot_sems = self.objects.slot_sems
        stride = g.slot_stride

        def column(offset):
            return np.ndarray((g.slot_count,), np.uint32, buffer=mm,
                              offset=L.HEADER_SIZE + offset, strides=(stride,))

        self._req_seq = column(L.S_REQ_SEQ)
        self._owner = column(L.S_OWNER)
        self._served = np.zeros(g.slot_count, np.uint32)
        self._slot_base = [g.slot_offset(i) for i in range(g.slot_count)]
        # Per-slot reply state, touched only by the ring thread.
        self._queued = [collections.deque() for _ in range(g.slot_count)]
        self._awaiting_ack: set[int] = set()  # slots whose last frame was not FINAL
        self._open_requests: dict[int, RingRequest] = {}  # slot -> request answered later
        self._outbox: collections.deque = collections.deque()  # frames from other threads
        self._thread_id = None
        self._stopping = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shm:{ring_name}", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"name": self.objects.name, "generation": f"{self.objects.generation:016x}",
                "slots": self.geometry.slot_count}

    def start(self) -> None:
        self._thread.start()

    def set_ready(self) -> None:
        self.objects.set_state(L.ServerState.READY)

    def stop(self) -> None:
        self._stop.set()
        _wake(self.objects.request_sem)
        self._thread.join()
        self.objects.set_state(L.ServerState.STOPPED)
        self._release_views()
        self.objects.close()

    def _release_views(self) -> None:
        self._req_seq = self._owner = None
        self._u32 = self._u64 = None  # the objects' views, released by objects.close
        self._mv.release()

    # -- loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        bell = self._u64[self._doorbell_index]
        next_housekeeping = 0.0
        try:
            while True:
                if self._stop.is_set() and not self._stopping:
                    self._begin_stop()
                if self._stopping and (not self._open_requests or
                                       time.monotonic() > self._stop_deadline):
                    self._finish_stop()
                    return
                new_bell = self._u64[self._doorbell_index]
                if new_bell != bell or self._outbox:
                    bell = new_bell
                    self._drain_outbox()
                    self._serve_ready_slots()
                    self._check_acks_and_cancels()
                elif not self._wait(bell):
                    # A quiet spell: rescan anyway, so a lost or forged doorbell update can
                    # delay a request by one interval at most, never strand it.
                    self._serve_ready_slots()
                    self._check_acks_and_cancels()
                    next_housekeeping = 0.0
                now = time.monotonic()
                if now >= next_housekeeping:
                    self.objects.heartbeat()
                    self._reclaim_dead_clients()
                    next_housekeeping = now + L.HEARTBEAT_INTERVAL_S
        except Exception:
            log.exception("ring loop crashed")
            raise

    def _wait(self, bell: int) -> bool:
        """Spin, then block on the request semaphore; False when the timed wait expired."""
        u64, index, outbox = self._u64, self._doorbell_index, self._outbox
        if self.spin_ns:
            deadline = time.monotonic_ns() + self.spin_ns
            polls = 0
            while u64[index] == bell and not outbox:
                polls += 1
                if not polls & 31:
                    if time.monotonic_ns() > deadline:
                        break
                    # Yield so a client spinning on the same core can run (notes, pitfall 1).
                    os.sched_yield()
            else:
                return True
        # Tokens without doorbell changes (stray posts, or a count someone set to
        # SEM_VALUE_MAX) would keep every wait from expiring: bound the whole phase too, so
        # the heartbeat and the reclaim of dead clients never stop.
        give_up = time.monotonic() + L.HEARTBEAT_INTERVAL_S
        while u64[index] == bell and not outbox and not self._stop.is_set():
            try:
                self.objects.request_sem.acquire(L.HEARTBEAT_INTERVAL_S)
            except posix_ipc.BusyError:
                return False
            except posix_ipc.SignalError:
                # sem_timedwait returns EINTR after SIGSTOP/SIGCONT even without a handler;
                # a token only means "look again", so look again.
                continue
            if time.monotonic() > give_up:
                return False
        return True

    def _serve_ready_slots(self) -> None:
        # (a != b).nonzero() is ~2x cheaper than np.flatnonzero on 64 slots (notes).
        ready = (self._req_seq != self._served).nonzero()[0]
        if not len(ready):
            return
        requests = self._read_requests(ready[:self.max_batch])
        if self.batch_wait_ns and len(requests) < self.max_batch:
            requests += self._wait_for_more(self.max_batch - len(requests))
        if self._stopping:
            for request in requests:
                request.fail(ErrorCode.SHUTTING_DOWN, "server is stopping")
            return
        self.dispatcher.dispatch(requests, may_wait=False)
        # Requests a model answers from its own thread, or that another transport's thread
        # runs in its model call, stay open until their final frame.
        for request in requests:
            if not request.done:
                self._open_requests[request.slot] = request

    def _wait_for_more(self, room: int) -> list:
        """Dynamic batching: give other clients up to batch_wait to join this model call."""
        deadline = time.monotonic_ns() + self.batch_wait_ns
        gathered = []
        bell = self._u64[self._doorbell_index]
        while room > 0 and time.monotonic_ns() < deadline:
            if self._u64[self._doorbell_index] == bell:
                continue
            bell = self._u64[self._doorbell_index]
            ready = (self._req_seq != self._served).nonzero()[0]
            more = self._read_requests(ready[:room])
            gathered += more
            room -= len(more)
        return gathered

    def _read_requests(self, slots) -> list:
        requests = []
        u32, mm, capacity = self._u32, self.objects.mm, self.geometry.req_capacity
        reply_capacity = self.geometry.resp_capacity
        for slot in slots.tolist():
            base = self._slot_base[slot]
            seq = u32[(base + L.S_REQ_SEQ) >> 2]
            # Read each field once, then validate: a hostile writer may change them later.
            req_id, length, msg_type = _REQUEST_FIELDS.unpack_from(mm, base + L.S_REQ_ID)
            self._served[slot] = seq
            if self._queued[slot]:  # a new request supersedes what the client never acked
                self._queued[slot].clear()
            self._awaiting_ack.discard(slot)
            problem = L.check_request_record(u32[(base + L.S_OWNER) >> 2], length, capacity)
            if problem:
                RingRequest(self, slot, seq, req_id, msg_type, b"").fail(
                    ErrorCode.CORRUPT_RECORD, problem)
                continue
            offset = base + L.S_DATA
            if msg_type == MsgType.ECHO and length <= reply_capacity and not self._stopping:
                # Echo needs no model and no Request object: answering it here halves the
                # server's per-message cost, which is what bounds ring throughput.
                self._publish(slot, seq, req_id, MsgType.ECHO, self._mv[offset:offset + length],
                              True)
                continue
            requests.append(RingRequest(self, slot, seq, req_id, msg_type,
                                        self._mv[offset:offset + length]))
        return requests

    # -- replies -----------------------------------------------------------------------------
    def send(self, request: RingRequest, msg_type: int, payload, final: bool) -> None:
        if get_ident() != self._thread_id:
            self._outbox.append((request, msg_type, payload, final))
            if self.objects.request_sem.value == 0:
                _wake(self.objects.request_sem)
            return
        self._enqueue_frames(request, msg_type, payload, final)

    def _enqueue_frames(self, request: RingRequest, msg_type: int, payload, final: bool) -> None:
        data = payload if type(payload) in _FLAT_BUFFERS else memoryview(payload).cast("B")
        capacity = self.geometry.resp_capacity
        queue = self._queued[request.slot]
        if len(data) <= capacity and not queue and request.slot not in self._awaiting_ack:
            self._write_frame(request, msg_type, data, final)
            return
        # Longer than one frame: consecutive frames of the same type, FINAL on the last.
        # Text frames end on a code point boundary (section 3: a chunk never splits one).
        text = msg_type in _TEXT_TYPES
        start = 0
        while True:
            end = min(start + capacity, len(data))
            if text and end < len(data):
                while end > start + 1 and data[end] & 0xC0 == 0x80:  # a continuation byte
                    end -= 1
            queue.append((request, msg_type, bytes(data[start:end]), final and end >= len(data)))
            start = end
            if start >= len(data):
                break
        self._flush_queue(request.slot)

    def _flush_queue(self, slot: int) -> None:
        queue = self._queued[slot]
        while queue and slot not in self._awaiting_ack:
            self._write_frame(*queue.popleft())

    def _write_frame(self, request: RingRequest, msg_type: int, data, final: bool) -> None:
        self._publish(request.slot, request.seq, request.req_id, msg_type, data, final)

    def _publish(self, slot: int, seq: int, req_id: int, msg_type: int, data, final: bool) -> None:
        """Section 9 steps 1-3: data and fields, then the frame_seq store, then the post."""
        base = self._slot_base[slot]
        offset = base + L.S_DATA + self.geometry.req_capacity
        n = len(data)
        self._mv[offset:offset + n] = data
        _FRAME_FIELDS.pack_into(self.objects.mm, base + L.S_FRAME_REQ_SEQ, seq, req_id, n,
                                msg_type, L.FRAME_FLAG_FINAL if final else 0)
        index = (base + L.S_FRAME_SEQ) >> 2
        self._u32[index] = (self._u32[index] + 1) & _U32  # publish, after data and fields
        if not final:
            self._awaiting_ack.add(slot)
        elif self._open_requests:
            self._open_requests.pop(slot, None)
        _wake(self._slot_sems[slot])

    def _drain_outbox(self) -> None:
        while self._outbox:
            request, msg_type, payload, final = self._outbox.popleft()
            # A reclaimed or cancelled slot may already serve someone else: drop, never misroute.
            if request.cancel_flag or self._served[request.slot] != request.seq:
                continue
            self._enqueue_frames(request, msg_type, payload, final)

    def _check_acks_and_cancels(self) -> None:
        if not self._awaiting_ack and not self._open_requests:
            return
        u32 = self._u32
        for slot in self._awaiting_ack | self._open_requests.keys():
            base = self._slot_base[slot]
            if u32[(base + L.S_CANCEL_SEQ) >> 2] == self._served[slot]:
                self._cancel(slot)
            elif slot in self._awaiting_ack and u32[(base + L.S_ACK_SEQ) >> 2] == \
                    u32[(base + L.S_FRAME_SEQ) >> 2]:
                self._awaiting_ack.discard(slot)
                self._flush_queue(slot)

    def _cancel(self, slot: int) -> None:
        request = self._open_requests.pop(slot, None)
        if request is None:  # a long synchronous reply still being sent frame by frame
            request = self._queued[slot][0][0] if self._queued[slot] else None
        self._queued[slot].clear()
        self._awaiting_ack.discard(slot)
        if request is None:
            return
        request.cancel_flag = True
        self._write_frame(request, MsgType.ERROR, encode_error(ErrorCode.CANCELLED,
                                                               "cancelled by the client"), True)

    def _reclaim_dead_clients(self) -> None:
        for slot in np.flatnonzero(self._owner).tolist():
            pid = int(self._owner[slot])
            # An owner word beyond pid_t (a hostile or torn write) names no process, and
            # os.kill would raise OverflowError and end the ring loop.
            if pid <= _PID_MAX:
                try:
                    os.kill(pid, 0)
                    continue
                except ProcessLookupError:
                    pass
                except PermissionError:  # alive, another user's
                    continue
            request = self._open_requests.pop(slot, None)
            if request is not None:
                request.cancel_flag = True
            self._queued[slot].clear()
            self._awaiting_ack.discard(slot)
            self._served[slot] = self._req_seq[slot]
            self._u32[(self._slot_base[slot] + L.S_OWNER) >> 2] = 0
            log.warning("reclaimed slot %d from dead client pid %d", slot, pid)

    # -- stop --------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.stop_grace_s
        self.objects.set_state(L.ServerState.STOPPING)

    def _finish_stop(self) -> None:
        self._drain_outbox()
        for slot, request in list(self._open_requests.items()):
            self._queued[slot].clear()
            self._awaiting_ack.discard(slot)
            request.cancel_flag = True  # a worker still generating for it can stop
            self._write_frame(request, MsgType.ERROR,
                              encode_error(ErrorCode.SHUTTING_DOWN, "server is stopping"), True)


def build(dispatcher, args):
    geometry = L.Geometry(args.slots, args.slot_request_bytes, args.slot_reply_bytes)
    return ShmTransport(dispatcher, args.name, geometry, spin_us=args.spin_us,
                        max_batch=args.max_batch, batch_wait_us=args.batch_wait_us,
                        group_access=args.group_access)
