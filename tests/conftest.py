"""Fixtures that start a real ``shmserve serve`` process and always clean up after it."""
from __future__ import annotations

import glob
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ring_objects(name: str) -> list[str]:
    return sorted(glob.glob(f"/dev/shm/shmserve.{name}*") + glob.glob(f"/dev/shm/sem.shmserve.{name}.*"))


class Server:
    def __init__(self, *args: str, ready_timeout: float = 120.0, env=None):
        self.name = f"t{os.getpid()}-{secrets.token_hex(3)}"
        self.socket = f"/tmp/shmserve-test-{self.name}.sock"
        self.argv = [sys.executable, "-m", "shmserve.cli", "serve", "--name", self.name,
                     "--socket", self.socket, *args]
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.ready = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
        self.kill()
        raise TimeoutError("server did not report ready")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.stdout.close()
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def remove_leftovers(name: str) -> None:
    for path in ring_objects(name):
        os.unlink(path)


@pytest.fixture
def start_server():
    servers = []

    def start(*args, **kwargs) -> Server:
        server = Server(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    stop_all(servers)


def stop_all(servers) -> None:
    """Kill each server and remove whatever it left, whether or not its test passed."""
    for server in servers:
        server.kill()
        remove_leftovers(server.name)
        if os.path.exists(server.socket):
            os.unlink(server.socket)


@pytest.fixture(scope="module")
def echo_server():
    server = Server("--model", "echo", "--transport", "shm,uds,tcp", "--tcp-port", "0",
                    "--slot-reply-bytes", "4096", "--slots", "16")
    yield server
    stop_all([server])


@pytest.fixture(scope="session")
def shmclient(tmp_path_factory) -> str:
    """The Go command-line client, built once per test session."""
    binary = str(tmp_path_factory.mktemp("go") / "shmclient")
    built = subprocess.run(["go", "build", "-o", binary, "./cmd/shmclient"],
                           cwd=os.path.join(REPO, "goclient"), capture_output=True, text=True,
                           timeout=600, env={**os.environ, "CGO_ENABLED": "1"})
    assert built.returncode == 0, f"go build ./cmd/shmclient failed:\n{built.stderr}"
    return binary


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> str:
    """A tiny random Gemma checkpoint + tokenizer made by our own command, once per session."""
    out = str(tmp_path_factory.mktemp("tiny-gemma"))
    made = subprocess.run([sys.executable, "-m", "shmserve.cli", "make-tiny-gemma", out],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    return out


def parse_replies(data: bytes) -> list:
    """Packets back to back -> [(type, body or the ERROR code)]."""
    from shmserve.protocol import MsgType, decode_error, decode_packet
    replies, offset = [], 0
    while offset < len(data):
        msg_type, body, used = decode_packet(memoryview(data)[offset:])
        replies.append((msg_type, decode_error(body)[0] if msg_type == MsgType.ERROR else body))
        offset += used
    return replies
