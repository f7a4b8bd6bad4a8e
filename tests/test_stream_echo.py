"""The stream transports' native ECHO loop (shmserve/_stream.c) on a socket pair: what it
answers, and that it leaves everything else at the buffer's start, as Python's reads would."""
import errno
import socket
import struct

import pytest

from shmserve import _stream

ECHO, PROMPT = 0, 1


def packet(msg_type: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, msg_type) + body


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 200_000))
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def test_pipelined_echoes_are_answered_and_the_next_packet_is_left_at_the_start(pair):
    server, client = pair
    echoes = [packet(ECHO, bytes([i]) * (i * 100)) for i in range(4)]  # one with an empty body
    prompt = packet(PROMPT, b"hello")
    client.sendall(b"".join(echoes) + prompt)
    buf = bytearray(4096)
    filled, answered, error = _stream.echo(server.fileno(), buf, 0, 1 << 20)
    assert (answered, error) == (4, 0)
    assert bytes(buf[:filled]) == prompt
    assert recv_exactly(client, sum(map(len, echoes))) == b"".join(echoes)


def test_bytes_already_buffered_are_answered_first(pair):
    server, client = pair
    first = packet(ECHO, b"buffered")
    buf = bytearray(4096)
    buf[:len(first)] = first
    client.sendall(packet(PROMPT, b"x"))
    filled, answered, error = _stream.echo(server.fileno(), buf, len(first), 1 << 20)
    assert (answered, error) == (1, 0)
    assert bytes(buf[:filled]) == packet(PROMPT, b"x")
    assert recv_exactly(client, len(first)) == first


@pytest.mark.parametrize("data, largest", [
    (packet(ECHO, b"a" * 100)[:50], 1 << 20),  # incomplete: its clock is Python's
    (packet(ECHO, b"a" * 100)[:3], 1 << 20),  # not even the length yet
    (packet(ECHO, b"a" * 100), 100),  # a body of 101 bytes, over `largest`
    (packet(ECHO, b"a" * 5000), 1 << 20),  # more than the buffer holds
    (struct.pack(">I", 0) + b"\x00", 1 << 20),  # length 0: Python answers BAD_LENGTH
])
def test_what_it_must_not_answer_is_left_for_python(pair, data, largest):
    server, client = pair
    client.sendall(data)
    buf = bytearray(4096)
    filled, answered, error = _stream.echo(server.fileno(), buf, 0, largest)
    assert (answered, error) == (0, 0)
    assert bytes(buf[:filled]) == data[:len(buf)]
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(1)  # nothing was sent back


def test_eof_between_packets_and_a_receive_timeout_are_reported(pair):
    server, client = pair
    buf = bytearray(4096)
    assert _stream.echo(server.fileno(), buf, 0, 1 << 20) == (0, 0, errno.EAGAIN)
    client.sendall(packet(ECHO, b"last"))
    client.shutdown(socket.SHUT_WR)
    assert _stream.echo(server.fileno(), buf, 0, 1 << 20) == (0, 1, _stream.STREAM_EOF)


def test_a_peer_gone_before_the_reply_is_a_send_error_not_a_signal(pair):
    server, client = pair
    client.sendall(packet(ECHO, b"x" * 100))
    client.close()
    filled, answered, error = _stream.echo(server.fileno(), bytearray(4096), 0, 1 << 20)
    assert (answered, error) == (0, errno.EPIPE)  # MSG_NOSIGNAL: no SIGPIPE killed us


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        _stream.echo(0, bytearray(8), 9, 1)
    with pytest.raises(TypeError):
        _stream.echo(0, b"read-only", 0, 1)
