"""Start, stop, crash, restart, name clashes, permissions, dead clients, cancellation."""
import mmap
import os
import signal
import struct
import subprocess
import sys
import time

import posix_ipc
import pytest

from conftest import REPO, ring_objects
from shmserve import layout as L
from shmserve.client import RingClient, ServerError
from shmserve.protocol import ErrorCode, MsgType


def test_sigterm_removes_every_object(start_server):
    server = start_server("--model", "echo", "--transport", "shm,unix")
    assert len(ring_objects(server.name)) == 2 + 1 + 64  # shm, lock, req sem, 64 slot sems
    assert server.stop() == 0
    assert ring_objects(server.name) == []
    assert not os.path.exists(server.socket)


def test_sigkill_then_restart_cleans_stale_objects_and_changes_generation(start_server):
    first = start_server("--model", "echo", "--transport", "shm,unix")
    first.stop(signal.SIGKILL)
    assert ring_objects(first.name)  # a SIGKILLed server cannot clean up...
    second = start_server("--model", "echo", "--transport", "shm,unix", "--name", first.name,
                          "--socket", first.socket)
    assert second.ready["shm"]["generation"] != first.ready["shm"]["generation"]
    client = RingClient(first.name)
    assert client.echo(b"after restart") == b"after restart"
    client.close()
    assert second.stop() == 0
    assert ring_objects(first.name) == []  # ...the next one removes what it left


def test_second_server_with_the_same_name_is_refused(start_server):
    first = start_server("--model", "echo", "--transport", "shm")
    clash = subprocess.run([sys.executable, "-m", "shmserve.cli", "serve", "--model", "echo",
                            "--transport", "shm", "--name", first.name], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert clash.returncode == 2
    assert "served by another live process" in clash.stderr
    client = RingClient(first.name)
    assert client.echo(b"unharmed") == b"unharmed"
    client.close()


def test_group_access_widens_to_0660(start_server):
    server = start_server("--model", "echo", "--transport", "shm,unix", "--group-access")
    for path in (f"/dev/shm/shmserve.{server.name}", f"/dev/shm/sem.shmserve.{server.name}.s3",
                 server.socket):
        assert os.stat(path).st_mode & 0o777 == 0o660


CLAIM_AND_HANG = r"""
import mmap, os, sys, time
import posix_ipc
from shmserve import layout as L
name, slot_offset, req_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shm = posix_ipc.SharedMemory(L.shm_name(name))
mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
words32, words64 = memoryview(mm).cast("I"), memoryview(mm).cast("Q")
words32[(slot_offset + L.S_OWNER) // 4] = os.getpid()
L.write_request_fields(mm, slot_offset, 77, req_len, 0)  # ECHO
words32[(slot_offset + L.S_REQ_SEQ) // 4] += 1
words64[L.H_DOORBELL // 8] += 1
posix_ipc.Semaphore(L.request_sem_name(name)).release()
print("claimed", flush=True)
time.sleep(60)                                             # never acks: a hung, then dead client
"""


def test_dead_client_slot_is_reclaimed(start_server):
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "2",
                          "--slot-reply-bytes", "64")
    geometry = L.Geometry(2, L.DEFAULT_REQ_CAPACITY, 64)
    slot = geometry.slot_offset(1)
    hung = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, server.name, str(slot),
                             "1000"], stdout=subprocess.PIPE, text=True)
    assert hung.stdout.readline().strip() == "claimed"
    shm = posix_ipc.SharedMemory(L.shm_name(server.name))
    mm = mmap.mmap(shm.fd, geometry.total_size)
    shm.close_fd()
    owner = lambda: struct.unpack_from("<I", mm, slot + L.S_OWNER)[0]
    time.sleep(0.3)
    assert owner() == hung.pid  # alive: its multi-frame reply waits for an ack
    hung.kill()
    hung.wait()
    deadline = time.monotonic() + 3
    while owner() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner() == 0, "slot not reclaimed within 3 s of the client's death"
    mm.close()
    client = RingClient(server.name, slots=range(1, 2))  # the reclaimed slot works again
    assert client.echo(b"x" * 500) == b"x" * 500
    client.close()


def test_cancel_mid_reply_gets_a_final_cancelled_frame(start_server):
    server = start_server("--model", "echo", "--transport", "shm", "--slot-reply-bytes", "64")
    client = RingClient(server.name)
    frames = client.frames(MsgType.ECHO, b"y" * 1000)
    assert next(frames) == (MsgType.ECHO, b"y" * 64)
    # Cancel instead of acknowledging: cancel_seq = req_seq of the slot in use.
    slot = next(s for s in range(64)
                if struct.unpack_from("<I", client.mm, client.geometry.slot_offset(s))[0])
    base = client.geometry.slot_offset(slot)
    seq = struct.unpack_from("<I", client.mm, base + L.S_REQ_SEQ)[0]
    struct.pack_into("<I", client.mm, base + L.S_CANCEL_SEQ, seq)
    struct.pack_into("<I", client.mm, base + L.S_ACK_SEQ, 0)
    client._ring_bell()
    client.spin_s = 0
    with pytest.raises(ServerError) as info:
        # The generator acks the frame it yielded; the server must answer CANCELLED instead
        # of the next echo frame.
        struct.pack_into("<I", client.mm, base + L.S_ACK_SEQ, 0)
        list(frames)
    assert info.value.code == ErrorCode.CANCELLED
    client.close()


def process_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_server_uses_under_two_percent_of_a_cpu(start_server):
    """Every transport open, no client: only the heartbeat and the dead-client checks run
    (measured at about 0.3 %). The spin must never outlive the last request."""
    server = start_server("--model", "echo", "--transport", "shm,unix,tcp,http", "--tcp-port",
                          "0", "--port", "0")
    client = RingClient(server.name)
    assert client.echo(b"wake the ring once") == b"wake the ring once"
    client.close()
    time.sleep(0.5)  # past any spin the last request started
    before, started = process_cpu_seconds(server.pid), time.monotonic()
    time.sleep(5)
    share = (process_cpu_seconds(server.pid) - before) / (time.monotonic() - started)
    assert share < 0.02, f"an idle server used {share:.1%} of a CPU"
