"""The Unix socket and TCP transports against connection floods and bad names: idle
connections time out, one user's connections fill only that user's share, refusals are
logged at a bounded rate, and a name or socket path that could escape is refused at start."""
from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time

import pytest

from conftest import OTHER_USERS, REPO, SYSTEM_PYTHON
from shmserve.client import PacketClient

ECHO_PACKET = b"\x00\x00\x00\x03\x00hi"  # length 3: type ECHO, body "hi"


def other_users(test):
    """Only where throwaway users can be made (root, setpriv)."""
    for mark in OTHER_USERS:
        test = mark(test)
    return test


def echo_over_tcp(port: int, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(ECHO_PACKET)
        reply = b""
        while len(reply) < len(ECHO_PACKET):
            chunk = s.recv(64)
            if not chunk:
                break
            reply += chunk
        return reply


def test_an_idle_connection_is_closed_after_the_idle_timeout(start_server):
    server = start_server("--model", "echo", "--transport", "unix", "--idle-timeout", "1")
    idle = socket.socket(socket.AF_UNIX)
    idle.settimeout(10)
    idle.connect(server.socket)
    started = time.monotonic()
    assert idle.recv(1) == b""  # the server closed it
    assert 0.8 < time.monotonic() - started < 5
    idle.close()
    client = PacketClient(server.socket)
    assert client.call(0, b"still here") == (0, b"still here")
    client.close()


FLOOD = r"""
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@other_users
def test_another_users_idle_connections_fill_only_its_own_share(accounts, start_server):
    """1100 idle connections used to lock out every later client; now the flooder's extra
    connections are refused and everyone else is served."""
    server = start_server("--model", "echo", "--transport", "tcp", "--tcp-port", "0",
                          "--max-connections", "64", "--max-peer-connections", "8")
    port = server.ready["tcp"]["port"]
    outsider = accounts["outsider"]
    flooder = subprocess.Popen(
        ["setpriv", f"--reuid={outsider}", f"--regid={pwd.getpwnam(outsider).pw_gid}",
         "--clear-groups", SYSTEM_PYTHON, "-I", "-c", FLOOD, str(port), "200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout.readline().strip() == "ready", flooder.stderr.read()
        for _ in range(5):
            assert echo_over_tcp(port) == ECHO_PACKET
    finally:
        flooder.stdin.close()
        flooder.wait(timeout=10)
    # 192 refusals in a burst: a handful of warnings, the rest counted in the next one.
    refusals = [line for line in server.stderr.splitlines() if "refusing connection" in line]
    assert 1 <= len(refusals) <= 3, refusals
    assert f"uid {pwd.getpwnam(outsider).pw_uid} holds 8" in refusals[0]


@other_users
def test_tcp_peers_owner_serves_only_this_servers_user(accounts, start_server):
    server = start_server("--model", "echo", "--transport", "tcp", "--tcp-port", "0",
                          "--tcp-peers", "owner")
    port = server.ready["tcp"]["port"]
    assert echo_over_tcp(port) == ECHO_PACKET
    outsider = accounts["outsider"]
    probe = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
             f"s.sendall({ECHO_PACKET!r})\nprint(repr(s.recv(64)))")
    done = subprocess.run(["setpriv", f"--reuid={outsider}",
                           f"--regid={pwd.getpwnam(outsider).pw_gid}", "--clear-groups",
                           SYSTEM_PYTHON, "-I", "-c", probe], capture_output=True, text=True,
                          timeout=30)
    # Closed without a reply (or reset while sending).
    assert done.stdout.strip() == "b''" or "ConnectionResetError" in done.stderr, \
        (done.stdout, done.stderr)


def serve_fails(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shmserve.cli", "serve", "--model", "echo",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    return done.stderr


@pytest.mark.parametrize("name", ["tq/../t-trav", "t\n", "..", "t x"])
def test_a_name_that_could_escape_the_socket_path_is_refused_without_shm(name, tmp_path):
    stderr = serve_fails("--transport", "unix", "--name", name)
    assert "--name" in stderr or "name" in stderr.lower(), stderr
    assert not os.path.exists("/tmp/t-trav.sock")


@other_users
def test_a_socket_inside_another_users_directory_is_refused(accounts):
    outsider = accounts["outsider"]
    directory = f"/tmp/shmserve-foreign-{os.getpid()}"
    subprocess.run(["setpriv", f"--reuid={outsider}", f"--regid={pwd.getpwnam(outsider).pw_gid}",
                    "--clear-groups", SYSTEM_PYTHON, "-I", "-c",
                    f"import os; os.mkdir({directory!r}, 0o755)"], check=True, timeout=30)
    try:
        stderr = serve_fails("--transport", "unix", "--socket", f"{directory}/s.sock")
        assert f"owned by uid {pwd.getpwnam(outsider).pw_uid}" in stderr, stderr
        assert os.listdir(directory) == []
    finally:
        os.rmdir(directory)
