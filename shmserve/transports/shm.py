"""Shared-memory ring transport: the server side of spec/PROTOCOL.md sections 6-11.

One thread owns the ring: it is the only writer of every server field, so no server-side
locks are needed. The per-message work (waiting for the doorbell with the GIL released,
scanning the slots, answering ECHO, publishing frames) is the native module
``shmserve._ring``; this module keeps dispatch, flow control, cancellation, reclaim and
lifecycle. Models that answer from their own threads (Gemma) hand frames to the ring thread
through ``_outbox`` and wake it with ``Ring.notify``.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import glob
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
from threading import get_ident

import posix_ipc

from .. import _ring
from .. import layout as L
from .. import trust
from ..dispatch import Request
from ..protocol import ErrorCode, MsgType, encode_error

log = logging.getLogger("shmserve.shm")

# The native module has its own copy of the offsets it uses; refuse to serve with one built
# from another layout than this package's.
if any(getattr(L, key) != value for key, value in _ring.LAYOUT.items()):
    raise ImportError("shmserve/_ring.c and shmserve/layout.py disagree on the ring layout")

LOCK_RETRY_S = 0.2
# Payload types that are already flat bytes; anything else (numpy arrays) is cast once.
_FLAT_BUFFERS = (bytes, bytearray, memoryview)
_TEXT_TYPES = frozenset({MsgType.CLASSIFY, MsgType.PROMPT, MsgType.STREAM_CHUNK,
                         MsgType.METADATA})
_PID_MAX = 0x7FFFFFFF  # pid_t is a signed 32-bit integer
_ERROR_CODE_BYTES = 2  # the u16 code before an ERROR's UTF-8 message


def _utf8_cut(data, end: int, start: int) -> int:
    """The largest cut <= ``end`` (and > ``start``, if there is one) that does not split a
    UTF-8 code point: back over continuation bytes."""
    while end > start and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


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


class RingDoesNotFitError(RuntimeError):
    """The shm filesystem has no room for the ring: fail at start, not with SIGBUS later."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _does_not_fit(name: str, shm_dir: str, need: int, free: int) -> RingDoesNotFitError:
    # Whole MiB with room for the semaphores and a neighbour or two.
    suggest = -(-need // 2**20) + 8
    return RingDoesNotFitError(
        f"ring {name!r} needs {_mib(need)} in {shm_dir} but only {_mib(free)} is free; give the "
        f"shm filesystem at least {suggest} MiB (docker run --shm-size={suggest}m; Kubernetes: "
        f"an emptyDir with medium: Memory and sizeLimit: {suggest}Mi mounted at {shm_dir}) or "
        "make the ring smaller (--slots, --slot-request-bytes, --slot-reply-bytes)")


class RingObjects:
    """Creates, owns and removes the named objects of one ring (section 11)."""

    def __init__(self, name: str, geometry: L.Geometry, group_access: bool = False,
                 shm_dir: str = "/dev/shm"):
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
            self._release_lock(unlink=True)  # ours while we hold it: stop leaves none either
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
            except PermissionError:
                # Not writable by us: someone else's file, or the error is ours to report.
                try:
                    trust.check_own(os.lstat(path), path, "regular file", stat.S_ISREG)
                except FileNotFoundError:
                    continue
                except trust.UntrustedFileError as exc:
                    self._remove_foreign(path, str(exc))
                    continue
                raise
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
        self.stale_removed = removed
        if removed:
            log.warning("removed %d stale object(s) of a dead server named %r", removed,
                        self.name)

    def _create(self) -> None:
        g = self.geometry
        fs = os.statvfs(self.shm_dir)
        if fs.f_bavail * fs.f_frsize < g.total_size:
            raise _does_not_fit(self.name, self.shm_dir, g.total_size, fs.f_bavail * fs.f_frsize)
        shm = posix_ipc.SharedMemory(L.shm_name(self.name), posix_ipc.O_CREX, mode=self.mode,
                                     size=g.total_size)
        try:
            # ftruncate only reserves a size; a page the tmpfs cannot supply is a SIGBUS at
            # first touch, under load. Allocate every page now, while failing is cheap.
            try:
                os.posix_fallocate(shm.fd, 0, g.total_size)
            except OSError as exc:
                shm.close_fd()
                shm.unlink()
                if exc.errno != errno.ENOSPC:
                    raise
                fs = os.statvfs(self.shm_dir)
                raise _does_not_fit(self.name, self.shm_dir, g.total_size,
                                    fs.f_bavail * fs.f_frsize) from None
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
        L.write_header(self.mm, g, self.generation, os.getpid(),
                       L.HEADER_FLAG_GROUP_ACCESS if self.mode == 0o660 else 0)
        self.set_state(L.ServerState.STARTING)
        self.heartbeat()
        _ring.fence()  # Python stores have no order of their own (section 10)
        self.mm[L.H_MAGIC:L.H_MAGIC + 8] = L.MAGIC  # last: attachers never see a half header

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
        _ring.fence()  # a release store: what came before (the header, replies) is seen first
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
        super().__init__(msg_type, body, transport.recorder)
        self.transport = transport
        self.slot = slot
        self.seq = seq
        self.req_id = req_id
        self.cancel_flag = False

    def cancelled(self) -> bool:
        return self.cancel_flag

    def _send(self, msg_type, payload, final):
        self.transport.send(self, msg_type, payload, final)


class _Slot:
    """What the ring thread holds for one slot beyond what the native ring tracks (the
    req_seq served): the request whose reply is unfinished and its frames waiting for acks.
    ``reset`` is the one way back to idle, whatever ended the request."""

    __slots__ = ("index", "ring", "request", "frames", "awaiting_ack", "_flags")

    def __init__(self, index: int, ring: _ring.Ring):
        self.index = index
        self.ring = ring
        self.request: RingRequest | None = None
        self.frames: collections.deque = collections.deque()  # (msg_type, bytes, final)
        self.awaiting_ack = False
        self._flags = 0

    def sync(self) -> None:
        """Tells the native ring which events this slot needs checked; also keeps it from
        answering an echo here in place while this state would still have to be dropped."""
        flags = ((_ring.WATCH_OPEN if self.request is not None else 0) |
                 (_ring.WATCH_ACK if self.awaiting_ack else 0))
        if flags != self._flags:
            self._flags = flags
            self.ring.watch(self.index, flags)

    def reset(self, code: ErrorCode = ErrorCode.CANCELLED) -> RingRequest | None:
        """Drops the slot's state; returns the request it ended, marked cancelled so a worker
        still producing for it can stop and its late frames are dropped."""
        request, self.request = self.request, None
        if request is not None:
            request.cancel_flag = True
            request.counted(code)
        self.frames.clear()
        self.awaiting_ack = False
        self.sync()
        return request


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
        self.max_batch = max(1, max_batch)
        self.batch_wait_ns = int(batch_wait_us * 1000)
        self.stop_grace_s = stop_grace_s
        mm = self.objects.mm
        self._ring = _ring.Ring(mm, g.slot_count, g.req_capacity, g.resp_capacity,
                                L.request_sem_name(ring_name),
                                [L.slot_sem_name(ring_name, i) for i in range(g.slot_count)])
        self._mv = memoryview(mm)
        self._slots = [_Slot(i, self._ring) for i in range(g.slot_count)]
        self._request_data = [g.request_data_offset(i) for i in range(g.slot_count)]
        self._outbox: collections.deque = collections.deque()  # frames from other threads
        self._thread_id = None
        self._stopping = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shm:{ring_name}", daemon=True)
        self.recorder = dispatcher.recorder(self.name)
        self.slots_in_use = 0
        self.slots_reclaimed = 0
        if dispatcher.metrics is not None:
            dispatcher.metrics.rings.append(self)
            dispatcher.metrics.stale_objects_removed += self.objects.stale_removed

    @property
    def inline_echoes(self) -> int:
        return self._ring.inline_echoes

    @property
    def flooded_waits(self) -> int:
        return self._ring.flooded_waits

    # -- lifecycle ---------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"address": f"shm://{self.objects.name}", "name": self.objects.name,
                "generation": f"{self.objects.generation:016x}",
                "slots": self.geometry.slot_count}

    def start(self) -> None:
        self._thread.start()

    def set_ready(self) -> None:
        self.objects.set_state(L.ServerState.READY)

    def stop(self) -> None:
        self._stop.set()
        self._ring.notify()
        self._thread.join()
        self.objects.set_state(L.ServerState.STOPPED)
        self.close()

    def close(self) -> None:
        """Releases this transport's hold on the mapping, then the ring's objects."""
        self._ring.close()
        self._mv.release()
        self.objects.close()

    # -- loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        next_housekeeping = 0.0
        block_ns = int(L.HEARTBEAT_INTERVAL_S * 1e9)
        try:
            while True:
                if self._stop.is_set() and not self._stopping:
                    self._begin_stop()
                if self._stopping and (not self._busy() or
                                       time.monotonic() > self._stop_deadline):
                    self._finish_stop()
                    return
                self.serve_once(self.spin_ns, block_ns)
                now = time.monotonic()
                if now >= next_housekeeping:
                    self.objects.heartbeat()
                    self.reclaim_dead_clients()
                    next_housekeeping = now + L.HEARTBEAT_INTERVAL_S
        except Exception:
            log.exception("ring loop crashed")
            raise

    def serve_once(self, spin_ns: int, block_ns: int) -> None:
        """One wake-up: wait (at most spin_ns + block_ns) for the doorbell, then everything it
        brought. A wait that expires still scans, so a lost or forged doorbell update delays a
        request by one interval at most, never strands it."""
        requests, events = self._ring.poll(spin_ns, block_ns, self.max_batch)
        if self._outbox:
            self._drain_outbox()
        if events:
            self._handle_events(events)
        if requests:
            self._serve(self._requests(requests))

    def _busy(self) -> bool:
        return any(slot.request is not None for slot in self._slots)

    def _requests(self, ready) -> list:
        requests = []
        capacity = self.geometry.req_capacity
        for slot, seq, req_id, msg_type, length, owner in ready:
            state = self._slots[slot]
            if state.request is not None or state.frames or state.awaiting_ack:
                state.reset()  # a new request supersedes what the client never finished
            problem = L.check_request_record(owner, length, capacity)
            if problem:
                RingRequest(self, slot, seq, req_id, msg_type, b"").fail(
                    ErrorCode.CORRUPT_RECORD, problem)
                continue
            offset = self._request_data[slot]
            requests.append(RingRequest(self, slot, seq, req_id, msg_type,
                                        self._mv[offset:offset + length]))
        return requests

    def _serve(self, requests: list) -> None:
        if self.batch_wait_ns and len(requests) < self.max_batch:
            self._gather(requests)
        if self._stopping:
            for request in requests:
                request.fail(ErrorCode.SHUTTING_DOWN, "server is stopping")
            return
        self.dispatcher.dispatch(requests, may_wait=False)
        # Requests a model answers from its own thread, or that another transport's thread
        # runs in its model call, stay open until their final frame.
        for request in requests:
            if not request.done:
                slot = self._slots[request.slot]
                slot.request = request
                slot.sync()

    def _gather(self, requests: list) -> None:
        """Dynamic batching: give other clients up to batch_wait to join this model call."""
        deadline = time.monotonic_ns() + self.batch_wait_ns
        while len(requests) < self.max_batch:
            left = deadline - time.monotonic_ns()
            if left <= 0:
                return
            more, events = self._ring.poll(left, 0, self.max_batch - len(requests))
            if events:
                self._handle_events(events)
            requests += self._requests(more)

    # -- replies -----------------------------------------------------------------------------
    def send(self, request: RingRequest, msg_type: int, payload, final: bool) -> None:
        if get_ident() != self._thread_id:
            self._outbox.append((request, msg_type, payload, final))
            self._ring.notify()
            return
        self._enqueue_frames(request, msg_type, payload, final)

    def _enqueue_frames(self, request: RingRequest, msg_type: int, payload, final: bool) -> None:
        data = payload if type(payload) in _FLAT_BUFFERS else memoryview(payload).cast("B")
        capacity = self.geometry.resp_capacity
        slot = self._slots[request.slot]
        if msg_type == MsgType.ERROR and len(data) > capacity:
            # An ERROR is one FINAL frame (section 4): its message is cut to fit.
            data = data[:_utf8_cut(data, capacity, start=_ERROR_CODE_BYTES)]
        if len(data) <= capacity and not slot.frames and not slot.awaiting_ack:
            self._write_frame(slot, request, msg_type, data, final)
            return
        # Longer than one frame: consecutive frames of the same type, FINAL on the last.
        # Text frames end on a code point boundary (section 3: a chunk never splits one).
        text = msg_type in _TEXT_TYPES
        start = 0
        while True:
            end = min(start + capacity, len(data))
            if text and end < len(data):
                end = _utf8_cut(data, end, start + 1)
            slot.frames.append((msg_type, bytes(data[start:end]), final and end >= len(data)))
            start = end
            if start >= len(data):
                break
        slot.request = request  # its reply is unfinished until the queue has gone out
        self._flush(slot)

    def _flush(self, slot: _Slot) -> None:
        while slot.frames and not slot.awaiting_ack:
            self._write_frame(slot, slot.request, *slot.frames.popleft())

    def _write_frame(self, slot: _Slot, request: RingRequest, msg_type: int, data,
                     final: bool) -> None:
        self._ring.publish(slot.index, request.seq, request.req_id, msg_type, data, final)
        if final:
            if slot.request is not None:
                slot.request = None
                slot.sync()
        else:
            slot.request = request
            slot.awaiting_ack = True
            slot.sync()

    def _drain_outbox(self) -> None:
        while self._outbox:
            request, msg_type, payload, final = self._outbox.popleft()
            # A reclaimed, cancelled or superseded request's slot may already serve someone
            # else: drop, never misroute.
            if request.cancel_flag or self._ring.served(request.slot) != request.seq:
                continue
            self._enqueue_frames(request, msg_type, payload, final)

    def _handle_events(self, events) -> None:
        for index, kind in events:
            slot = self._slots[index]
            if kind == _ring.EVENT_CANCEL:
                self._cancel(slot)
            else:
                slot.awaiting_ack = False
                slot.sync()
                self._flush(slot)

    def _cancel(self, slot: _Slot) -> None:
        request = slot.reset()
        if request is not None:
            self._write_frame(slot, request, MsgType.ERROR,
                              encode_error(ErrorCode.CANCELLED, "cancelled by the client"), True)

    def reclaim_dead_clients(self) -> None:
        owners = self._ring.owners()
        self.slots_in_use = len(owners)
        for index, pid in owners:
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
            self._slots[index].reset()
            self._ring.reclaim(index)
            self.slots_reclaimed += 1
            log.warning("reclaimed slot %d from dead client pid %d", index, pid)

    # -- stop --------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping = True
        self._ring.echo_inline = False  # every new request is answered SHUTTING_DOWN
        self._stop_deadline = time.monotonic() + self.stop_grace_s
        self.objects.set_state(L.ServerState.STOPPING)

    def _finish_stop(self) -> None:
        self._drain_outbox()
        for slot in self._slots:
            request = slot.reset(ErrorCode.SHUTTING_DOWN)
            if request is not None:
                self._write_frame(slot, request, MsgType.ERROR,
                                  encode_error(ErrorCode.SHUTTING_DOWN, "server is stopping"),
                                  True)


def build(dispatcher, args):
    geometry = L.Geometry(args.slots, args.slot_request_bytes, args.slot_reply_bytes)
    return ShmTransport(dispatcher, args.name, geometry, spin_us=args.spin_us,
                        max_batch=args.max_batch, batch_wait_us=args.batch_wait_us,
                        group_access=args.group_access)
