"""Fixtures that start a real ``shmserve serve`` process and always clean up after it."""
from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys

import pytest

from shmserve import layout as L
from shmserve.launch import ServerProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ring_objects(name: str) -> list[str]:
    return L.ring_files(name)


class Server(ServerProcess):
    """A test server: a ring name of its own, its socket under the system temp dir, stderr
    readable as ``server.stderr`` once it is running or after it stopped."""

    def __init__(self, *args: str, ready_timeout: float = 120.0, env=None,
                 command_prefix: tuple[str, ...] = (), name: str | None = None):
        super().__init__(*args, ready_timeout=ready_timeout, env=env, cwd=REPO, name=name,
                         name_prefix="t", command_prefix=command_prefix)

    @property
    def stderr(self) -> str:
        return self.stderr_text()


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
        server.cleanup()


@pytest.fixture(scope="module")
def echo_server():
    server = Server("--model", "echo", "--transport", "shm,unix,tcp", "--tcp-port", "0",
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


# Tests that run probes as other, throwaway users (created and removed here). The probes use
# the system python3 and plain system calls: the project's interpreter may sit under a home
# directory other users cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"
OTHER_USERS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test creates throwaway "
                       "users with useradd and switches to them with setpriv"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("useradd", "userdel", "groupadd",
                                                          "groupdel", "setpriv")),
                       reason="needs useradd, userdel, groupadd, groupdel and setpriv"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK),
                       reason=f"needs {SYSTEM_PYTHON} for the probes run as another user"),
]


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def accounts():
    """A group, a user in it and a user outside it; all removed afterwards, pass or fail."""
    tag = secrets.token_hex(3)
    group, member, outsider = f"shmtg{tag}", f"shmtm{tag}", f"shmto{tag}"
    created_users, created_group = [], False
    try:
        run("groupadd", group)
        created_group = True
        for user, extra in ((member, ["-G", group]), (outsider, [])):
            run("useradd", "-M", "-N", "-g", "nogroup" if _has_group("nogroup") else "users",
                "-s", "/usr/sbin/nologin", *extra, user)
            created_users.append(user)
        yield {"group": group, "gid": grp.getgrnam(group).gr_gid, "member": member,
               "outsider": outsider}
    finally:
        for user in created_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=30)
        if created_group:
            subprocess.run(["groupdel", group], capture_output=True, timeout=30)
        for user in (member, outsider):
            with pytest.raises(KeyError):
                pwd.getpwnam(user)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
