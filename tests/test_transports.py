"""Echo, errors and framing against a real server over the ring, the Unix socket and TCP;
the ring's native wait, in-process."""
import concurrent.futures
import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from shmserve import layout as L
from shmserve.client import PacketClient, RingClient, ServerError
from shmserve.dispatch import Dispatcher
from shmserve.models.echo import EchoModel
from shmserve.protocol import ErrorCode, MsgType, encode_prompt
from shmserve.transports.shm import ShmTransport


@pytest.fixture
def ring(echo_server):
    client = RingClient(echo_server.name)
    yield client
    client.close()


def tcp_address(server):
    return server.ready["tcp"]["host"], server.ready["tcp"]["port"]


def test_ready_line_describes_the_server(echo_server):
    ready = echo_server.ready
    assert ready.pid == echo_server.pid and ready.model["model"] == "echo"
    assert list(ready.transports) == ["shm", "unix", "tcp"]
    assert ready.address("shm") == f"shm://{echo_server.name}"
    assert ready.address("unix") == f"unix://{echo_server.socket}"
    assert ready["unix"]["path"] == echo_server.socket
    assert ready.address("tcp") == f"tcp://127.0.0.1:{ready['tcp']['port']}"
    assert re.fullmatch(r"[0-9a-f]{16}", ready["shm"]["generation"])
    assert ready["shm"]["slots"] == 16


def test_ready_line_is_parsed_strictly():
    from shmserve.ready import parse_ready, ready_line
    line = ready_line(7, {"model": "echo"}, {"shm": {"address": "shm://x", "name": "x"}})
    assert parse_ready(line).address("shm") == "shm://x"
    for bad in ("not json", '{"event": "ready", "ready_version": 2, "pid": 1, "transports": {}}',
                '{"event": "log", "ready_version": 1}',
                '{"event": "ready", "ready_version": 1, "pid": 1, "transports": {"shm": {}}}'):
        with pytest.raises(ValueError):
            parse_ready(bad)


def test_old_transport_spelling_uds_still_serves_the_unix_socket(start_server):
    server = start_server("--model", "echo", "--transport", "uds")
    assert list(server.ready.transports) == ["unix"]
    client = PacketClient(server.socket)
    assert client.call(MsgType.ECHO, b"alias") == (MsgType.ECHO, b"alias")
    client.close()


def test_unknown_transport_exits_2_naming_it():
    done = subprocess.run([sys.executable, "-m", "shmserve.cli", "serve", "--model", "echo",
                           "--transport", "shm,carrier-pigeon"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "carrier-pigeon" in done.stderr, done.stderr


def test_objects_are_owner_only(echo_server):
    paths = [f"/dev/shm/shmserve.{echo_server.name}", f"/dev/shm/sem.shmserve.{echo_server.name}.req",
             f"/dev/shm/sem.shmserve.{echo_server.name}.s0", echo_server.socket]
    for path in paths:
        assert os.stat(path).st_mode & 0o777 == 0o600, path


@pytest.mark.parametrize("size", [0, 1, 64, 3072, 4096, 4097, 100_000])
def test_ring_echo_sizes(ring, size):
    payload = os.urandom(size)
    assert ring.echo(payload) == payload  # 4097+ spans frames of 4096 with acks


def test_ring_echo_many_threads_each_reply_matches(ring):
    def one(i):
        payload = struct.pack("<I", i) * (1 + i % 700)
        return ring.echo(payload) == payload

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(2000)))


@pytest.mark.parametrize("msg_type, body, code", [
    (0x42, b"x", ErrorCode.UNKNOWN_TYPE),
    (MsgType.STREAM_CHUNK, b"x", ErrorCode.UNKNOWN_TYPE),
    (MsgType.CLASSIFY, b"\x00" * 100, ErrorCode.BAD_LENGTH),
    (MsgType.CLASSIFY, b"\x00" * 3072, ErrorCode.UNSUPPORTED),
    (MsgType.PROMPT, encode_prompt("hi", 4), ErrorCode.UNSUPPORTED),
    (MsgType.PROMPT, b"\x01", ErrorCode.BAD_LENGTH),
])
def test_typed_errors_on_every_transport(echo_server, ring, msg_type, body, code):
    with pytest.raises(ServerError) as info:
        ring.call(msg_type, body)
    assert info.value.code == code
    for address in (echo_server.socket, tcp_address(echo_server)):
        client = PacketClient(address)
        with pytest.raises(ServerError) as info:
            client.call(msg_type, body)
        assert info.value.code == code
        assert client.call(MsgType.ECHO, b"still usable") == (MsgType.ECHO, b"still usable")
        client.close()


def test_ring_request_larger_than_slot_is_refused_locally(ring):
    with pytest.raises(ValueError, match="req_capacity"):
        ring.echo(b"x" * (ring.geometry.req_capacity + 1))


def test_classic_framing_round_trips_byte_exact(echo_server):
    image = bytes(range(256)) * 12
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(echo_server.socket)
    sock.sendall(b"\x00\x00\x0c\x01\x00" + image)
    reply = b""
    while len(reply) < 5 + 3072:
        reply += sock.recv(8192)
    assert reply == b"\x00\x00\x0c\x01\x00" + image
    sock.close()


@pytest.mark.parametrize("prefix, code", [(b"\x00\x00\x00\x00", ErrorCode.BAD_LENGTH),
                                          (b"\xff\xff\xff\xff", ErrorCode.TOO_LARGE),
                                          (struct.pack(">I", 16 * 1024 * 1024 + 2),
                                           ErrorCode.TOO_LARGE)])
def test_framing_errors_answer_then_close(echo_server, prefix, code):
    client = PacketClient(echo_server.socket)
    client.sock.sendall(prefix)
    msg_type, body = client.read()
    assert msg_type == MsgType.ERROR and struct.unpack_from("<H", body)[0] == code
    assert client.sock.recv(1) == b""  # closed: the stream cannot be resynchronised
    client.close()


def test_truncated_packet_does_not_disturb_others(echo_server):
    broken = PacketClient(echo_server.socket)
    broken.sock.sendall(b"\x00\x00\x10\x00\x00partial")
    broken.close()
    good = PacketClient(echo_server.socket)
    assert good.call(MsgType.ECHO, b"ok")[1] == b"ok"
    good.close()


def test_many_socket_clients_concurrently(echo_server):
    def session(i):
        client = PacketClient(echo_server.socket if i % 2 else tcp_address(echo_server))
        try:
            return all(client.call(MsgType.ECHO, bytes([i]) * n)[1] == bytes([i]) * n
                       for n in (1, 3072, 70_000))
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(session, range(32)))


def test_slow_loris_is_cut_off_and_others_are_served(start_server):
    server = start_server("--model", "echo", "--transport", "unix", "--packet-timeout", "0.5")
    loris = PacketClient(server.socket, timeout=5)
    loris.sock.sendall(b"\x00\x00\x00\x05\x00")  # a packet that never completes
    other = PacketClient(server.socket)
    assert other.call(MsgType.ECHO, b"fast")[1] == b"fast"
    started = time.monotonic()
    assert loris.sock.recv(1) == b""  # the server hung up on the half packet
    assert time.monotonic() - started < 3
    other.close()
    loris.close()


def test_a_long_error_is_one_final_frame_cut_at_a_code_point(start_server):
    """Spec section 4: an ERROR is one message; on the ring one FINAL frame, its message cut
    to fit resp_capacity without splitting a UTF-8 code point."""
    import numpy as np
    from shmserve import layout as L
    from shmserve.tensors import encode
    server = start_server("--model", "examples/models/identity.py:identity", "--transport",
                          "shm", "--slot-reply-bytes", "64", "--slots", "2")
    client = RingClient(server.name)
    seen = []
    original = L.check_frame

    def spy(frame, *args):
        seen.append(frame)
        original(frame, *args)
    try:
        L.check_frame = spy
        with pytest.raises(ServerError) as info:
            client.call(MsgType.INFER, bytes(encode([("é" * 100, np.zeros((1, 1), np.float32))])))
    finally:
        L.check_frame = original
        client.close()
    assert info.value.code == ErrorCode.BAD_INPUT
    assert len(seen) == 1 and seen[0].final and seen[0].msg_type == MsgType.ERROR
    assert seen[0].length <= 64
    assert "\ufffd" not in str(info.value)  # no split code point was replaced


def test_one_poll_answers_echoes_until_a_request_needs_python():
    """The native loop answers ECHO without returning to the interpreter: one wait serves
    every echo that comes, and ends when a request that Python answers arrives."""
    name = f"poll{os.getpid()}-{secrets.token_hex(3)}"
    transport = ShmTransport(Dispatcher(EchoModel()), name, L.Geometry(2, 4096, 4096), spin_us=0)
    transport._thread_id = threading.get_ident()  # replies written inline, as the ring thread
    client = RingClient(name)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            def echoes_then_metadata():
                echoed = [client.echo(bytes([i]) * 100, timeout=30) for i in range(3)]
                return echoed, client.call(MsgType.METADATA, timeout=30)
            calls = pool.submit(echoes_then_metadata)
            started = time.monotonic()
            transport.serve_once(0, 30_000_000_000)
            took = time.monotonic() - started
            echoed, (reply_type, metadata) = calls.result(timeout=30)
        assert echoed == [bytes([i]) * 100 for i in range(3)]
        assert transport.inline_echoes == 3, "the wait returned before the METADATA request"
        assert reply_type == MsgType.METADATA and json.loads(metadata)["name"] == "echo"
        assert took < 25, "the wait did not end on the request Python answers"
    finally:
        client.close()
        transport.close()


HOARDER = '''
import threading
import numpy as np
import shmserve
from shmserve import Signature, TensorSpec


class Hoarder(shmserve.Model):
    """Answers a row starting with a negative number later, from a timer, with the input view
    it kept (the lifetime rule says to copy it); other rows at once, from a copy."""

    name = "hoarder"
    signature = Signature([TensorSpec("x", "float32", (-1, -1))],
                          [TensorSpec("y", "float32", (-1, -1))], max_batch_size=8)

    def submit(self, calls):
        for call in calls:
            x = call.inputs["x"]
            if x[0, 0] < 0:
                threading.Timer(0.2, lambda c=call, v=x[0:1]: c.done or c.reply({"y": v})).start()
            else:
                call.reply({"y": np.array(x)})


def hoarder():
    return Hoarder()
'''


def test_a_model_that_keeps_an_input_view_past_submit_fails_that_call(start_server, tmp_path):
    """The lifetime rule is enforced: a view of the ring slot or socket buffer kept past
    submit() would read the next request's bytes, so the call fails with INTERNAL at once."""
    from shmserve import tensors

    model = tmp_path / "hoarder.py"
    model.write_text(HOARDER)
    server = start_server("--model", f"{model}:hoarder", "--transport", "shm,unix")
    kept = bytes(tensors.encode([("x", np.full((1, 4), -1, np.float32))]))
    copied = np.arange(8, dtype=np.float32).reshape(2, 4)
    ring, stream = RingClient(server.name), PacketClient(server.socket)
    try:
        for client in (ring, stream):
            with pytest.raises(ServerError) as info:
                client.call(MsgType.INFER, kept)
            assert info.value.code == ErrorCode.INTERNAL
            assert "kept a view of a request input" in info.value.message
            msg_type, body = client.call(MsgType.INFER, bytes(tensors.encode([("x", copied)])))
            assert msg_type == MsgType.INFER
            np.testing.assert_array_equal(dict(tensors.decode(body))["y"], copied)
    finally:
        ring.close()
        stream.close()
