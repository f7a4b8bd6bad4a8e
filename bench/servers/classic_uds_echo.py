"""The classic Unix-socket sidecar: one client at a time, a blocking loop that reads a
length-prefixed packet and writes the reply (spec/PROTOCOL.md section 5), the way the
pre-shmserve sidecar was written. ECHO (type 0) comes back as it came; anything else gets the
ERROR packet UNKNOWN_TYPE.

    python bench/servers/classic_uds_echo.py --path /tmp/classic.sock

Prints the ready line of spec/PROTOCOL.md section 14 (a ``unix`` transport) once it listens.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import struct

from shmserve.protocol import ErrorCode, MsgType, encode_error
from shmserve.ready import ready_line


def recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(conn: socket.socket) -> None:
    while (header := recv_exact(conn, 4)) is not None:
        (length,) = struct.unpack(">I", header)
        packet = recv_exact(conn, length)
        if packet is None:
            return
        if packet[0] == MsgType.ECHO:
            conn.sendall(header + packet)
        else:
            body = encode_error(ErrorCode.UNKNOWN_TYPE, f"type {packet[0]}")
            conn.sendall(struct.pack(">IB", len(body) + 1, MsgType.ERROR) + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="the socket's file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (os.unlink(args.path), os._exit(0)))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(args.path)
    listener.listen()
    print(ready_line(os.getpid(), {"model": "echo", "server": "classic-uds"},
                     {"unix": {"address": f"unix://{args.path}", "path": args.path}}), flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve(conn)
            except ConnectionError:
                pass


if __name__ == "__main__":
    main()
