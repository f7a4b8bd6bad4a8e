"""The ``shmserve`` command: serve models, train the CIFAR-10 CNN, make a tiny Gemma."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from . import layout as L
from .ready import ready_line

log = logging.getLogger("shmserve")


def _size(text: str) -> int:
    """Byte counts like 65536, 64KiB or 1MiB."""
    units = {"kib": 1024, "mib": 1024 ** 2, "k": 1024, "m": 1024 ** 2}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[:-len(suffix)]) * factor)
    return int(lowered)


def _ring_name(text: str) -> str:
    """Checked for every transport: the name is also part of the default socket path."""
    try:
        return L.check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_serve(sub) -> None:
    from . import transports
    from .transports.http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES
    from .transports.stream import (DEFAULT_BUFFER_BUDGET, DEFAULT_IDLE_TIMEOUT_S,
                                    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PEER_CONNECTIONS)
    p = sub.add_parser("serve", help="serve a model over shared memory, a Unix socket, TCP, HTTP",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="cifar", metavar="TARGET",
                   help="what to serve: a built-in or plugin name (see `shmserve models`), "
                   "MODULE:ATTR or FILE.py:ATTR naming a shmserve.Model, a Model subclass or a "
                   "factory; every model also answers ECHO and METADATA")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model's factory (a string); repeatable")
    p.add_argument("--transport", default="shm,unix",
                   help=f"comma-separated transports from: {','.join(transports.NAMES)} "
                   "(uds is accepted for unix)")
    p.add_argument("--name", default="default", type=_ring_name,
                   help="ring name: /dev/shm/shmserve.NAME and its semaphores; 1-64 of "
                   "[A-Za-z0-9_-]")
    p.add_argument("--socket", default=None, help="Unix socket path (default "
                   f"{L.default_socket_path('NAME')}, in a directory made 0700 for this user); "
                   "every directory above it must be root's or ours and not writable by others "
                   "unless sticky")
    p.add_argument("--http-port", "--port", dest="port", type=int, default=8080,
                   help="HTTP port (on --http-host); --port is its older spelling")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--tcp-port", type=int, default=9090, help="TCP packet port (on --tcp-host)")
    p.add_argument("--tcp-host", default="127.0.0.1")
    p.add_argument("--tcp-peers", choices=("any", "owner"), default="any",
                   help="tcp and http: 'owner' serves only local processes of this server's user "
                   "(and of its group with --group-access), looked up in /proc/net/tcp; 'any' "
                   "serves whoever can connect, every local user included")
    p.add_argument("--group-access", action="store_true",
                   help="create the ring, semaphores and socket 0660 instead of 0600")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (on --metrics-host); without it, "
                   "metrics are served only at the HTTP transport's /metrics, when it runs")
    p.add_argument("--metrics-host", default="127.0.0.1")
    limits = p.add_argument_group("connection limits (unix, tcp, http)")
    limits.add_argument("--packet-timeout", type=float, default=10.0,
                        help="unix/tcp: seconds a client may take to finish a packet it started, "
                        "or to take its reply")
    limits.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="seconds a connection may stay open with no request in progress")
    limits.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections open at once, per transport; more are refused")
    limits.add_argument("--max-peer-connections", type=int, default=DEFAULT_MAX_PEER_CONNECTIONS,
                        help="connections open at once per peer (a local user, or a remote "
                        "address), per transport")
    limits.add_argument("--buffer-budget", type=_size, default=DEFAULT_BUFFER_BUDGET,
                        help="unix/tcp: bytes of requests over 64 KiB held at once (until their "
                        "reply is sent), across connections; a request waits up to "
                        "--packet-timeout for room, then gets TOO_LARGE")
    limits.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="http: seconds from a request head's first byte (or from the "
                             "connection's start) to its last")
    limits.add_argument("--max-header-bytes", type=_size, default=DEFAULT_MAX_HEADER_BYTES,
                        help="http: largest request line plus headers; more gets 431")
    ring = p.add_argument_group("ring")
    ring.add_argument("--slots", type=int, default=L.DEFAULT_SLOTS,
                      help="requests in flight at once, across all clients")
    ring.add_argument("--slot-request-bytes", type=_size, default=L.DEFAULT_REQ_CAPACITY,
                      help="largest request body per slot (multiple of 64)")
    ring.add_argument("--slot-reply-bytes", type=_size, default=L.DEFAULT_RESP_CAPACITY,
                      help="reply bytes per frame; longer replies span frames")
    ring.add_argument("--spin-us", type=float, default=50.0,
                      help="busy-poll this long before blocking on the semaphore; 0 = block "
                      "only (saves a core, costs ~15 us per wake-up)")
    batching = p.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=64,
                          help="most requests handed to the model in one call")
    batching.add_argument("--batch-wait-us", type=float, default=0.0,
                          help="extra time to wait for more requests to join a batch")
    files = p.add_argument_group("model files (cifar, keras, litert; any factory naming "
                                 "model_path)")
    files.add_argument("--model-path", default=None, help="the model file: .keras for keras, "
                       ".tflite for litert and cifar (cifar: default the shipped one)")
    files.add_argument("--threads", type=int, default=None,
                       help="threads the model's runtime computes on: LiteRT's interpreter "
                       "(default 2), XLA's CPU pool for keras on JAX and jax (default one per "
                       "CPU; 1 is faster for a small model's one-row calls)")
    gemma = p.add_argument_group("gemma")
    gemma.add_argument("--checkpoint", default=os.environ.get("MODEL_CHECKPOINT"),
                       help="checkpoint directory (env MODEL_CHECKPOINT)")
    gemma.add_argument("--tokenizer", default=os.environ.get("MODEL_TOKENIZER"),
                       help="SentencePiece tokenizer file (env MODEL_TOKENIZER)")
    gemma.add_argument("--variant", default=None, help="architecture name, e.g. gemma3-1b, tiny")
    gemma.add_argument("--cache-length", type=int, default=1024,
                       help="tokens of KV cache: prompt + generated must fit")
    gemma.add_argument("--max-new-tokens", type=int, default=512,
                       help="largest sampling_steps a request may ask for")
    p.set_defaults(func=_serve)


# Serve options a model factory may name as keyword parameters (models/__init__.py).
_FACTORY_OPTIONS = ("model_path", "threads", "checkpoint", "tokenizer", "variant", "cache_length",
                    "max_new_tokens", "max_batch")


def _model_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-option {pair!r}: expected KEY=VALUE with KEY a name")
        options[key] = value
    return options


def _serve(args) -> int:
    from . import models, transports
    from .dispatch import Dispatcher
    args.socket = args.socket or L.default_socket_path(args.name)
    try:
        names = list(dict.fromkeys(transports.canonical(t.strip())
                                   for t in args.transport.split(",") if t.strip()))
    except ValueError as exc:
        print(f"shmserve: error: --transport: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        model = models.build(args.model, {k: getattr(args, k) for k in _FACTORY_OPTIONS
                                          if getattr(args, k) is not None},
                             _model_options(args.model_option))
    except models.ModelLoadError as exc:
        print(f"shmserve: error: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    metrics = None
    if "http" in names or args.metrics_port is not None:
        from .metrics import Metrics
        metrics = Metrics(model.name)
    dispatcher = Dispatcher(model, max_batch=args.max_batch, batch_wait_us=args.batch_wait_us,
                            metrics=metrics)
    started = []
    try:
        for name in names:
            if stop.is_set():
                return 0
            transport = transports.load(name, dispatcher, args)
            started.append(transport)
            transport.start()
        model.warmup()
        if stop.is_set():  # stopped while loading or compiling: never announce ready
            return 0
        for transport in started:
            transport.set_ready()
        metrics_url = None
        if args.metrics_port is not None:
            port = metrics.serve(args.metrics_host, args.metrics_port)
            metrics_url = f"http://{args.metrics_host}:{port}/metrics"
        elif metrics is not None:
            metrics_url = started[names.index("http")].describe()["address"] + "/metrics"
        print(ready_line(os.getpid(), model.describe(),
                         {name: t.describe() for name, t in zip(names, started)},
                         metrics=metrics_url), flush=True)
        # A timed wait: a signal that lands on another thread only sets the flag, and an
        # untimed Event.wait in the main thread would then never look at it again.
        while not stop.wait(0.5):
            pass
        log.info("stopping")
    finally:
        for transport in reversed(started):
            transport.stop()
        if metrics is not None:
            metrics.close()
        model.close()
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model")
    which = p.add_subparsers(dest="which", required=True)
    c = which.add_parser("cifar", help="train the CIFAR-10 CNN and export the served .tflite",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--data", required=True, help="image folder tree (one folder per class) or "
                   "a directory with the CIFAR-10 python batches")
    c.add_argument("--epochs", type=int, default=15)
    c.add_argument("--out", required=True, help="output path stem: writes OUT.keras, "
                   "OUT.tflite, OUT.metrics.json")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--limit", type=int, default=None, help="use only this many images")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_train_cifar)


def _train_cifar(args) -> int:
    from .training.cifar import train
    metrics = train(args.data, args.epochs, args.out, val_fraction=args.val_fraction,
                    batch_size=args.batch_size, seed=args.seed, limit=args.limit)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_tiny_gemma(sub) -> None:
    p = sub.add_parser("make-tiny-gemma", help="write a tiny random Gemma-architecture checkpoint "
                       "and tokenizer (for tests and the offline demo)")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_make_tiny_gemma)


def _make_tiny_gemma(args) -> int:
    from .models.tiny_gemma import make_tiny_gemma
    print(json.dumps(make_tiny_gemma(args.out), indent=2, default=str))
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list what `serve --model` can serve by name")
    p.set_defaults(func=_list_models)


def _list_models(args) -> int:
    from . import models
    for name, target in sorted(models.available().items()):
        print(f"{name:10} {target}")
    print("or any MODULE:ATTR / FILE.py:ATTR naming a shmserve.Model (see README)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="shmserve", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("SHMSERVE_LOG", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_models(sub)
    _add_train(sub)
    _add_tiny_gemma(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileExistsError, RuntimeError, OSError) as exc:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"shmserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
