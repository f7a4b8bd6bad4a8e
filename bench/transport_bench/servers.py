"""The servers a run drives: started in parallel, their ready lines read, their objects
removed whatever happens."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from shmserve import layout as L
from shmserve.ready import Ready, parse_ready

from .plan import (BENCH, LONG_SPIN_US, MODEL_START_TIMEOUT, MODEL_TRANSPORTS, MQ_PEERS, PYTHON,
                   ROOT, SHMSERVE, SLOTS, SPIN_US, BenchError, Config, ModelSection,
                   bench_cpus, ring_bytes)


class Server:
    """A server process in its own session (so its workers die with it) that announces
    itself with one JSON ``{"event": "ready", ...}`` line on stdout."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, ring_names=(),
                 socket_path: str | None = None):
        self.name = name
        self.ring_names = tuple(ring_names)
        self.socket_path = socket_path
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
            str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT,
                                     env=env, start_new_session=True)
        self.ready: Ready | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> Ready:
        deadline = time.monotonic() + timeout
        while self.ready is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: not ready after {timeout:.0f} s\n{self.log_tail()}")
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if not readable:
                continue
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise BenchError(f"{self.name}: exited with status {self.proc.returncode} "
                                 f"before it was ready\n{self.log_tail()}")
            with contextlib.suppress(ValueError):  # a line of its own logging: read on
                self.ready = parse_ready(line.decode("utf-8", "replace"))
        return self.ready

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def stop(self) -> None:
        """SIGTERM the whole session, SIGKILL what lingers, then remove whatever a killed
        server left under its names (spec section 11 objects, the socket)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their master
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stdout.close()
        self._log.close()
        leftovers = [path for ring in self.ring_names for path in L.ring_files(ring)]
        if self.socket_path and os.path.lexists(self.socket_path):
            leftovers.append(self.socket_path)
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def start_servers(stack: contextlib.ExitStack, config: Config, tmp: Path,
                  sections: list[ModelSection]) -> dict:
    """Starts every server in parallel and waits for each; returns the Go driver's targets.
    A model server that does not come up marks its section skipped, with the reason."""
    tag = f"bench{os.getpid()}"
    geometry = ["--slots", str(SLOTS), "--slot-request-bytes", ring_bytes(config),
                "--slot-reply-bytes", ring_bytes(config)]
    spin_name, block_name = f"{tag}s", f"{tag}b"
    socket_path = str(tmp / "echo.sock")

    def server(name, argv, **kw):
        s = Server(name, argv, tmp, **kw)
        stack.callback(s.stop)
        return s

    echo = server("shmserve-echo", [*SHMSERVE, "serve", "--model", "echo", "--transport",
                                    "shm,unix,tcp,http", "--name", spin_name, "--socket",
                                    socket_path, "--port", "0", "--tcp-port", "0", "--spin-us",
                                    str(SPIN_US), *geometry],
                  ring_names=[spin_name], socket_path=socket_path)
    # The same ring server as the first without the HTTP transport, hence without metrics:
    # what the metrics cost the ring is the difference between the two.
    bare_name = f"{tag}n"
    bare = server("shmserve-echo-nometrics", [*SHMSERVE, "serve", "--model", "echo",
                                              "--transport", "shm", "--name", bare_name,
                                              "--spin-us", str(SPIN_US), *geometry],
                  ring_names=[bare_name])
    mq, skipped = {}, {}
    for key, (library, module) in MQ_PEERS.items():
        if importlib.util.find_spec(module) is None:
            skipped[key] = f"Python module {module!r} is not installed (uv sync --group bench)"
            continue
        path = str(tmp / f"{library}.ipc")
        mq[key] = server(f"{library}-echo", [PYTHON, str(BENCH / "servers" / "mq_echo.py"),
                                             library, "--path", path], socket_path=path)
    block_argv = [*SHMSERVE, "serve", "--model", "echo", "--transport", "shm", "--spin-us", "0",
                  *geometry]
    block = server("shmserve-echo-block", [*block_argv, "--name", block_name],
                   ring_names=[block_name])
    # The one-CPU placement of the semaphore floor: the driver pins itself to the same CPU.
    one_cpu, block_1cpu_name = bench_cpus()[0], f"{tag}p"
    block_1cpu = server("shmserve-echo-block-1cpu", ["taskset", "-c", str(one_cpu), *block_argv,
                                                     "--name", block_1cpu_name],
                        ring_names=[block_1cpu_name])
    flask = server("flask-gunicorn", [PYTHON, str(BENCH / "servers" / "flask_echo.py")])
    classic_path = str(tmp / "classic.sock")
    classic = server("classic-uds", [PYTHON, str(BENCH / "servers" / "classic_uds_echo.py"),
                                     "--path", classic_path], socket_path=classic_path)
    grpc = server("grpcio", [PYTHON, str(BENCH / "servers" / "grpc_echo.py"),
                             "--workers", str(max(config.concs))])
    model_servers = {}
    for section in sections:
        if section.skipped:
            continue
        name, sock = f"{tag}{section.key[0]}", str(tmp / f"{section.key}.sock")
        model_servers[section.key] = server(
            f"shmserve-{section.key}", [*SHMSERVE, "serve", *section.serve_args, "--transport",
                                        ",".join(MODEL_TRANSPORTS), "--name", name, "--socket",
                                        sock, "--port", "0", "--spin-us", str(SPIN_US),
                                        "--slots", str(SLOTS)],
            ring_names=[name], socket_path=sock)

    conns = max(config.concs)
    e, flask_url = echo.wait_ready(60), flask.wait_ready(60).address("http")
    block.wait_ready(60)
    block_1cpu.wait_ready(60)
    # Each server leads its own session, so its pid is its process group.
    targets = {
        "shm-spin": {"url": f"shm://{spin_name}", "spin_us": SPIN_US, "server_pgid": echo.pid},
        # The same server, with the Go client confined to one CPU: on a 2-CPU host two busy
        # client threads take CPU time from the server's loop (bench/README.md).
        "shm-spin-1p": {"url": f"shm://{spin_name}", "spin_us": SPIN_US, "server_pgid": echo.pid,
                        "gomaxprocs": 1},
        "shm-block": {"url": f"shm://{block_name}", "spin_us": 0, "server_pgid": block.pid},
        "shm-block-1cpu": {"url": f"shm://{block_1cpu_name}", "spin_us": 0,
                           "server_pgid": block_1cpu.pid, "cpu": one_cpu, "gomaxprocs": 1},
        "unix": {"url": e.address("unix"), "conns": conns, "server_pgid": echo.pid},
        "tcp": {"url": e.address("tcp"), "conns": conns, "server_pgid": echo.pid},
        "http-uvicorn": {"url": e.address("http"), "conns": conns, "server_pgid": echo.pid},
        "http-flask": {"url": flask_url, "conns": conns, "server_pgid": flask.pid},
        # One connection: the classic server serves one client at a time, so calls in flight
        # queue on it as they would behind the classic Go client.
        "unix-classic": {"url": classic.wait_ready(60).address("unix"), "conns": 1,
                         "server_pgid": classic.pid},
        "grpc": {"url": grpc.wait_ready(60).address("grpc"), "conns": conns,
                 "server_pgid": grpc.pid},
        "shm-nometrics": {"url": bare.wait_ready(60).address("shm"), "spin_us": SPIN_US,
                          "server_pgid": bare.pid},
    }
    for key, s in mq.items():
        try:
            targets[key] = {"url": s.wait_ready(60).address(MQ_PEERS[key][0]),
                            "server_pgid": s.pid}
        except BenchError as exc:
            skipped[key] = str(exc).splitlines()[0]
    for section in sections:
        if section.skipped:
            continue
        s = model_servers[section.key]
        try:
            ready = s.wait_ready(MODEL_START_TIMEOUT)
        except BenchError as exc:
            last = s.log_tail(1).strip() or str(exc).splitlines()[0]
            section.skipped = f"`shmserve serve --model {section.key}` did not start: {last}"
            s.stop()
            continue
        section.server = dataclasses.asdict(ready)
        for t, spec in {
            "shm": {"url": ready.address("shm"), "spin_us": SPIN_US},
            "shm-long": {"url": ready.address("shm"), "spin_us": LONG_SPIN_US},
            "unix": {"url": ready.address("unix"), "conns": conns},
            "http": {"url": ready.address("http"), "conns": conns},
        }.items():
            targets[f"{section.key}-{t}"] = spec | {"server_pgid": s.pid}
    servers = [echo, bare, block, block_1cpu, flask, classic, grpc, *mq.values(), *model_servers.values()]
    return {"targets": targets, "skipped": skipped,
            "servers": {s.name: s.proc.args for s in servers}}
