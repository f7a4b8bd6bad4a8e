"""Crashes on either side of the ring: a SIGKILLed server under load from the Go client, a
SIGKILLed Go client process mid-run, and stale-object cleanup that spares live rings."""
from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import time

import posix_ipc
import pytest

from conftest import remove_leftovers, ring_objects
from shmserve import layout as L
from shmserve.client import RingClient


def owners(name: str) -> list[int]:
    shm = posix_ipc.SharedMemory(L.shm_name(name))
    try:
        with mmap.mmap(shm.fd, os.fstat(shm.fd).st_size, prot=mmap.PROT_READ) as ring:
            geometry, _ = L.parse_header(ring, len(ring))
            return [struct.unpack_from("<I", ring, geometry.slot_offset(i) + L.S_OWNER)[0]
                    for i in range(geometry.slot_count)]
    finally:
        shm.close_fd()


def wait_until(predicate, timeout: float, step: float = 0.01) -> float | None:
    """Seconds until predicate() held, or None if it never did within timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    return None


def echo_load(binary: str, name: str, goroutines: int, count: int, timeout: str = "10s"):
    return subprocess.Popen([binary, "echo", "-addr", f"shm://{name}", "-c", str(goroutines),
                             "-n", str(count), "-timeout", timeout, "load"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"client still running {timeout} s later (hung?); stderr: {err[-2000:]}")
    return proc.returncode, out, err


def test_server_sigkill_under_load_fails_every_call_fast_then_a_restart_serves(
        start_server, shmclient):
    server = start_server("--model", "echo", "--transport", "shm")
    # 16 goroutines with a 10 s deadline per call; far more requests than fit in the test.
    load = echo_load(shmclient, server.name, 16, 100_000_000)
    try:
        assert wait_until(lambda: any(owners(server.name)), 10), "client never claimed a slot"
        time.sleep(0.3)
        assert load.poll() is None, load.stderr.read()
        killed_at = time.monotonic()
        server.stop(signal.SIGKILL)
        rc, _, err = finish(load, 15)
        took = time.monotonic() - killed_at
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    # Liveness checks every 50 ms: the dead server is noticed long before the 10 s deadline.
    assert rc == 1 and "server gone" in err, err[-2000:]
    assert took < 3, f"client needed {took:.1f} s to give up on a dead server"

    # A new call while no server runs: a typed error within its own deadline.
    started = time.monotonic()
    lone = subprocess.run([shmclient, "echo", "-addr", f"shm://{server.name}", "-timeout", "1s",
                           "x"], capture_output=True, text=True, timeout=30)
    assert lone.returncode == 1 and "shmclient echo:" in lone.stderr, lone.stderr
    assert time.monotonic() - started < 3

    again = start_server("--model", "echo", "--transport", "shm", "--name", server.name)
    assert again.ready["shm"]["generation"] != server.ready["shm"]["generation"]
    rc, out, err = finish(echo_load(shmclient, server.name, 16, 20_000), 60)
    assert rc == 0 and "20000 replies over shm" in out and " 0 mismatched" in out, (out, err)


def test_client_sigkill_mid_run_frees_its_slots_and_others_carry_on(start_server, shmclient):
    server = start_server("--model", "echo", "--transport", "shm", "--slots", "32")
    victim = echo_load(shmclient, server.name, 16, 100_000_000)
    survivor = echo_load(shmclient, server.name, 4, 200_000)
    try:
        assert wait_until(lambda: victim.pid in owners(server.name), 10), \
            "victim never held a slot"
        assert victim.poll() is None and survivor.poll() is None
        victim.kill()
        victim.wait()
        reclaimed = wait_until(lambda: victim.pid not in owners(server.name), 5)
        assert reclaimed is not None and reclaimed < 2.0, \
            f"slots of the dead client still owned after {reclaimed or 5} s"
        rc, out, err = finish(survivor, 120)
        assert rc == 0 and "200000 replies" in out and " 0 mismatched" in out, (out, err)
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Every slot, the reclaimed ones included, serves again: 32 goroutines need all 32.
    rc, out, err = finish(echo_load(shmclient, server.name, 32, 20_000), 60)
    assert rc == 0 and " 0 mismatched" in out, (out, err)
    assert server.proc.poll() is None


def test_restart_cleans_only_its_own_stale_objects(start_server):
    """A live ring whose name extends the restarted one's ("X-b" beside "X") keeps every
    object: stale-object removal matches names exactly, not by prefix."""
    first = start_server("--model", "echo", "--transport", "shm", "--slots", "2")
    name = first.name
    # The fixture cleans up by each server's generated name, not by a --name given here.
    neighbour = start_server("--model", "echo", "--transport", "shm", "--slots", "2",
                             "--name", f"{name}-b")
    try:
        first.stop(signal.SIGKILL)
        theirs = ring_objects(f"{name}-b")
        assert theirs and all(os.path.exists(p) for p in theirs)
        again = start_server("--model", "echo", "--transport", "shm", "--slots", "2",
                             "--name", name)
        assert again.stop() == 0  # a clean stop unlinks its own objects, too
        assert not os.path.exists(f"/dev/shm/shmserve.{name}")
        assert not os.path.exists(f"/dev/shm/sem.shmserve.{name}.req")
        assert all(os.path.exists(p) for p in theirs), \
            "a restart removed a live neighbour's objects"
        client = RingClient(f"{name}-b")  # opens every semaphore by name: all must exist
        assert client.echo(b"neighbour") == b"neighbour"
        client.close()
        assert neighbour.proc.poll() is None
    finally:
        neighbour.kill()
        remove_leftovers(f"{name}-b")
