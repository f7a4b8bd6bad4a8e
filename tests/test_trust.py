"""Another local user attacks a sidecar (spec section 6.1): plants or flocks its ring's lock,
links the lock elsewhere, squats its socket directory, serves a ring or a socket under the
name a client dials. Every attack is made by a real second user.

Servers run as throwaway users too, with one capability added (CAP_DAC_READ_SEARCH, ambient)
so they can execute the project's interpreter under /root; it grants reading, not writing,
owning or unlinking, so what they may do in /dev/shm and /tmp is what any user may.
"""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys

import pytest

from conftest import OTHER_USERS, REPO, SYSTEM_PYTHON, Server, ring_objects, stop_all
from shmserve import layout as L

pytestmark = OTHER_USERS

CAN_READ = ("--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")


def as_user(user: str, *caps: str) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--clear-groups", *caps)


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


class Attacker:
    """A process of another user that does something, says so on stdout, and keeps what it
    holds (an flock, a listening socket) until the test ends."""

    def __init__(self, user: str, script: str, *args: str):
        self.process = subprocess.Popen([*as_user(user), SYSTEM_PYTHON, "-I", "-c", script, *args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd="/")
        line = self.process.stdout.readline()
        assert line.strip() == "ready", self.process.stderr.read()

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture
def attackers():
    started = []

    def start(user, script, *args):
        attacker = Attacker(user, script, *args)
        started.append(attacker)
        return attacker

    yield start
    for attacker in started:
        attacker.stop()


@pytest.fixture
def ring_name(request):
    name = f"tr{os.getpid()}{abs(hash(request.node.name)) % 10**6}"
    yield name
    for path in ring_objects(name) + [L.lock_path(name, "/dev/shm")]:
        if os.path.lexists(path):
            os.unlink(path)


def serve_as(user: str, *args: str) -> subprocess.CompletedProcess:
    """`shmserve serve` as ``user``, expected to refuse to start."""
    done = subprocess.run([*as_user(user, *CAN_READ), sys.executable, "-m", "shmserve.cli",
                           "serve", "--model", "echo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    return done


FLOCK_LOCK = r"""
import fcntl, os, sys
path, mode = sys.argv[1], int(sys.argv[2], 8)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
os.fchmod(fd, mode)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("mode", ["644", "666"])
def test_a_lock_another_user_planted_and_flocked_is_named_not_taken_for_a_live_server(
        accounts, attackers, ring_name, mode):
    lock = L.lock_path(ring_name, "/dev/shm")
    attackers(accounts["outsider"], FLOCK_LOCK, lock, mode)
    done = serve_as(accounts["member"], "--transport", "shm", "--name", ring_name)
    message = done.stderr.strip().splitlines()[-1]
    assert "served by another live process" not in message
    assert f"owned by uid {uid(accounts['outsider'])}" in message and "--name" in message, message
    assert not [p for p in ring_objects(ring_name) if p != lock]  # nothing half made


def test_root_removes_a_planted_flocked_lock_and_serves(accounts, attackers, ring_name):
    lock = L.lock_path(ring_name, "/dev/shm")
    attackers(accounts["outsider"], FLOCK_LOCK, lock, "666")
    server = Server("--model", "echo", "--transport", "shm", "--slots", "2", name=ring_name)
    try:
        info = os.lstat(lock)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert server.ready["shm"]["name"] == ring_name
    finally:
        stop_all([server])


LINK_LOCK = r"""
import os, sys
os.symlink(sys.argv[2], sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_symlinked_lock_is_never_followed(accounts, attackers, ring_name, tmp_path):
    """The link points at a file of the server's own user: a server that followed it would
    flock it and chmod it to 0600."""
    member = accounts["member"]
    target = f"/tmp/shmserve-trust-target-{ring_name}"
    subprocess.run([*as_user(member), SYSTEM_PYTHON, "-c",
                    f"import os; os.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY, 0o644))"],
                   check=True, timeout=30)
    try:
        lock = L.lock_path(ring_name, "/dev/shm")
        attackers(accounts["outsider"], LINK_LOCK, lock, target)
        done = serve_as(member, "--transport", "shm", "--name", ring_name)
        assert "is a symlink" in done.stderr, done.stderr
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
        assert os.path.islink(lock)  # not ours to remove
        # Root may remove it, and does, without touching the target either.
        server = Server("--model", "echo", "--transport", "shm", "--slots", "2",
                        name=ring_name)
        try:
            assert not os.path.islink(lock) and os.lstat(lock).st_uid == 0
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
        finally:
            stop_all([server])
    finally:
        os.unlink(target)


SQUAT_DIR = r"""
import os, sys
os.mkdir(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_socket_directory_another_user_made_first_is_refused(accounts, attackers, ring_name):
    member = accounts["member"]
    directory = f"/tmp/shmserve-{uid(member)}"  # the member's default socket directory
    assert not os.path.exists(directory)
    try:
        attackers(accounts["outsider"], SQUAT_DIR, directory)
        done = serve_as(member, "--transport", "unix", "--name", ring_name)
        assert f"owned by uid {uid(accounts['outsider'])}" in done.stderr, done.stderr
        assert os.listdir(directory) == []  # no socket was bound where the squatter reads
    finally:
        os.rmdir(directory)


ECHO_SOCKET = r"""
import os, socket, sys, threading
path = sys.argv[1]
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o777)
listener.listen()

def answer(conn):  # echoes every packet back, so the client has no other reason to refuse
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return conn.close()
        data += chunk
        while len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
            size = 4 + int.from_bytes(data[:4], "big")
            conn.sendall(data[:size])
            data = data[size:]

def serve():
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()

threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
os.unlink(path)
"""


def test_the_go_client_refuses_a_socket_another_user_serves(accounts, attackers, shmclient,
                                                            tmp_path):
    outsider = accounts["outsider"]
    path = f"/tmp/shmserve-trust-{os.getpid()}.sock"
    attackers(outsider, ECHO_SOCKET, path)
    refused = subprocess.run([shmclient, "echo", "-addr", f"unix://{path}", "hello"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "hello" not in refused.stdout
    assert f"uid {uid(outsider)}" in refused.stderr, refused.stderr
    # The same socket, trusted by name, answers: the refusal above was the uid check.
    trusted = subprocess.run([shmclient, "echo", "-addr", f"unix://{path}", "-server-uid",
                              str(uid(outsider)), "hello"], capture_output=True, text=True,
                             timeout=60)
    assert trusted.returncode == 0 and "hello" in trusted.stdout, trusted.stderr


def test_the_go_client_refuses_a_ring_another_user_serves(accounts, shmclient, ring_name):
    """A real server of another user under the name the client dials: the client never sends
    it anything unless told that uid is the one it trusts."""
    outsider = accounts["outsider"]
    server = Server("--model", "echo", "--transport", "shm", "--slots", "2", name=ring_name,
                    command_prefix=as_user(outsider, *CAN_READ))
    try:
        assert os.lstat(f"/dev/shm/shmserve.{ring_name}").st_uid == uid(outsider)
        refused = subprocess.run([shmclient, "echo", "-addr", f"shm://{ring_name}", "hello"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "hello" not in refused.stdout
        assert f"uid {uid(outsider)}" in refused.stderr, refused.stderr
        trusted = subprocess.run([shmclient, "echo", "-addr", f"shm://{ring_name}",
                                  "-server-uid", str(uid(outsider)), "hello"],
                                 capture_output=True, text=True, timeout=60)
        assert trusted.returncode == 0 and "hello" in trusted.stdout, trusted.stderr
    finally:
        stop_all([server])
