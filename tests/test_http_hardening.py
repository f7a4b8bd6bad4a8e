"""Regression tests, against a real server, for the HTTP transport's hardening
(shmserve/transports/http.py): hostile JSON, request heads that are endless, slow or never
finished, connection caps, WebSocket upgrades, what /healthz tells every local user, and a
streaming client that goes away."""
import http.client
import json
import os
import re
import socket
import threading
import time

import pytest

from conftest import Server, stop_all

MAX_HEADER_BYTES = 65536
HEADER_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server():
    server = Server("--model", "echo", "--transport", "http", "--port", "0",
                    "--max-header-bytes", str(MAX_HEADER_BYTES),
                    "--header-timeout", str(HEADER_TIMEOUT_S))
    yield server
    stop_all([server])


def address(server) -> tuple[str, int]:
    return server.ready["http"]["host"], server.ready["http"]["port"]


def request(server, method, path, body=None, headers=None, timeout=5.0):
    connection = http.client.HTTPConnection(*address(server), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        connection.close()


def connect(server, timeout=5.0) -> socket.socket:
    return socket.create_connection(address(server), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes: (bytes, whether it ended in a reset).
    A server that closes with our bytes still unread resets the connection, and Linux then
    drops what it had sent us, so a reset may stand for the reply too. Raises
    socket.timeout if the server keeps the connection open past ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def error_name(content_type, body) -> str:
    assert content_type == "application/json", (content_type, body[:200])
    error = json.loads(body)["error"]
    assert set(error) == {"code", "name", "message"} and isinstance(error["code"], int)
    return error["name"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def tcp_buffer_max(name: str) -> int:
    """The most a TCP socket buffer may autotune to (net.ipv4.NAME's third field)."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 32 * 1024 * 1024


def healthz_seconds(server) -> float:
    started = time.monotonic()
    status, _, body = request(server, "GET", "/healthz", timeout=5)
    assert status == 200 and json.loads(body)["status"] == "ready"
    return time.monotonic() - started


# -- hostile JSON --------------------------------------------------------------------------

# The escapes are JSON text: json.loads turns them into lone surrogates, which no UTF-8
# encoder takes, so the server must refuse them before it encodes the prompt.
@pytest.mark.parametrize("path", ["/echo", "/prompt"])
@pytest.mark.parametrize("escaped", [r"\ud800", r"\udfff", r"ok \ud83d then"])
def test_lone_surrogate_escape_is_a_json_invalid_utf8_400(server, path, escaped):
    body = b'{"prompt": "' + escaped.encode("ascii") + b'", "sampling_steps": 3}'
    status, content_type, data = request(server, "POST", path, body)
    assert status == 400, data
    assert error_name(content_type, data) == "INVALID_UTF8"


def test_escaped_surrogate_pair_is_still_a_valid_prompt(server):
    # The surrogate check must not refuse a well-formed pair (one astral character).
    status, _, data = request(server, "POST", "/echo", rb'{"prompt": "smile \ud83d\ude00"}')
    assert status == 200 and json.loads(data) == {"echo_prompt": "smile \U0001F600"}


@pytest.mark.parametrize("path", ["/echo", "/prompt", "/v2/models/echo/infer"])
def test_json_nested_too_deep_is_a_400_and_the_server_keeps_serving(server, path):
    deep = b"[" * 100000 + b"]" * 100000
    status, content_type, data = request(server, "POST", path, deep, timeout=10)
    assert status == 400, data[:300]
    assert content_type == "application/json"
    if path.startswith("/v2"):  # KServe clients read errors as {"error": "NAME: message"}
        assert json.loads(data)["error"].startswith("BAD_ARGUMENT: ")
    else:
        assert error_name(content_type, data) == "BAD_ARGUMENT"
    status, _, data = request(server, "POST", "/echo", json.dumps({"prompt": "still here"}))
    assert status == 200 and json.loads(data) == {"echo_prompt": "still here"}


# -- request heads -------------------------------------------------------------------------

def test_header_over_max_header_bytes_gets_431(server):
    sock = connect(server)
    try:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: "
        sock.sendall(head + b"a" * (MAX_HEADER_BYTES - len(head)))
        # Let the server read the first 64 KiB alone: the read that crosses the limit then
        # holds all we sent, so it closes with nothing unread and the 431 reaches us.
        time.sleep(0.2)
        sock.sendall(b"a" * 100)
        raw, reset = read_until_closed(sock, timeout=3)
    finally:
        sock.close()
    assert not reset and raw, "the server should answer 431, not hang up silently"
    status, headers, body = parse_response(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert error_name(headers["content-type"], body) == "TOO_LARGE"
    assert healthz_seconds(server) < 1


def test_endless_header_line_is_cut_off_without_stalling_or_bloating_the_server(start_server):
    # The default --header-timeout (10 s): the size limit, not the clock, must end this.
    server = start_server("--model", "echo", "--transport", "http", "--port", "0",
                          "--max-header-bytes", str(MAX_HEADER_BYTES))
    rss_before = rss_bytes(server.pid)
    sock = connect(server)
    # More than the server's receive buffer and our send buffer can ever hold together: the
    # sender must still be sending when the server hangs up, or we could not tell a server
    # that cut the line off from one that swallowed it whole.
    most = tcp_buffer_max("tcp_rmem") + tcp_buffer_max("tcp_wmem") + 16 * 1024 * 1024
    sent, send_error = [0], []

    def flood():
        chunk = b"a" * 65536
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
            while sent[0] < most:
                sock.sendall(chunk)
                sent[0] += len(chunk)
        except OSError as exc:  # the server closing on us is the point
            send_error.append(exc)

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        started = time.monotonic()
        flooder.start()
        # Another client is served at once while the flood is on.
        assert healthz_seconds(server) < 1
        flooder.join(timeout=15)
        assert not flooder.is_alive(), f"the server stopped reading after {sent[0]} bytes"
        assert send_error, f"the server took all {sent[0]} bytes of one header line"
        assert time.monotonic() - started < 3, "cut off by the header timeout, not its size"
        raw, _ = read_until_closed(sock, timeout=3)
        if raw:
            assert parse_response(raw)[0] == 431
    finally:
        sock.close()
    grown = rss_bytes(server.pid) - rss_before
    assert grown < 100 * 1024 * 1024, f"server RSS grew by {grown / 2**20:.0f} MiB"
    assert healthz_seconds(server) < 1


def test_partial_head_gets_408_after_header_timeout(server):
    sock = connect(server)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        raw, reset = read_until_closed(sock, timeout=HEADER_TIMEOUT_S + 2)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert not reset
    status, headers, body = parse_response(raw)
    assert status == 408
    assert error_name(headers["content-type"], body) == "BAD_LENGTH"
    assert waited >= HEADER_TIMEOUT_S * 0.8, "closed before --header-timeout"


def test_connection_that_sends_nothing_is_closed_after_header_timeout(server):
    sock = connect(server)
    try:
        started = time.monotonic()
        raw, _ = read_until_closed(sock, timeout=HEADER_TIMEOUT_S + 2)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert raw == b""  # nothing was asked, so nothing is answered
    assert waited >= HEADER_TIMEOUT_S * 0.8


def test_keep_alive_connection_idles_past_the_header_timeout_then_gets_a_fresh_one(server):
    sock = connect(server)
    try:
        for pause in (0, HEADER_TIMEOUT_S * 2):
            # Idle between requests is --idle-timeout's (60 s by default), not the head's.
            time.sleep(pause)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"the server closed a keep-alive connection idle for {pause} s"
                reply += chunk
            assert parse_response(reply)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        raw, reset = read_until_closed(sock, timeout=HEADER_TIMEOUT_S + 2)
    finally:
        sock.close()
    assert not reset and parse_response(raw)[0] == 408


# -- connection caps -----------------------------------------------------------------------

# Every connection here comes from one local user, so one peer; the second case makes the
# total cap the tighter one.
@pytest.mark.parametrize("flags, refusal", [
    (("--max-connections", "4", "--max-peer-connections", "2"), "--max-peer-connections 2"),
    (("--max-connections", "2", "--max-peer-connections", "4"), "--max-connections 2"),
])
def test_connection_over_the_cap_is_closed_at_once(start_server, flags, refusal):
    server = start_server("--model", "echo", "--transport", "http", "--port", "0", *flags)
    idle = [connect(server), connect(server)]
    try:
        extra = connect(server)
        try:
            raw, _ = read_until_closed(extra, timeout=2)
        finally:
            extra.close()
        assert raw == b""  # refused before any request: no HTTP reply, just closed
        for sock in idle:  # the admitted ones stay open
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        assert "refusing connection" in server.stderr and refusal in server.stderr
    finally:
        for sock in idle:
            sock.close()
    # The places come back once the server sees the idle ones go.
    deadline = time.monotonic() + 3
    while True:
        try:
            status, _, data = request(server, "POST", "/echo", json.dumps({"prompt": "again"}))
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert status == 200 and json.loads(data) == {"echo_prompt": "again"}


# -- WebSocket upgrade ---------------------------------------------------------------------

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


def test_websocket_upgrade_is_served_as_plain_http(server):
    status, content_type, data = request(server, "GET", "/", headers=UPGRADE)
    assert status == 404, data
    assert error_name(content_type, data) == "UNKNOWN_TYPE"
    status, _, data = request(server, "GET", "/healthz", headers=UPGRADE)
    assert status == 200 and json.loads(data)["status"] == "ready"


def test_upgrade_requests_do_not_flood_the_log(server):
    for _ in range(5):
        request(server, "GET", "/", headers=UPGRADE)
    assert "Unsupported upgrade request" not in server.stderr
    assert "WebSocket" not in server.stderr


# -- /healthz ------------------------------------------------------------------------------

def test_healthz_does_not_disclose_the_model_path(start_server):
    server = start_server("--model", "cifar", "--transport", "http", "--port", "0")
    path = server.ready.model["path"]
    assert path.endswith("cifar10_cnn.tflite")  # describe() has it; /healthz must not
    status, content_type, data = request(server, "GET", "/healthz")
    assert status == 200 and content_type == "application/json"
    assert json.loads(data) == {"status": "ready", "model": "cifar"}
    text = data.decode()
    assert "cifar10_cnn" not in text and os.path.dirname(path) not in text


# -- a streaming client that goes away -----------------------------------------------------

STREAM_STEPS = 64  # ~0.5 s of streamed tokens with the tiny model: closing after the first
# chunk lands well before the generation ends


@pytest.fixture(scope="module")
def gemma_server(tiny_gemma_dir, tmp_path_factory):
    server = Server("--model", "gemma", "--variant", "tiny", "--cache-length", "128",
                    "--max-new-tokens", str(STREAM_STEPS), "--transport", "http", "--port", "0",
                    "--checkpoint", os.path.join(tiny_gemma_dir, "checkpoint"),
                    "--tokenizer", os.path.join(tiny_gemma_dir, "tokenizer.model"),
                    ready_timeout=300, env={"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("c"))})
    yield server
    stop_all([server])


def prompt_stream_outcomes(server) -> dict[str, float]:
    status, _, data = request(server, "GET", "/metrics")
    assert status == 200
    pattern = re.compile(r'^shmserve_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)
    outcomes = {}
    for match in pattern.finditer(data.decode()):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("transport") == "http" and labels.get("type") == "PROMPT_STREAM":
            outcomes[labels["outcome"]] = float(match["value"])
    return outcomes


def test_streaming_client_that_disconnects_is_cancelled(gemma_server):
    before = prompt_stream_outcomes(gemma_server)
    body = json.dumps({"prompt": "Hello there", "sampling_steps": STREAM_STEPS,
                       "stream": True}).encode()
    sock = connect(gemma_server, timeout=60)
    try:
        sock.sendall(b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b'{"chunk"' not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert parse_response(received)[0] == 200
    finally:
        sock.close()
    # The model notices the client left (Request.cancelled) and ends the request as
    # CANCELLED rather than as a reply delivered to nobody.
    deadline = time.monotonic() + 15
    while True:
        after = prompt_stream_outcomes(gemma_server)
        if after.get("CANCELLED", 0) > before.get("CANCELLED", 0):
            break
        assert after.get("OK", 0) == before.get("OK", 0), "the stream ended as delivered"
        assert time.monotonic() < deadline, f"no CANCELLED stream counted: {after}"
        time.sleep(0.05)
    assert after.get("OK", 0) == before.get("OK", 0)
    status, _, data = request(gemma_server, "POST", "/prompt", json.dumps(
        {"prompt": "Hello there", "sampling_steps": 4}), timeout=60)
    assert status == 200 and json.loads(data)["response"]
