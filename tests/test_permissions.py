"""Another user can neither attach to nor tear down a ring, a semaphore or the socket; the
--group-access option lets exactly the server's group in.

The test creates throwaway users and a group (so it needs root) and runs the probes as them
with setpriv. The probes use the system python3 and plain open(2)/connect(2): that is what
shm_open (open of /dev/shm/NAME) and sem_open (open of /dev/shm/sem.NAME) do underneath, and
the project's own interpreter may sit under a home directory other users cannot enter.
"""
from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from conftest import OTHER_USERS, SYSTEM_PYTHON, Server, ring_objects, stop_all
from shmserve.client import RingClient

pytestmark = OTHER_USERS

PROBE = r"""
import errno, json, mmap, os, socket, sys
name, sock_path, mode = sys.argv[1:4]
shm = "/dev/shm/shmserve." + name

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def attach():  # what a client does first: open read-write and map the ring
    fd = os.open(shm, os.O_RDWR | os.O_NOFOLLOW)
    try:
        ring = mmap.mmap(fd, 0)
        magic = ring[:8]
        ring.close()
    finally:
        os.close(fd)
    if magic != b"SHMSRING":
        raise OSError(errno.EBADMSG, "mapped, but not a ring")

def open_rw(path):
    os.close(os.open(path, os.O_RDWR | os.O_NOFOLLOW))

def socket_echo():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(sock_path)
        s.sendall(b"\x00\x00\x00\x03\x00hi")
        reply = b""
        while len(reply) < 7:
            chunk = s.recv(7 - len(reply))
            if not chunk:
                raise OSError(errno.ECONNRESET, "closed")
            reply += chunk
    finally:
        s.close()
    if reply != b"\x00\x00\x00\x03\x00hi":
        raise OSError(errno.EBADMSG, repr(reply))

results = {
    "attach ring": attempt(attach),
    "read ring": attempt(lambda: os.close(os.open(shm, os.O_RDONLY))),
    "request semaphore": attempt(lambda: open_rw("/dev/shm/sem.shmserve." + name + ".req")),
    "slot semaphore": attempt(lambda: open_rw("/dev/shm/sem.shmserve." + name + ".s0")),
    "liveness lock": attempt(lambda: os.close(os.open(shm + ".lock", os.O_RDONLY))),
    "socket echo": attempt(socket_echo),
}
if mode == "destroy":
    results.update({
        "unlink ring": attempt(lambda: os.unlink(shm)),
        "unlink semaphore": attempt(lambda: os.unlink("/dev/shm/sem.shmserve." + name + ".req")),
        "unlink lock": attempt(lambda: os.unlink(shm + ".lock")),
        "unlink socket": attempt(lambda: os.unlink(sock_path)),
    })
print(json.dumps(results))
"""

ACCESS = ["attach ring", "read ring", "request semaphore", "slot semaphore", "liveness lock",
          "socket echo"]


class ServerWithGroup(Server):
    """A server whose effective group is ``gid``: the group its objects are created with."""

    def __init__(self, gid: int, *args: str):
        super().__init__("--model", "echo", "--transport", "shm,unix", "--slots", "4", *args,
                         ready_timeout=60,
                         command_prefix=("setpriv", f"--regid={gid}", "--clear-groups"))


@pytest.fixture
def group_server(accounts):
    servers = []

    def start(*args):
        server = ServerWithGroup(accounts["gid"], *args)
        servers.append(server)
        return server

    yield start
    stop_all(servers)


def probe(user: str, server, mode: str = "look") -> dict:
    done = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                           "--init-groups", SYSTEM_PYTHON, "-I", "-c", PROBE, server.name,
                           server.socket, mode], capture_output=True, text=True, timeout=30,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_other_users_cannot_attach_or_remove_anything(accounts, group_server):
    server = group_server()
    before = ring_objects(server.name)
    for user in (accounts["member"], accounts["outsider"]):  # owner-only: the group is out too
        results = probe(user, server, "destroy")
        assert {k: v for k, v in results.items() if k in ACCESS} == \
            {k: "EACCES" for k in ACCESS}, (user, results)
        # /dev/shm and /tmp are sticky: only an object's owner may unlink it.
        assert {k: v for k, v in results.items() if k.startswith("unlink")} == \
            {k: "EPERM" for k in results if k.startswith("unlink")}, (user, results)
    assert ring_objects(server.name) == before and os.path.exists(server.socket)
    client = RingClient(server.name)
    assert client.generation == int(server.ready["shm"]["generation"], 16)
    assert client.echo(b"untouched") == b"untouched"
    client.close()


def test_group_access_admits_the_group_and_no_one_else(accounts, group_server):
    server = group_server("--group-access")
    for path in [f"/dev/shm/shmserve.{server.name}", f"/dev/shm/sem.shmserve.{server.name}.req",
                 f"/dev/shm/shmserve.{server.name}.lock", server.socket]:
        info = os.stat(path)
        assert (info.st_mode & 0o777, info.st_gid) == (0o660, accounts["gid"]), path
    assert probe(accounts["member"], server) == {k: "ok" for k in ACCESS}
    assert probe(accounts["outsider"], server) == {k: "EACCES" for k in ACCESS}
