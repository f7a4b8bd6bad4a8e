"""Echo servers over the message libraries a Go<->Python team would pick instead of shmserve:
ZeroMQ (pyzmq) and NNG (pynng), both over ``ipc://`` (a Unix socket underneath).

    python bench/servers/mq_echo.py zmq|nng --path /tmp/x.ipc

Each is written the way its library's documentation shows a request/reply server: zmq a ROUTER
socket (so many REQ clients can have requests in flight; the reply goes back with the
envelope frames it came with), nng a REP socket, one receive and one send per request on one
thread. Prints the ready line of spec/PROTOCOL.md section 14 (a ``zmq`` or ``nng`` transport)
once listening.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading

from shmserve.ready import ready_line


def serve_zmq(address: str, stop: threading.Event, ready) -> None:
    import zmq
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(address)
    ready()
    try:
        while not stop.is_set():
            if sock.poll(200):
                sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    finally:
        sock.close(linger=0)
        context.term()


def serve_nng(address: str, stop: threading.Event, ready) -> None:
    import pynng
    # recv_max_size 0: no limit (nng drops messages over 1 MiB by default, and the bench
    # echoes 1 MiB, the stream transports' size).
    with pynng.Rep0(listen=address, recv_timeout=200, recv_max_size=0) as sock:
        ready()
        while not stop.is_set():
            try:
                # recv_msg: recv() fails on an empty message (it unpacks a NULL buffer).
                sock.send_msg(sock.recv_msg())
            except pynng.Timeout:
                pass


SERVERS = {"zmq": serve_zmq, "nng": serve_nng}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", choices=sorted(SERVERS))
    parser.add_argument("--path", required=True, help="the ipc socket's file")
    args = parser.parse_args()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    address = f"ipc://{args.path}"

    def ready() -> None:
        print(ready_line(os.getpid(), {"model": "echo", "server": args.library},
                         {args.library: {"address": f"{args.library}://{args.path}",
                                         "path": args.path}}), flush=True)

    try:
        SERVERS[args.library](address, stop, ready)
    finally:
        if os.path.exists(args.path):
            os.unlink(args.path)


if __name__ == "__main__":
    main()
