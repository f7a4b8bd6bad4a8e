"""Property tests (hypothesis) for every decoder that reads untrusted bytes, and for the two
real server read paths driven in-process: the ring loop's slot reader and a socket
connection.

`make test` runs a few hundred derandomized examples per property, so a failure reproduces
exactly. bench/fuzz_python.py runs the same properties on random inputs for up to millions
of examples each (results in bench/results/fuzz-python.md); it sets SHMSERVE_FUZZ_EXAMPLES,
which switches derandomize off.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import random
import secrets
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import parse_replies
from shmserve import layout as L
from shmserve import tensors
from shmserve.dispatch import Dispatcher
from shmserve import Model, Signature, TensorSpec
from shmserve.protocol import (IMAGE_BYTES, LABELS, MAX_BATCH_IMAGES, REQUEST_TYPES,
                               ErrorCode, FramingError, MsgType, ProtocolError, check_request,
                               decode_error, decode_packet, decode_prompt, encode_error,
                               encode_packet, encode_prompt)
from shmserve.transports.shm import ShmTransport
from shmserve.transports.peers import peer_of
from shmserve.transports.stream import Connection, StreamTransport

_FUZZ_EXAMPLES = int(os.environ.get("SHMSERVE_FUZZ_EXAMPLES", "0"))


def examples(ci: int):
    return settings(max_examples=_FUZZ_EXAMPLES or ci, derandomize=not _FUZZ_EXAMPLES,
                    database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
# Lengths cluster around the boundaries the decoders care about; plain random u32 values
# would almost never land on them.
lengths = st.one_of(st.integers(0, 8), st.integers(IMAGE_BYTES - 2, IMAGE_BYTES + 2),
                    st.integers(0, 5).map(lambda n: n * IMAGE_BYTES),
                    st.sampled_from([MAX_BATCH_IMAGES * IMAGE_BYTES,
                                     (MAX_BATCH_IMAGES + 1) * IMAGE_BYTES]), u32)


# -- stream packets (section 5) ---------------------------------------------------------------

@examples(300)
@given(st.binary(max_size=64), st.integers(0, 64))
def test_decode_packet_accepts_exactly_what_the_prefix_announces(data, max_body):
    try:
        msg_type, body, used = decode_packet(data, max_body)
    except FramingError as exc:
        length = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        expected = ("TRUNCATED" if length is None else
                    "BAD_LENGTH" if length == 0 else
                    "TOO_LARGE" if length - 1 > max_body else "TRUNCATED")
        assert exc.name == expected
        return
    length = int.from_bytes(data[:4], "big")
    assert used == 4 + length <= len(data)
    assert (msg_type, body) == (data[4], data[5:used])
    assert 0 <= len(body) <= max_body


@examples(200)
@given(st.lists(st.tuples(u8, st.binary(max_size=300)), min_size=1, max_size=6))
def test_packet_stream_round_trips_and_every_cut_is_truncated(packets):
    stream = b"".join(encode_packet(t, b) for t, b in packets)
    offset, decoded = 0, []
    while offset < len(stream):
        msg_type, body, used = decode_packet(memoryview(stream)[offset:])
        decoded.append((msg_type, body))
        offset += used
    assert decoded == packets
    first = encode_packet(*packets[0])
    for cut in range(len(first)):
        with pytest.raises(FramingError) as info:
            decode_packet(first[:cut])
        assert info.value.name == "TRUNCATED"


# -- request bodies (section 3) ---------------------------------------------------------------

def expected_check(msg_type: int, length: int):
    """Section 3's body-size table written out independently of protocol.check_request."""
    if msg_type not in {0, 1, 2, 3, 4, 5, 8, 9}:
        return ErrorCode.UNKNOWN_TYPE
    if msg_type in (1, 2) and length != 3072:
        return ErrorCode.BAD_LENGTH
    if msg_type == 3 and (length == 0 or length % 3072 or length // 3072 > 256):
        return ErrorCode.BAD_LENGTH
    if msg_type in (4, 5) and length < 4:
        return ErrorCode.BAD_LENGTH
    if (msg_type == 8 and length < 8) or (msg_type == 9 and length):
        return ErrorCode.BAD_LENGTH
    return None


@examples(400)
@given(u8, lengths)
def test_check_request_follows_the_body_size_table(msg_type, length):
    expected = expected_check(msg_type, length)
    try:
        checked = check_request(msg_type, length)
    except ProtocolError as exc:
        assert exc.code == expected
        return
    assert expected is None and checked == msg_type and checked in REQUEST_TYPES


@examples(300)
@given(st.one_of(st.binary(max_size=40),
                 st.tuples(u32, st.text(max_size=20)).map(lambda p: encode_prompt(p[1], p[0]))))
def test_decode_prompt_is_total(body):
    try:
        prompt, steps = decode_prompt(body)
    except ProtocolError as exc:
        if len(body) < 4:
            assert exc.code == ErrorCode.BAD_LENGTH
        elif len(body) == 4:
            assert exc.code == ErrorCode.EMPTY_PROMPT
        else:
            assert exc.code == ErrorCode.INVALID_UTF8
            with pytest.raises(UnicodeDecodeError):
                body[4:].decode("utf-8")
        return
    assert prompt and encode_prompt(prompt, steps) == body


@examples(200)
@given(u32, st.text(min_size=1, max_size=30))
def test_prompt_round_trips(steps, text):
    assert decode_prompt(encode_prompt(text, steps)) == (text, steps)


@examples(200)
@given(st.binary(max_size=8), st.sampled_from(list(ErrorCode)), st.text(max_size=30))
def test_error_body_round_trips_and_short_bodies_fail(junk, code, message):
    assert decode_error(encode_error(code, message)) == (code, message)
    if len(junk) < 2:
        with pytest.raises(ProtocolError):
            decode_error(junk)


# -- ring records (sections 7-9) --------------------------------------------------------------

geometries = st.builds(L.Geometry, st.integers(L.MIN_SLOTS, L.MAX_SLOTS),
                       st.integers(48, 1024).map(lambda n: n * 64),
                       st.integers(1, 2048).map(lambda n: n * 64))


def header_bytes(g: L.Geometry, generation: int, total: int | None = None) -> bytearray:
    buf = bytearray(L.HEADER_SIZE)
    buf[0:8] = L.MAGIC
    L.write_header(buf, g, generation, 0, 0)
    if total is not None:
        struct.pack_into("<Q", buf, L.H_TOTAL_SIZE, total)
    return buf


@examples(300)
@given(geometries, st.integers(1, 2**64 - 1), st.binary(min_size=L.HEADER_SIZE - 56,
                                                        max_size=L.HEADER_SIZE - 56))
def test_valid_headers_parse_whatever_the_unchecked_bytes_hold(g, generation, tail):
    buf = header_bytes(g, generation)
    buf[56:] = tail  # state, heartbeat, doorbell and reserved space are not geometry
    parsed, gen = L.parse_header(buf, g.total_size)
    assert (parsed, gen) == (g, generation)


@examples(400)
@given(geometries, st.integers(1, 2**64 - 1), st.integers(0, 47), u8,
       st.integers(-1, 1))
def test_any_change_to_a_geometry_byte_is_refused_or_harmless(g, generation, index, value,
                                                              size_delta):
    buf = header_bytes(g, generation)
    buf[index] = value
    mapping_size = g.total_size + size_delta
    try:
        parsed, gen = L.parse_header(buf, mapping_size)
    except L.LayoutError as exc:
        assert exc.name in {"BAD_MAGIC", "BAD_VERSION", "BAD_GEOMETRY"}
        return
    # Accepted: then it must be self-consistent and match the mapping, so a client never
    # indexes past the end of what it mapped.
    assert parsed.total_size == mapping_size
    assert L.HEADER_SIZE + parsed.slot_count * parsed.slot_stride == mapping_size
    assert parsed.slot_stride >= 128 + parsed.req_capacity + parsed.resp_capacity
    assert gen != 0


@examples(400)
@given(st.binary(max_size=L.HEADER_SIZE + 8), st.integers(0, 2**40))
def test_parse_header_is_total_on_junk(data, mapping_size):
    try:
        g, gen = L.parse_header(data, mapping_size)
    except L.LayoutError as exc:
        assert exc.name in {"BAD_MAGIC", "BAD_VERSION", "BAD_GEOMETRY"}
        return
    assert g.total_size == mapping_size and gen != 0


@examples(400)
@given(u32, u64, u32, u8, u8, u32, u64, st.integers(64, 1 << 20), st.booleans())
def test_check_frame_refuses_every_misrouted_or_oversized_frame(f_seq, f_id, f_len, f_type,
                                                                f_flags, seq, req_id, capacity,
                                                                same):
    if same:
        f_seq, f_id = seq, req_id
    frame = L.Frame(0, f_seq, f_id, f_len, f_type, f_flags)
    stream_flag_wrong = (f_type == MsgType.STREAM_CHUNK and frame.final) or \
        (f_type == MsgType.STREAM_END and not frame.final)
    try:
        L.check_frame(frame, seq, req_id, capacity)
    except L.FrameError as exc:
        if (f_seq, f_id) != (seq, req_id):
            assert exc.name == "MISROUTED"
        else:
            assert exc.name == "CORRUPT_RECORD"
            assert f_len > capacity or f_type not in L.REPLY_TYPES or stream_flag_wrong
        return
    assert (f_seq, f_id) == (seq, req_id) and f_len <= capacity and f_type in L.REPLY_TYPES
    assert not stream_flag_wrong


@examples(300)
@given(u32, lengths, st.integers(3072, 1 << 30))
def test_check_request_record(owner, req_len, capacity):
    problem = L.check_request_record(owner, req_len, capacity)
    assert (problem is None) == (owner != 0 and req_len <= capacity)


# -- the ring server's read path, in-process --------------------------------------------------

class ProbeModel(Model):
    """Answers image requests with a digest of the images it was handed, so the test can tell
    the server passed exactly the request's bytes, no more and no fewer. The digest is no
    model output, so it goes out through the call's request, below the public API."""
    name = "probe"
    labels = LABELS
    signature = Signature([TensorSpec("image", "uint8", (-1, 3, 32, 32))],
                          [TensorSpec("scores", "float32", (-1, 10))], max_batch_size=256)

    def submit(self, calls):
        for call in calls:
            images = call.inputs["image"]
            call._request.reply(call._request.msg_type, probe_digest(images.tobytes()) +
                                struct.pack("<I", images.shape[0]))


def probe_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def process_exists(pid: int) -> bool:
    if pid > 0x7FFFFFFF:  # not a pid_t: no process can have it
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Owners that matter: none, a live process (this one), pid 1, a pid no process can have
# (above pid_max), and u32 values that do not fit a pid_t at all.
DEAD_PID = pid_max() + 1
owners = st.one_of(st.sampled_from([0, os.getpid(), 1, DEAD_PID, 0x7FFFFFFF, 0x80000000,
                                    0xFFFFFFFF]), u32)


class RingHarness:
    """A real ShmTransport whose loop body is called step by step on this thread."""
    SLOT = 0
    # A pass writes at most one frame per slot (a flush stops at the first frame that needs an
    # ack), so reading the frame after each pass sees every one; a step runs passes until one
    # writes nothing, as the ring thread would in the same wake-up.
    MAX_PASSES = 8

    def __init__(self):
        # 128-byte frames: every error message fits one frame (the oracle below counts on
        # that), while echoes up to 400 bytes still span several frames with acks.
        self.geometry = g = L.Geometry(2, 4 * IMAGE_BYTES, 128)
        name = f"prop{os.getpid()}-{secrets.token_hex(3)}"
        self.transport = t = ShmTransport(Dispatcher(ProbeModel()), name, g, spin_us=0)
        t._thread_id = threading.get_ident()  # replies are written inline, as on the ring thread
        self.mm = t.objects.mm
        self.base = g.slot_offset(self.SLOT)

    def frame_seq(self):
        return struct.unpack_from("<I", self.mm, self.base + L.S_FRAME_SEQ)[0]

    def read_frame(self):
        frame = L.read_frame(self.mm, self.base)
        data_at = self.geometry.reply_data_offset(self.SLOT)
        return frame, bytes(self.mm[data_at:data_at + min(frame.length,
                                                           self.geometry.resp_capacity)])

    def reset(self):
        t = self.transport
        self.mm[self.base:self.base + self.geometry.slot_stride] = bytes(self.geometry.slot_stride)
        for slot in t._slots:
            slot.reset()
            t._ring.reclaim(slot.index)  # served = the zeroed req_seq
        t._outbox.clear()

    def served(self):
        return self.transport._ring.served(self.SLOT)

    def step(self):
        """One wake-up of ShmTransport._run, minus the waiting."""
        published = []
        for _ in range(self.MAX_PASSES):
            before = self.frame_seq()
            self.transport.serve_once(0, 0)
            if self.frame_seq() == before:
                break
            published.append(self.read_frame())
            assert published[-1][0].seq == (before + 1) & 0xFFFFFFFF, "two frames in one pass"
        else:
            raise AssertionError(f"still writing frames after {self.MAX_PASSES} passes")
        self.transport.reclaim_dead_clients()
        return published

    def close(self):
        self.transport.close()


_harness: RingHarness | None = None


def ring_harness() -> RingHarness:
    global _harness
    if _harness is None:
        _harness = RingHarness()
        atexit.register(close_harness)
    return _harness


def close_harness():
    global _harness
    if _harness is not None:
        _harness.close()
        _harness = None


@pytest.fixture(scope="module", autouse=True)
def _close_ring_harness():
    yield
    close_harness()


def content_error(msg_type: int, body: bytes, signature):
    """After the size table: the body's content (section 3, 3.1), then whether the model
    serves the type. The probe serves images and INFER; no model here serves prompts."""
    try:
        if msg_type in (MsgType.PROMPT, MsgType.PROMPT_STREAM):
            decode_prompt(body)
            return ErrorCode.UNSUPPORTED
        if msg_type == MsgType.INFER:
            decoded = tensors.decode(body)
            if signature is None:
                return ErrorCode.UNSUPPORTED
            tensors.bind(signature, decoded)
    except ProtocolError as exc:
        return exc.code
    return None


def expected_frames(owner, req_len, req_type, body, capacity, resp_capacity):
    """Section 8 then section 3, as (type, payload, final) per frame."""
    if req_len > capacity or owner == 0:
        return [(MsgType.ERROR, ErrorCode.CORRUPT_RECORD, True)]
    code = expected_check(req_type, req_len)
    if code is None:
        code = content_error(req_type, body, ProbeModel.signature)
    if code is not None:
        return [(MsgType.ERROR, code, True)]
    if req_type == MsgType.ECHO:
        payload = body
    elif req_type == MsgType.METADATA:
        payload = tensors.metadata_json(ProbeModel.name, ProbeModel.signature)
    else:
        payload = probe_digest(body) + struct.pack("<I", len(body) // IMAGE_BYTES)
    starts = range(0, max(len(payload), 1), resp_capacity)
    return [(req_type, payload[i:i + resp_capacity], i == starts[-1]) for i in starts]


records = st.fixed_dictionaries({
    "owner": owners,
    "new_request": st.booleans(),
    "req_seq": u32,
    "req_id": u64,
    "req_len": st.one_of(st.integers(0, 400), st.sampled_from([3072, 6144, 12288, 12289, 3073]),
                         lengths),
    "req_type": st.one_of(st.integers(0, 7), u8),
    # A client acks the frame it saw; a hostile one guesses; the value equal to the next
    # frame_seq makes the server send two frames in one pass.
    "ack": st.one_of(st.sampled_from(["last", "next"]), u32),
    "cancel": st.one_of(st.sampled_from(["current", None]), u32),
    "frame_seq": st.one_of(st.none(), u32),  # hostile writes to the server's own line too
    "data": st.one_of(st.binary(max_size=400),
                      st.tuples(st.integers(1, 4), u32).map(
                          lambda p: random.Random(p[1]).randbytes(p[0] * IMAGE_BYTES))),
    "reserved": st.binary(min_size=3, max_size=3),
})


@examples(150)
@given(st.lists(records, min_size=1, max_size=5))
def test_ring_server_answers_hostile_records_exactly_and_writes_nowhere_else(steps):
    h = ring_harness()
    h.reset()
    g, base, mm = h.geometry, h.base, h.mm
    allowed = [(base + L.S_FRAME_SEQ, base + L.S_DATA),                     # server line
               (g.reply_data_offset(h.SLOT), g.reply_data_offset(h.SLOT) + g.resp_capacity),
               (base + L.S_OWNER, base + L.S_OWNER + 4)]                    # reclaim -> 0
    served, pending, position, finished = 0, [], 0, True
    current = (0, 0)
    for record in steps:
        old_seq = struct.unpack_from("<I", mm, base + L.S_REQ_SEQ)[0]
        seq = (old_seq + 1) & 0xFFFFFFFF if record["new_request"] else record["req_seq"]
        if record["frame_seq"] is not None:
            struct.pack_into("<I", mm, base + L.S_FRAME_SEQ, record["frame_seq"])
        frame_seq = struct.unpack_from("<I", mm, base + L.S_FRAME_SEQ)[0]
        ack = {"last": frame_seq, "next": (frame_seq + 1) & 0xFFFFFFFF}.get(record["ack"],
                                                                           record["ack"])
        cancel = {"current": seq, None: (seq + 7) & 0xFFFFFFFF}.get(record["cancel"],
                                                                   record["cancel"])
        data_at = g.request_data_offset(h.SLOT)
        data = record["data"][:g.req_capacity]
        mm[data_at:data_at + len(data)] = data
        struct.pack_into("<IIQIB3sII", mm, base, record["owner"], seq, record["req_id"],
                         record["req_len"], record["req_type"], record["reserved"], ack, cancel)
        before = bytes(mm)
        body = before[data_at:data_at + record["req_len"]] if record["req_len"] <= g.req_capacity \
            else b""

        frames = h.step()

        # What the spec says must have happened in this pass, in order.
        expected = []
        if seq != served:
            served, current = seq, (seq, record["req_id"])
            pending = expected_frames(record["owner"], record["req_len"], record["req_type"],
                                      body, g.req_capacity, g.resp_capacity)
            expected.append(pending[0])
            position, finished = 1, len(pending) == 1
        if not finished:
            if cancel == served:
                expected.append((MsgType.ERROR, ErrorCode.CANCELLED, True))
                finished = True
            elif ack == (frame_seq + len(expected)) & 0xFFFFFFFF:
                expected.append(pending[position])
                position += 1
                finished = position == len(pending)
        owner_dead = record["owner"] != 0 and not process_exists(record["owner"])
        if owner_dead:
            served, finished = seq, True

        assert len(frames) == len(expected), (frames, expected)
        for i, (frame, (e_type, e_payload, e_final)) in enumerate(zip(frames, expected)):
            frame, f_data = frame
            assert frame.seq == (frame_seq + i + 1) & 0xFFFFFFFF
            L.check_frame(frame, *current, g.resp_capacity)
            assert (frame.msg_type, frame.flags) == (e_type, L.FRAME_FLAG_FINAL if e_final else 0)
            if e_type == MsgType.ERROR:
                assert frame.length <= g.resp_capacity, "an error message outgrew one frame"
                assert decode_error(f_data)[0] == e_payload
            else:
                assert f_data == e_payload
        after = bytes(mm)
        changed = np.flatnonzero(np.frombuffer(after, np.uint8) != np.frombuffer(before, np.uint8))
        stray = [i for i in changed.tolist() if not any(lo <= i < hi for lo, hi in allowed)]
        assert not stray, f"server wrote outside its fields at offsets {stray[:8]}"
        owner_after = struct.unpack_from("<I", mm, base + L.S_OWNER)[0]
        assert owner_after == (0 if owner_dead else record["owner"])
        assert h.served() == served


# -- the socket server's read path, in-process ------------------------------------------------

class _EchoOnly(Model):
    name = "echo"


def packets_and_junk():
    packet = st.tuples(u8, st.binary(max_size=80)).map(lambda p: encode_packet(*p))
    framing_error = st.sampled_from([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                                     struct.pack(">I", 4096 + 2)])
    return st.lists(st.one_of(packet, packet, framing_error, st.binary(max_size=12)),
                    max_size=6).map(b"".join)


def expected_replies(stream: bytes, max_body: int):
    replies, offset = [], 0
    while offset < len(stream):
        try:
            msg_type, body, used = decode_packet(memoryview(stream)[offset:], max_body)
        except FramingError as exc:
            if exc.name != "TRUNCATED":  # answered, then the connection is closed
                replies.append((MsgType.ERROR, ErrorCode[exc.name]))
            return replies
        offset += used
        code = expected_check(msg_type, len(body))
        if code is None and msg_type in (1, 2, 3):
            code = ErrorCode.UNSUPPORTED
        elif code is None:
            code = content_error(msg_type, body, None)
        if code is not None:
            replies.append((MsgType.ERROR, code))
        elif msg_type == MsgType.METADATA:
            replies.append((MsgType.METADATA, tensors.metadata_json("echo", None)))
        else:
            replies.append((MsgType.ECHO, body))
    return replies


def read_replies(sock: socket.socket) -> list:
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # the server closed with our unread input queued: data before it still arrives
    return parse_replies(data)


@examples(150)
@given(packets_and_junk())
def test_socket_connection_answers_every_whole_packet_then_closes(stream):
    max_body = 4096
    transport = StreamTransport(Dispatcher(_EchoOnly()), socket.socket(socket.AF_UNIX), "prop",
                                packet_timeout=5.0, max_body=max_body)
    server_end, client_end = socket.socketpair()
    try:
        connection = Connection(server_end, transport, peer_of(server_end))
        worker = threading.Thread(target=connection.serve, daemon=True)
        worker.start()
        client_end.settimeout(10)
        client_end.sendall(stream)
        client_end.shutdown(socket.SHUT_WR)  # EOF: what the server does then is the property
        assert read_replies(client_end) == expected_replies(stream, max_body)
        worker.join(5)
        assert not worker.is_alive(), "connection thread did not end after EOF"
        assert connection.closed
    finally:
        client_end.close()
        server_end.close()
        transport.sock.close()
