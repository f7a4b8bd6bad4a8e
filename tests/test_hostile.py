"""A hostile or buggy peer must not take the server down: random writes into a live ring while
real clients use it, and malformed, oversized, slow or never-read traffic on the sockets."""
from __future__ import annotations

import concurrent.futures
import mmap
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest

from conftest import REPO, parse_replies, ring_objects
from shmserve import layout as L
from shmserve import tensors
from shmserve.client import PacketClient, RingClient
from shmserve.protocol import (ErrorCode, FramingError, MsgType, ProtocolError, decode_error,
                               decode_packet, decode_prompt,
                               encode_packet)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))




class RawRing:
    """The test's own mapping, for writing records no well-behaved client would."""

    def __init__(self, name: str):
        shm = posix_ipc.SharedMemory(L.shm_name(name))
        try:
            self.mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
        finally:
            shm.close_fd()
        self.geometry, _ = L.parse_header(self.mm, len(self.mm))
        self.request_sem = posix_ipc.Semaphore(L.request_sem_name(name))

    def u32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.mm, offset)[0]

    def publish(self, slot: int, owner: int, req_id: int, req_len: int, req_type: int,
                data: bytes = b"", ring: bool = True) -> tuple[int, int]:
        """Writes a request the way section 8 orders it, without step 4 (the doorbell and
        the post) when not ``ring``; returns (req_seq, old frame_seq)."""
        base = self.geometry.slot_offset(slot)
        frame_seq = self.u32(base + L.S_FRAME_SEQ)
        seq = (self.u32(base + L.S_REQ_SEQ) + 1) & 0xFFFFFFFF
        at = self.geometry.request_data_offset(slot)
        self.mm[at:at + len(data)] = data
        struct.pack_into("<I", self.mm, base + L.S_OWNER, owner)
        struct.pack_into("<QIB", self.mm, base + L.S_REQ_ID, req_id, req_len, req_type)
        struct.pack_into("<I", self.mm, base + L.S_REQ_SEQ, seq)
        if ring:
            bell = struct.unpack_from("<Q", self.mm, L.H_DOORBELL)[0]
            struct.pack_into("<Q", self.mm, L.H_DOORBELL, (bell + 1) & (2**64 - 1))
            self.request_sem.release()
        return seq, frame_seq

    def wait_frame(self, slot: int, old_frame_seq: int, timeout: float = 3.0):
        base = self.geometry.slot_offset(slot)
        deadline = time.monotonic() + timeout
        while self.u32(base + L.S_FRAME_SEQ) == old_frame_seq:
            assert time.monotonic() < deadline, f"no frame in slot {slot} within {timeout} s"
            time.sleep(0.001)
        _, req_seq, req_id, length, ftype, flags = struct.unpack_from("<IIQIBB", self.mm,
                                                                       base + L.S_FRAME_SEQ)
        at = self.geometry.reply_data_offset(slot)
        return req_seq, req_id, ftype, flags, bytes(self.mm[at:at + min(
            length, self.geometry.resp_capacity)])

    def close(self):
        self.request_sem.close()
        self.mm.close()


# -- the ring ---------------------------------------------------------------------------------

HOSTILE_WRITER = r"""
import mmap, os, random, struct, sys, time
import posix_ipc
from shmserve import layout as L

name, seed, seconds, first, last = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
shm = posix_ipc.SharedMemory(L.shm_name(name))
mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
g, _ = L.parse_header(mm, len(mm))
req_sem = posix_ipc.Semaphore(L.request_sem_name(name))
slot_sems = [posix_ipc.Semaphore(L.slot_sem_name(name, i)) for i in range(g.slot_count)]
dead_pid = int(open("/proc/sys/kernel/pid_max").read()) + 1
owners = [0, os.getpid(), 1, dead_pid, 0x80000000, 0xFFFFFFFF]
u32 = lambda off: struct.unpack_from("<I", mm, off)[0]
actions = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    slot = rng.randint(first, last)
    base = g.slot_offset(slot)
    r = rng.random()
    if r < 0.35:       # a plausible record with hostile fields, published and rung
        owner = rng.choice(owners + [rng.getrandbits(32)])
        req_len = rng.choice([rng.randint(0, 9000), g.req_capacity, g.req_capacity + 1,
                              rng.getrandbits(32), 3072, 6144])
        at = g.request_data_offset(slot)
        n = rng.randint(0, 9000)
        mm[at:at + n] = rng.randbytes(n)
        struct.pack_into("<IIQIB", mm, base, owner, u32(base + 4), rng.getrandbits(64),
                         req_len, rng.choice([rng.getrandbits(8), rng.randint(0, 7)]))
        struct.pack_into("<I", mm, base + L.S_REQ_SEQ,
                         rng.choice([u32(base + 4) + 1, rng.getrandbits(32)]) & 0xFFFFFFFF)
    elif r < 0.55:     # random bytes anywhere in a hostile slot, server's fields included
        off = base + rng.randrange(g.slot_stride)
        n = min(rng.randint(1, 64), base + g.slot_stride - off)
        mm[off:off + n] = rng.randbytes(n)
    elif r < 0.65:     # acks and cancels, some of them matching what the server waits for
        field = rng.choice([L.S_ACK_SEQ, L.S_CANCEL_SEQ])
        value = rng.choice([u32(base + L.S_FRAME_SEQ), u32(base + L.S_REQ_SEQ),
                            rng.getrandbits(32)])
        struct.pack_into("<I", mm, base + field, value)
    elif r < 0.75:     # the header: geometry, state, heartbeat, reserved
        off = rng.randrange(L.HEADER_SIZE)
        n = min(rng.randint(1, 16), L.HEADER_SIZE - off)
        mm[off:off + n] = rng.randbytes(n)
    elif r < 0.85:
        struct.pack_into("<Q", mm, L.H_DOORBELL, rng.getrandbits(64))
    elif r < 0.95:     # stray wake-ups, for the server and for every slot's client
        (req_sem if rng.random() < 0.5 else rng.choice(slot_sems)).release()
    if r < 0.45 or r >= 0.95:
        struct.pack_into("<Q", mm, L.H_DOORBELL,
                         (struct.unpack_from("<Q", mm, L.H_DOORBELL)[0] + 1) % 2**64)
        if req_sem.value == 0:
            req_sem.release()
    actions += 1
    if not actions % 64:
        time.sleep(0.0002)  # leave the two cores to the server and clients now and then
print(actions, flush=True)
"""


def test_random_writes_into_the_ring_never_stop_real_clients(start_server):
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "16",
                          "--slot-reply-bytes", "4096")
    raw = RawRing(server.name)
    static_header = bytes(raw.mm[:64])
    client = RingClient(server.name, slots=range(0, 8))
    client.echo(b"warm")
    rss_before, fds_before = rss_kib(server.proc.pid), fd_count(server.proc.pid)
    results = {"ok": 0, "bad": []}
    stop = threading.Event()

    def echo_loop(worker: int):
        rng = random.Random(worker)
        while not stop.is_set():
            payload = rng.randbytes(rng.choice([0, 1, 100, 3072, 4096, 4097, 20000]))
            try:
                reply = client.echo(payload, timeout=5)
            except Exception as exc:  # the assertion below names it
                results["bad"].append(repr(exc))
                continue
            if reply == payload:
                results["ok"] += 1
            else:
                results["bad"].append(f"wrong reply for {len(payload)} bytes")

    hostile = subprocess.Popen([sys.executable, "-c", HOSTILE_WRITER, server.name, "1234", "4",
                                "8", "15"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    workers = [threading.Thread(target=echo_loop, args=(i,), daemon=True) for i in range(4)]
    try:
        for w in workers:
            w.start()
        actions = int(hostile.communicate(timeout=30)[0])
    finally:
        stop.set()
        if hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    for w in workers:
        w.join(10)
    assert actions > 1000, "the hostile writer barely ran"
    assert results["bad"] == [], results["bad"][:5]
    assert results["ok"] > 100, "clients were starved during the attack"
    assert server.proc.poll() is None, "server died"
    assert "Traceback" not in server.stderr and "crashed" not in server.stderr, server.stderr
    # 64 MiB is far above what serving needs, far below what a leak per request would reach.
    assert rss_kib(server.proc.pid) - rss_before < 64 * 1024
    assert fd_count(server.proc.pid) == fds_before
    # Geometry lives in the server's memory, not in the header the attacker rewrote; put the
    # header back and a new client can attach and use every slot, the attacked ones included.
    raw.mm[:64] = static_header
    fresh = RingClient(server.name)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        payloads = [bytes([i]) * (i * 700) for i in range(64)]
        assert list(pool.map(fresh.echo, payloads)) == payloads
    fresh.close()
    client.close()
    raw.close()


def test_the_python_client_publishes_sequence_words_in_one_store():
    """struct.pack_into writes a little-endian word byte by byte: publishing req_seq 0x100 over
    0xFF lets a server scanning at that moment read 0 and answer (0, req_id), which the client
    then refuses as MISROUTED. That was the rare hostile-test failure; the client's word stores
    must be single 4-byte stores, which a reader in another process never sees half done."""
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    client = RingClient.__new__(RingClient)  # only the word accessors, no ring needed
    client.mm, client._words32 = mm, memoryview(mm).cast("I")
    client._put_u32(4, 0xFF)
    writer = os.fork()
    if writer == 0:
        try:
            for _ in range(200_000):
                client._put_u32(4, 0xFF)
                client._put_u32(4, 0x100)
        finally:
            os._exit(0)
    words, torn, reads = memoryview(mm).cast("I"), set(), 0
    try:
        while os.waitpid(writer, os.WNOHANG) == (0, 0):
            for _ in range(1000):
                value = words[1]
                if value not in (0xFF, 0x100):
                    torn.add(value)
                reads += 1
    finally:
        words.release()
        client._words32.release()
        mm.close()
    assert reads > 10_000, "the reader never overlapped the writer"
    assert not torn, f"the reader saw words never written: {sorted(torn)[:5]}"


@pytest.mark.parametrize("record, code", [
    ({"owner": "self", "req_len": "capacity+1", "req_type": 0}, ErrorCode.CORRUPT_RECORD),
    ({"owner": 0, "req_len": 5, "req_type": 0}, ErrorCode.CORRUPT_RECORD),
    ({"owner": "self", "req_len": 0xFFFFFFFF, "req_type": 0}, ErrorCode.CORRUPT_RECORD),
    ({"owner": "self", "req_len": 5, "req_type": 0x42}, ErrorCode.UNKNOWN_TYPE),
    ({"owner": "self", "req_len": 3071, "req_type": MsgType.CLASSIFY}, ErrorCode.BAD_LENGTH),
], ids=["len-over-capacity", "unowned", "len-u32-max", "unknown-type", "short-image"])
def test_bad_records_get_a_typed_error_for_that_request(start_server, record, code):
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "4")
    raw = RawRing(server.name)
    owner = os.getpid() if record["owner"] == "self" else record["owner"]
    req_len = raw.geometry.req_capacity + 1 if record["req_len"] == "capacity+1" \
        else record["req_len"]
    seq, old = raw.publish(3, owner, 0xABCDEF0123, req_len, record["req_type"], b"hello")
    req_seq, req_id, ftype, flags, data = raw.wait_frame(3, old)
    assert (req_seq, req_id, ftype, flags) == (seq, 0xABCDEF0123, MsgType.ERROR,
                                               L.FRAME_FLAG_FINAL)
    assert decode_error(data)[0] == code
    client = RingClient(server.name, slots=range(0, 3))
    assert client.echo(b"still serving") == b"still serving"
    client.close()
    raw.close()


def test_a_request_the_doorbell_did_not_announce_is_still_served(start_server):
    """The server stops a scan once it has found as many requests as the doorbell moved: a
    request published without ringing (its client died before step 4), found in place of
    one that rang, or past where the scan stopped, waits for the next full scan (section 8,
    lost wake-ups), and none is lost."""
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "8")
    raw = RawRing(server.name)
    pid = os.getpid()
    try:
        # The silent slot after the rung one from where the scan starts, then before it.
        for silent, rung in ((6, 1), (0, 5), (3, 7)):
            waits = [(silent, *raw.publish(silent, pid, 100 + silent, 5, MsgType.ECHO,
                                           b"quiet", ring=False)),
                     (rung, *raw.publish(rung, pid, 200 + rung, 5, MsgType.ECHO, b"rings"))]
            for slot, seq, old in waits:
                req_seq, req_id, ftype, _, data = raw.wait_frame(slot, old, timeout=3)
                assert (req_seq, ftype) == (seq, MsgType.ECHO)
                assert data == (b"quiet" if slot == silent else b"rings")
    finally:
        raw.close()


def test_owner_word_that_is_no_pid_is_reclaimed_without_killing_the_loop(start_server):
    # 0xFFFFFFFF does not fit a pid_t: os.kill raised OverflowError and ended the ring thread
    # while the process (and its socket transports) lived on.
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "4")
    raw = RawRing(server.name)
    # No reply is owed: whether the server answers before its dead-client check swallows the
    # request depends on timing (section 9, dead clients).
    raw.publish(3, 0xFFFFFFFF, 7, 3, MsgType.ECHO, b"abc")
    owner_at = raw.geometry.slot_offset(3) + L.S_OWNER
    deadline = time.monotonic() + 3
    while raw.u32(owner_at) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert raw.u32(owner_at) == 0, "slot of an impossible pid was not reclaimed"
    client = RingClient(server.name, slots=range(0, 3))
    assert client.echo(b"alive", timeout=3) == b"alive"
    client.close()
    raw.close()
    assert "crashed" not in server.stderr, server.stderr


def force_semaphore_to_max(ring: str, suffix: str) -> None:
    """Semaphores are files beside the ring with the same permissions: a writer that can
    scribble on the ring can also set a count to SEM_VALUE_MAX (glibc keeps it in the low 32
    bits of the first word)."""
    fd = os.open(f"/dev/shm/sem.shmserve.{ring}.{suffix}", os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size) as sem_file:
            struct.pack_into("<I", sem_file, 0, 0x7FFFFFFF)
    finally:
        os.close(fd)


def test_a_slot_semaphore_forced_to_its_maximum_costs_only_that_wake_up(start_server):
    """At SEM_VALUE_MAX sem_post fails with EOVERFLOW, which ended the ring loop at the next
    frame for that slot, and made a clean stop skip the unlinks."""
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "4")
    raw = RawRing(server.name)
    force_semaphore_to_max(server.name, "s3")
    _, old = raw.publish(3, os.getpid(), 9, 2, MsgType.ECHO, b"hi")
    assert raw.wait_frame(3, old)[2:] == (MsgType.ECHO, L.FRAME_FLAG_FINAL, b"hi")
    client = RingClient(server.name, slots=range(0, 3))
    assert client.echo(b"still serving", timeout=3) == b"still serving"
    client.close()
    raw.close()
    assert server.stop() == 0
    assert ring_objects(server.name) == [], "stop left objects behind"
    assert "crashed" not in server.stderr, server.stderr


def test_a_request_semaphore_forced_to_its_maximum_keeps_the_heartbeat_and_reclaim_going(
        start_server):
    """With the request semaphore at SEM_VALUE_MAX every timed wait returns a token at once,
    so the idle loop never saw a wait expire: no heartbeat (probes call the server stalled)
    and no reclaim of dead clients' slots until some client rang the doorbell."""
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "4")
    raw = RawRing(server.name)
    dead_pid = int(open("/proc/sys/kernel/pid_max").read()) + 1
    _, old = raw.publish(2, os.getpid(), 7, 2, MsgType.ECHO, b"hi")
    raw.wait_frame(2, old)
    force_semaphore_to_max(server.name, "req")
    # A wait already blocked when the count jumped still times out once: let it.
    time.sleep(2 * L.HEARTBEAT_INTERVAL_S)
    struct.pack_into("<I", raw.mm, raw.geometry.slot_offset(2) + L.S_OWNER, dead_pid)  # died
    beat = raw.u32(L.H_HEARTBEAT_NS) | raw.u32(L.H_HEARTBEAT_NS + 4) << 32
    time.sleep(4 * L.HEARTBEAT_INTERVAL_S)
    assert (raw.u32(L.H_HEARTBEAT_NS) | raw.u32(L.H_HEARTBEAT_NS + 4) << 32) > beat, \
        "heartbeat stopped"
    assert raw.u32(raw.geometry.slot_offset(2) + L.S_OWNER) == 0, "dead client's slot kept"
    client = RingClient(server.name, slots=range(0, 2))
    assert client.echo(b"still serving", timeout=3) == b"still serving"
    client.close()
    raw.close()
    assert server.proc.poll() is None, "server died"
    assert "crashed" not in server.stderr, server.stderr


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_flooded_request_semaphore_does_not_keep_a_cpu_busy(start_server):
    """Every timed wait on a count at SEM_VALUE_MAX returns a token at once: the idle loop
    took tokens at full speed, a whole CPU for the minutes the count would take to drain."""
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "2")
    force_semaphore_to_max(server.name, "req")
    time.sleep(2 * L.HEARTBEAT_INTERVAL_S)  # a wait already blocked times out once
    before, start = cpu_seconds(server.proc.pid), time.monotonic()
    time.sleep(1.5)
    share = (cpu_seconds(server.proc.pid) - before) / (time.monotonic() - start)
    assert share < 0.2, f"a flooded idle server used {share:.0%} of a CPU"
    client = RingClient(server.name, slots=range(0, 2))
    started = time.monotonic()
    assert client.echo(b"still serving", timeout=3) == b"still serving"
    assert time.monotonic() - started < 0.5
    client.close()


# -- the sockets ------------------------------------------------------------------------------

def tcp_address(server):
    return server.ready["tcp"]["host"], server.ready["tcp"]["port"]


def connect(address) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass  # closed with our unread input queued; what came before still arrived
    return bytes(data)


def hangs_up_within(sock: socket.socket, seconds: float) -> float:
    started = time.monotonic()
    sock.settimeout(seconds + 5)
    read_until_closed(sock)
    return time.monotonic() - started


@pytest.fixture
def loris_server(start_server):
    return start_server("--model", "echo", "--transport", "unix,tcp", "--tcp-port", "0",
                        "--packet-timeout", "0.5")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_slow_loris_on_the_length_prefix_is_cut_off(loris_server, transport):
    address = loris_server.socket if transport == "unix" else tcp_address(loris_server)
    loris = connect(address)
    loris.sendall(b"\x00\x00")  # half a length prefix, then nothing
    assert hangs_up_within(loris, 0.5) < 2.5
    loris.close()


def test_drip_fed_packet_is_cut_off_at_the_packet_timeout(loris_server):
    """One byte every 0.2 s never lets a 0.5 s timeout fire between bytes; the limit is on
    the whole packet, or a client could hold a connection thread for hours."""
    loris = connect(loris_server.socket)
    loris.sendall(struct.pack(">I", 101) + b"\x00")
    started = time.monotonic()
    closed_after = None
    for _ in range(100):
        time.sleep(0.2)
        try:
            loris.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
            break
    assert closed_after is not None, "the server took a 20 s drip-fed packet to the end"
    assert closed_after < 2.5
    loris.close()
    other = PacketClient(loris_server.socket)
    assert other.call(MsgType.ECHO, b"ok")[1] == b"ok"
    other.close()


def test_announced_lengths_do_not_reserve_memory(start_server):
    """Memory follows the bytes that arrive, not the length a peer announces: 1024 peers each
    announcing 16 MiB and sending nothing more would otherwise cost 16 GiB."""
    server = start_server("--model", "echo", "--transport", "unix")
    PacketClient(server.socket).call(MsgType.ECHO, b"warm")
    before = rss_kib(server.proc.pid)
    claims = []
    for _ in range(32):
        sock = connect(server.socket)
        sock.sendall(struct.pack(">I", 16 * 1024 * 1024 + 1) + b"\x00" + b"x" * 1000)
        claims.append(sock)
    good = PacketClient(server.socket, timeout=60)  # 16 MiB on a loaded CI machine
    assert good.call(MsgType.ECHO, b"served")[1] == b"served"  # also: every claim was read
    time.sleep(0.2)
    grown = rss_kib(server.proc.pid) - before
    assert grown < 48 * 1024, f"server RSS grew {grown} KiB for 32 announced 16 MiB packets"
    big = os.urandom(16 * 1024 * 1024)  # the largest legal packet still round-trips
    assert good.call(MsgType.ECHO, big)[1] == big
    good.close()
    for sock in claims:
        sock.close()


def test_a_client_that_never_reads_its_reply_is_dropped(loris_server):
    lazy = connect(loris_server.socket)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.sendall(encode_packet(MsgType.ECHO, b"z" * (8 * 1024 * 1024)))
    other = PacketClient(loris_server.socket)
    assert other.call(MsgType.ECHO, b"meanwhile")[1] == b"meanwhile"
    time.sleep(1.5)  # the server's send stalls on the full socket buffer, then times out
    received = read_until_closed(lazy)
    assert len(received) < 5 + 8 * 1024 * 1024, "reply completed although nobody read it"
    assert other.call(MsgType.ECHO, b"after")[1] == b"after"
    other.close()
    lazy.close()


def test_running_out_of_descriptors_pauses_accepting_and_never_stops_it(start_server):
    """A flood of connections past the process's fd limit made accept() fail with EMFILE,
    which ended the accept loop for good: once the flood was gone, nobody was served."""
    server = start_server("--model", "echo", "--transport", "unix")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (128, hard))
    flood = []
    try:
        for _ in range(200):  # connect() succeeds into the backlog even when accept() cannot
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(server.socket)
            except (BlockingIOError, ConnectionRefusedError):
                sock.close()  # backlog full: the point is already made
                break
            flood.append(sock)
        time.sleep(0.5)
        assert fd_count(server.proc.pid) >= 120, "the flood did not reach the fd limit"
    finally:
        for sock in flood:
            sock.close()
    late = PacketClient(server.socket, timeout=10)
    assert late.call(MsgType.ECHO, b"after the flood")[1] == b"after the flood"
    late.close()


def random_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.6:
            msg_type = rng.choice([0, 0, 1, 2, 3, 4, 5, 6, 7, 0xFF, rng.getrandbits(8)])
            size = rng.choice([0, 1, 3, 4, 5, 3071, 3072, 6144, rng.randint(0, 20000)])
            parts.append(encode_packet(msg_type, rng.randbytes(size)))
        elif kind < 0.7:
            parts.append(rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                                     struct.pack(">I", 16 * 1024 * 1024 + 2)]))
        else:
            parts.append(rng.randbytes(rng.randint(1, 12)))
    return b"".join(parts)


def content_error(msg_type: int, body: bytes) -> ErrorCode:
    """Content before support (sections 3, 3.1): the echo model serves no prompt or tensor."""
    try:
        if msg_type in (4, 5):
            decode_prompt(body)
        elif msg_type == 8:
            tensors.decode(body)
    except ProtocolError as exc:
        return exc.code
    return ErrorCode.UNSUPPORTED


def expected_replies(stream: bytes) -> list:
    """Section 5 framing then section 3 validation; the echo model serves nothing but ECHO."""
    replies, offset = [], 0
    while offset < len(stream):
        try:
            msg_type, body, used = decode_packet(memoryview(stream)[offset:])
        except FramingError as exc:
            if exc.name != "TRUNCATED":
                replies.append((MsgType.ERROR, ErrorCode[exc.name]))
            return replies
        offset += used
        if msg_type == MsgType.ECHO:
            replies.append((MsgType.ECHO, body))
        elif msg_type in (6, 7, 0xFF) or msg_type > 9:
            replies.append((MsgType.ERROR, ErrorCode.UNKNOWN_TYPE))
        elif (msg_type in (1, 2) and len(body) != 3072) or \
                (msg_type == 3 and (not body or len(body) % 3072)) or \
                (msg_type in (4, 5) and len(body) < 4) or (msg_type == 8 and len(body) < 8) or \
                (msg_type == 9 and body):
            replies.append((MsgType.ERROR, ErrorCode.BAD_LENGTH))
        elif msg_type == 9:
            replies.append((MsgType.METADATA, tensors.metadata_json("echo", None)))
        else:
            replies.append((MsgType.ERROR, content_error(msg_type, body)))
    return replies


def test_random_packet_streams_on_many_connections_get_exactly_the_spec_replies(start_server):
    server = start_server("--model", "echo", "--transport", "unix,tcp", "--tcp-port", "0",
                          "--packet-timeout", "2")
    addresses = [server.socket, tcp_address(server)]

    def session(i: int):
        rng = random.Random(i)
        stream = random_stream(rng)
        sock = connect(addresses[i % 2])
        try:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)  # then EOF: a cut packet is dropped, not answered
        except OSError:
            pass  # the server already hung up after a framing error; its reply is queued
        try:
            got = parse_replies(read_until_closed(sock))
        finally:
            sock.close()
        return i, got, expected_replies(stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for i, got, expected in pool.map(session, range(300)):
            assert got == expected, f"stream {i}"
    ok = PacketClient(server.socket)
    assert ok.call(MsgType.ECHO, b"fine")[1] == b"fine"
    ok.close()
    assert server.proc.poll() is None
    assert ring_objects(server.name) == []  # no ring was asked for, none was made
