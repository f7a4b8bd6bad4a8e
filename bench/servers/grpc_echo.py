"""gRPC echo server for the transport bench: grpcio, one unary method on raw bytes.

    python bench/servers/grpc_echo.py [--workers N]

``/shmserve.bench.Echo/Echo`` returns its request. The handler is registered generically with
no (de)serializers, so grpcio hands the handler the request bytes as they came off the wire
and sends the returned bytes back unchanged: no codegen, no protobuf message, and so the
number measures gRPC's transport (HTTP/2 framing, grpcio's C core and its thread hand-off)
rather than protobuf encoding, the same thing the other transports are measured on. The Go
side matches this with a raw-bytes codec.

Prints one JSON line, the ready line of spec/PROTOCOL.md section 14 (a ``grpc`` transport), once serving.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from concurrent import futures

import grpc

from shmserve.ready import ready_line

SERVICE, METHOD = "shmserve.bench.Echo", "Echo"
MAX_MESSAGE = 16 << 20  # the stream transports' packet limit


def _echo(request: bytes, context) -> bytes:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=16,
                        help="handler threads: as many as the bench keeps in flight")
    args = parser.parse_args()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(ready_line(os.getpid(), {"model": "echo", "server": "grpcio"},
                     {"grpc": {"address": f"grpc://127.0.0.1:{port}", "host": "127.0.0.1",
                               "port": port}}),
          flush=True)
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
