"""A ring that does not fit the shm filesystem fails at start (exit 2, the size needed and the
fix), not with SIGBUS when a page is first touched under load."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, ring_objects


def serve(*args: str, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, sys.executable, "-m", "shmserve.cli", "serve", "--model", "echo",
                           "--transport", "shm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_ring_larger_than_the_free_space_exits_2_with_the_size_and_the_fix():
    name = f"size-{os.getpid()}"
    free = shutil.disk_usage("/dev/shm").free
    done = serve("--name", name, "--slots", "1024", "--slot-request-bytes",
                 str(max(64, free // 1024 // 64 * 64 + 64)))
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "needs" in line]
    assert "/dev/shm" in line and "--shm-size=" in line and "sizeLimit" in line, line
    assert ring_objects(name) == []


def _private_small_shm() -> tuple[str, ...]:
    """A command prefix giving the server its own 8 MiB /dev/shm, where this machine lets a
    test mount one (root, or a user namespace); the test skips with the reason otherwise."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=8m tmpfs "
                            "/dev/shm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    return ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$@"',
            "sh")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) is not installed")
def test_the_default_ring_in_a_64_mib_container_style_small_shm_fails_at_start():
    wrap = _private_small_shm()
    done = serve("--name", "small", wrap=wrap)  # the default ring is about 20 MiB
    assert done.returncode == 2, done.stderr
    assert "needs 20.0 MiB in /dev/shm but only 8.0 MiB is free" in done.stderr, done.stderr
    # A ring that fits starts (and the check is not a false alarm): it serves until stopped.
    fits = subprocess.Popen([*wrap, sys.executable, "-m", "shmserve.cli", "serve", "--model", "echo",
                             "--transport", "shm", "--name", "small", "--slots", "4"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert '"event": "ready"' in fits.stdout.readline()
    finally:
        fits.terminate()
        fits.wait(30)
    assert fits.returncode == 0
