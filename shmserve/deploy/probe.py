"""Readiness/liveness probe for the sidecar: ``python -m shmserve.deploy.probe --name NAME``.

Exit 0 when the ring NAME is served: the header is a valid ring, its server holds the
liveness lock, ``server_state`` is READY and the heartbeat is recent (spec sections 7, 11).
With ``--socket PATH`` it also needs an ECHO round trip over the Unix socket. Exit 1 with a
one-line reason otherwise. It only reads the ring: it never claims a slot, so it cannot
disturb clients, and it imports nothing heavy (a probe runs every few seconds).
"""
from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import socket
import sys
import time

from .. import layout as L
from ..protocol import MsgType, encode_packet

_ECHO = encode_packet(MsgType.ECHO, b"probe")


class NotReady(Exception):
    pass


def check_ring(name: str, max_heartbeat_age_s: float, shm_dir: str = "/dev/shm") -> int:
    """Returns the ring's generation; raises NotReady with the reason."""
    path = os.path.join(shm_dir, f"shmserve.{L.check_name(name)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NotReady(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < L.HEADER_SIZE:
            raise NotReady(f"{path} is {size} bytes, smaller than a ring header")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as ring:
            try:
                _, generation = L.parse_header(ring, size)
            except L.LayoutError as exc:
                raise NotReady(f"{path}: {exc}") from None
            # One load per word: the server rewrites both while we read (spec section 10).
            with memoryview(ring)[:L.HEADER_SIZE] as header, header.cast("I") as u32, \
                    header.cast("Q") as u64:
                state, heartbeat = u32[L.H_SERVER_STATE >> 2], u64[L.H_HEARTBEAT_NS >> 3]
    finally:
        os.close(fd)
    _check_lock_held(L.lock_path(name, shm_dir))
    if state != L.ServerState.READY:
        name_of = {s.value: s.name for s in L.ServerState}
        raise NotReady(f"server_state is {name_of.get(state, state)}, not READY")
    age = (time.monotonic_ns() - heartbeat) / 1e9
    if age > max_heartbeat_age_s:
        raise NotReady(f"heartbeat is {age:.1f} s old (server stalled?)")
    return generation


def _check_lock_held(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NotReady(f"cannot open liveness lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # the server holds it exclusively: alive
    finally:
        os.close(fd)  # also drops a lock we might have taken
    raise NotReady("no process holds the liveness lock: the server is gone")


def check_socket(path: str, timeout: float) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(_ECHO)
        reply = b""
        while len(reply) < len(_ECHO):
            chunk = sock.recv(len(_ECHO) - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        raise NotReady(f"socket {path}: {exc}") from None
    finally:
        sock.close()
    if reply != _ECHO:
        raise NotReady(f"socket {path}: echo came back as {reply!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmserve.deploy.probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="default", help="ring name (serve --name)")
    parser.add_argument("--socket", default=None, help="also echo over this Unix socket")
    parser.add_argument("--max-heartbeat-age", type=float, default=2.0,
                        help="seconds; the server refreshes it every 0.25 s")
    parser.add_argument("--timeout", type=float, default=2.0, help="socket timeout, seconds")
    parser.add_argument("--shm-dir", default="/dev/shm")
    args = parser.parse_args(argv)
    try:
        generation = check_ring(args.name, args.max_heartbeat_age, args.shm_dir)
        if args.socket:
            check_socket(args.socket, args.timeout)
    except (NotReady, ValueError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    print(f"ready: ring {args.name!r} generation {generation:016x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
