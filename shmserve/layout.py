"""Shared-memory ring layout: every offset and constant of spec/PROTOCOL.md section 7.

This module and goclient/internal/ring/layout.go are the only places that know the byte
layout; both mirror the spec, and spec/vectors/ring.json keeps them honest.

Header (256 bytes, four 64-byte cache lines)::

    0               8       10      12      16      20      24      28      32
    +---------------+-------+-------+-------+-------+-------+-------+-------+
    | magic         |v_major|v_minor|hdr_sz |slots  |stride |req_cap|rsp_cap|  line 0:
    +---------------+-------+-------+-------+-------+-------+-------+-------+  static, written
    32              40              48      52      56              64         once by the
    +---------------+---------------+-------+-------+---------------+          server; magic
    | total_size    | generation    |pid    |flags  | reserved      |          last
    +---------------+---------------+-------+-------+---------------+
    64      68      72              80                              128
    +-------+-------+---------------+-------------------------------+  line 1: server,
    |state  |rsvd   | heartbeat_ns  | reserved                      |  run time
    +-------+-------+---------------+-------------------------------+
    128             136                                             192
    +---------------+-----------------------------------------------+  line 2: clients
    | doorbell      | reserved                                      |  (fetch-add)
    +---------------+-----------------------------------------------+
    192-255 reserved                                                   line 3

Slot (slot_stride bytes, 64-byte aligned)::

    0       4       8               16      20  21  24      28      32          64
    +-------+-------+---------------+-------+---+---+-------+-------+-----------+
    |owner  |req_seq| req_id        |req_len|typ|rsv|ack_seq|cancel |reserved   |  client line
    +-------+-------+---------------+-------+---+---+-------+-------+-----------+
    64      68      72              80      84  85  86                         128
    +-------+-------+---------------+-------+---+---+---------------------------+
    |frm_seq|frm_rsq| frame_req_id  |frm_len|typ|flg| reserved                  |  server line
    +-------+-------+---------------+-------+---+---+---------------------------+
    128                       128+req_capacity            128+req_cap+resp_cap
    +-------------------------+---------------------------+
    | request data            | reply data                |
    +-------------------------+---------------------------+
"""
from __future__ import annotations

import dataclasses
import enum
import os
import re
import struct
import typing

MAGIC = b"SHMSRING"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_SIZE = 256
CACHE_LINE = 64

# Header offsets.
H_MAGIC = 0
H_VERSION_MAJOR = 8
H_VERSION_MINOR = 10
H_HEADER_SIZE = 12
H_SLOT_COUNT = 16
H_SLOT_STRIDE = 20
H_REQ_CAPACITY = 24
H_RESP_CAPACITY = 28
H_TOTAL_SIZE = 32
H_GENERATION = 40
H_SERVER_PID = 48
H_FLAGS = 52
H_SERVER_STATE = 64
H_HEARTBEAT_NS = 72
H_DOORBELL = 128

HEADER_FLAG_GROUP_ACCESS = 1

# Slot offsets, client cache line.
S_OWNER = 0
S_REQ_SEQ = 4
S_REQ_ID = 8
S_REQ_LEN = 16
S_REQ_TYPE = 20
S_ACK_SEQ = 24
S_CANCEL_SEQ = 28
# Slot offsets, server cache line.
S_FRAME_SEQ = 64
S_FRAME_REQ_SEQ = 68
S_FRAME_REQ_ID = 72
S_FRAME_LEN = 80
S_FRAME_TYPE = 84
S_FRAME_FLAGS = 85
S_DATA = 128

FRAME_FLAG_FINAL = 1

MIN_SLOTS, MAX_SLOTS = 1, 1024
MIN_REQ_CAPACITY = 3072
MIN_RESP_CAPACITY = 64
HEARTBEAT_INTERVAL_S = 0.25

DEFAULT_SLOTS = 64
DEFAULT_REQ_CAPACITY = 256 * 1024
DEFAULT_RESP_CAPACITY = 64 * 1024


class ServerState(enum.IntEnum):
    STARTING = 1
    READY = 2
    STOPPING = 3
    STOPPED = 4


class LayoutError(ValueError):
    """A header or geometry that violates section 7; ``name`` is the vector error name."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


# No dots: "shmserve.NAME.lock" of ring NAME must never be the shared memory of a ring
# named "NAME.lock".
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"ring name {name!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return name


def shm_name(name: str) -> str:
    return f"/shmserve.{name}"


def request_sem_name(name: str) -> str:
    return f"/shmserve.{name}.req"


def slot_sem_name(name: str, slot: int) -> str:
    return f"/shmserve.{name}.s{slot}"


def lock_path(name: str, shm_dir: str = "/dev/shm") -> str:
    return f"{shm_dir}/shmserve.{name}.lock"


def semaphore_files(name: str, shm_dir: str = "/dev/shm") -> list[str]:
    """The files of ring NAME's semaphores that exist now: exactly this ring's names, never
    another ring's whose name merely starts the same."""
    prefix = f"sem.shmserve.{name}."
    own = re.compile(re.escape(prefix) + r"(req|s(0|[1-9][0-9]*))")
    return sorted(os.path.join(shm_dir, entry) for entry in os.listdir(shm_dir)
                  if entry.startswith(prefix) and own.fullmatch(entry))


def ring_files(name: str, shm_dir: str = "/dev/shm") -> list[str]:
    """Every file of ring NAME that exists now: shared memory, lock, semaphores."""
    fixed = [os.path.join(shm_dir, shm_name(name)[1:]), lock_path(name, shm_dir)]
    return sorted([path for path in fixed if os.path.lexists(path)] +
                  semaphore_files(name, shm_dir))


def align64(n: int) -> int:
    return (n + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


@dataclasses.dataclass(frozen=True)
class Geometry:
    slot_count: int
    req_capacity: int
    resp_capacity: int

    def __post_init__(self):
        if not MIN_SLOTS <= self.slot_count <= MAX_SLOTS:
            raise LayoutError("BAD_GEOMETRY", f"slot_count {self.slot_count} outside "
                              f"{MIN_SLOTS}..{MAX_SLOTS}")
        for field, low in (("req_capacity", MIN_REQ_CAPACITY), ("resp_capacity", MIN_RESP_CAPACITY)):
            value = getattr(self, field)
            if value < low or value % CACHE_LINE or value > 1 << 30:
                raise LayoutError("BAD_GEOMETRY", f"{field} {value} must be a multiple of 64 "
                                  f"in {low}..{1 << 30}")

    @property
    def slot_stride(self) -> int:
        return align64(S_DATA + self.req_capacity + self.resp_capacity)

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.slot_count * self.slot_stride

    def slot_offset(self, slot: int) -> int:
        return HEADER_SIZE + slot * self.slot_stride

    def request_data_offset(self, slot: int) -> int:
        return self.slot_offset(slot) + S_DATA

    def reply_data_offset(self, slot: int) -> int:
        return self.slot_offset(slot) + S_DATA + self.req_capacity


def parse_header(buf, mapping_size: int) -> tuple[Geometry, int]:
    """Validate a header as a client does at attach; returns (geometry, generation)."""
    mv = memoryview(buf)
    if len(mv) < HEADER_SIZE:
        raise LayoutError("BAD_GEOMETRY", f"mapping of {len(mv)} bytes is smaller than the header")
    if bytes(mv[H_MAGIC:H_MAGIC + 8]) != MAGIC:
        raise LayoutError("BAD_MAGIC", "not a shmserve ring (magic missing)")
    major = int.from_bytes(mv[H_VERSION_MAJOR:H_VERSION_MAJOR + 2], "little")
    if major != VERSION_MAJOR:
        raise LayoutError("BAD_VERSION", f"ring version {major}, this reader speaks {VERSION_MAJOR}")

    def u32(off):
        return int.from_bytes(mv[off:off + 4], "little")

    if u32(H_HEADER_SIZE) != HEADER_SIZE:
        raise LayoutError("BAD_GEOMETRY", f"header_size {u32(H_HEADER_SIZE)} != {HEADER_SIZE}")
    geometry = Geometry(u32(H_SLOT_COUNT), u32(H_REQ_CAPACITY), u32(H_RESP_CAPACITY))
    if u32(H_SLOT_STRIDE) != geometry.slot_stride:
        raise LayoutError("BAD_GEOMETRY", f"slot_stride {u32(H_SLOT_STRIDE)} != "
                          f"{geometry.slot_stride} implied by the capacities")
    total = int.from_bytes(mv[H_TOTAL_SIZE:H_TOTAL_SIZE + 8], "little")
    if total != geometry.total_size or total != mapping_size:
        raise LayoutError("BAD_GEOMETRY", f"total_size {total}, geometry implies "
                          f"{geometry.total_size}, mapping is {mapping_size}")
    generation = int.from_bytes(mv[H_GENERATION:H_GENERATION + 8], "little")
    if generation == 0:
        raise LayoutError("BAD_GEOMETRY", "generation is 0")
    return geometry, generation


# Frame types a server may publish (spec section 3: every reply type).
REPLY_TYPES = frozenset({0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, 0x08, 0x09, 0xFF})
_STREAM_CHUNK, _STREAM_END = 0x06, 0x07

# The slot's two cache lines as records: the client line from S_OWNER, the server line from
# S_FRAME_SEQ. Read them once with these, then validate the copy (never re-read the slot).
REQUEST_LINE = struct.Struct("<IIQIB")  # owner, req_seq, req_id, req_len, req_type
FRAME_LINE = struct.Struct("<IIQIBB")  # frame_seq, frame_req_seq, frame_req_id, frame_len,
                                       # frame_type, frame_flags
_REQUEST_FIELDS = struct.Struct("<QIB")  # req_id, req_len, req_type


class RequestRecord(typing.NamedTuple):
    owner: int
    seq: int
    req_id: int
    length: int
    msg_type: int


class Frame(typing.NamedTuple):
    seq: int
    req_seq: int
    req_id: int
    length: int
    msg_type: int
    flags: int

    @property
    def final(self) -> bool:
        return bool(self.flags & FRAME_FLAG_FINAL)


def read_request(buf, slot_offset: int) -> RequestRecord:
    return RequestRecord(*REQUEST_LINE.unpack_from(buf, slot_offset + S_OWNER))


def read_frame(buf, slot_offset: int) -> Frame:
    return Frame(*FRAME_LINE.unpack_from(buf, slot_offset + S_FRAME_SEQ))


def write_request_fields(buf, slot_offset: int, req_id: int, length: int, msg_type: int) -> None:
    """req_id, req_len, req_type: what a client writes before it publishes ``req_seq``."""
    _REQUEST_FIELDS.pack_into(buf, slot_offset + S_REQ_ID, req_id, length, msg_type)


def write_header(buf, geometry: Geometry, generation: int, server_pid: int,
                 flags: int) -> None:
    """The static cache line of a new ring, all but ``magic`` (Create writes it last)."""
    struct.pack_into("<HHIIIII", buf, H_VERSION_MAJOR, VERSION_MAJOR, VERSION_MINOR,
                     HEADER_SIZE, geometry.slot_count, geometry.slot_stride,
                     geometry.req_capacity, geometry.resp_capacity)
    struct.pack_into("<QQII", buf, H_TOTAL_SIZE, geometry.total_size, generation, server_pid,
                     flags)


class FrameError(Exception):
    """A reply frame a client must not accept; ``name`` is CORRUPT_RECORD or MISROUTED."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name


def check_frame(frame: Frame, req_seq: int, req_id: int, resp_capacity: int) -> None:
    """Section 9: what a client checks before it reads a frame's data, in the spec's order."""
    if (frame.req_seq, frame.req_id) != (req_seq, req_id):
        raise FrameError("MISROUTED", f"frame answers request ({frame.req_seq}, "
                         f"{frame.req_id:#x}), not ({req_seq}, {req_id:#x})")
    if frame.length > resp_capacity:
        raise FrameError("CORRUPT_RECORD", f"frame_len {frame.length} exceeds resp_capacity "
                         f"{resp_capacity}")
    if frame.msg_type not in REPLY_TYPES:
        raise FrameError("CORRUPT_RECORD", f"frame type 0x{frame.msg_type:02x} is not a reply "
                         f"type")
    if frame.msg_type == _STREAM_CHUNK and frame.final:
        raise FrameError("CORRUPT_RECORD", "a STREAM_CHUNK frame is never FINAL: STREAM_END "
                         "ends a stream")
    if frame.msg_type == _STREAM_END and not frame.final:
        raise FrameError("CORRUPT_RECORD", "a STREAM_END frame is always FINAL")


def check_request_record(owner: int, req_len: int, req_capacity: int) -> str | None:
    """Section 8: the record-level checks the server makes; a reason, or None when sound."""
    if req_len > req_capacity:
        return f"req_len {req_len} exceeds req_capacity {req_capacity}"
    if not owner:
        return "request in an unowned slot"
    return None


def default_socket_dir() -> str:
    """The Unix socket's directory unless --socket names one: private to this user, and the
    same for a server and its clients whatever their environment (XDG_RUNTIME_DIR is unset
    under sudo and in most services, so a client in a login shell would look elsewhere)."""
    return f"/tmp/shmserve-{os.geteuid()}"


def default_socket_path(name: str) -> str:
    return f"{default_socket_dir()}/{name}.sock"
