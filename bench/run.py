"""Transport benchmark: what shmserve's shared-memory ring buys a Go program over a Unix
socket, TCP, HTTP/JSON and gRPC, and how close it gets to a C shared-memory floor.

    make bench          # full run: reference results under bench/results/ (~6 min, 2 cores)
    make bench-quick    # smoke run, a few seconds per transport; results under bench/results/tmp/
    .venv/bin/python bench/run.py --help

One run starts every server, drives each from Go (bench/gobench) and measures, in
repetitions whose cells are shuffled so that noise lands on every transport alike:

- echo over: the shm ring spinning then blocking, the shm ring blocking only, the Unix
  socket and TCP loopback (classic length-prefixed packets), HTTP/JSON under uvicorn (the
  sidecar's own transport), HTTP/JSON under Flask + gunicorn (the classic server), and gRPC
  (grpc-go client, grpcio server); each at every payload size and concurrency;
- the floor: a C two-process shared-memory ping-pong, semaphores and spinning
  (bench/floor/pingpong.c), at every payload size;
- when the CIFAR model is servable: classify latency per transport, batched throughput,
  and the in-process model calls they are judged against (bench/inprocess.py).

Latencies go into HdrHistograms, merged across repetitions. Writes JSON (with machine
info, load, date and commit), a markdown report and PNG plots, and prints the project's
goals as ratios with PASS/FAIL.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from shmserve import layout as L  # noqa: E402
from shmserve.ready import Ready, parse_ready  # noqa: E402
BUILD = BENCH / "build"
PINGPONG = BUILD / "pingpong"
GOBENCH = BUILD / "gobench"
PYTHON = sys.executable
SHMSERVE = [PYTHON, "-m", "shmserve.cli"]

# Must match bench/inprocess.py and the Go driver.
HIST_ARGS = (1, 60 * 10**9, 3)

IMAGE = 3072  # the payload the goals are stated at: one CIFAR image
SPIN_US = 50.0  # the server's default spin budget, used on both sides of the spinning ring
SLOTS = 32  # >= the highest concurrency, so a call never waits for a slot
MIN_CALLS = 50  # a cell's window stretches until this many calls completed in it


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    concs: tuple[int, ...]
    reps: int
    warmup_ms: int
    measure_ms: int
    floor_seconds: float
    model_seconds: float


FULL = Config(sizes=(0, 64, IMAGE, 64 << 10, 1 << 20), concs=(1, 4, 16), reps=3, warmup_ms=150,
              measure_ms=700, floor_seconds=0.5, model_seconds=1.0)
QUICK = Config(sizes=(64, IMAGE), concs=(1, 16), reps=1, warmup_ms=40, measure_ms=120,
               floor_seconds=0.15, model_seconds=0.2)


@dataclasses.dataclass(frozen=True)
class Transport:
    key: str
    label: str


ECHO_TRANSPORTS = (
    Transport("shm-spin", "shm ring, spin then block (metrics on)"),
    Transport("shm-nometrics", "shm ring, spin then block, metrics off"),
    Transport("shm-spin-1p", "shm ring, spin then block, client GOMAXPROCS=1"),
    Transport("shm-block", "shm ring, block only"),
    Transport("unix", "Unix socket, classic packets"),
    Transport("tcp", "TCP loopback, classic packets"),
    Transport("http-uvicorn", "HTTP/JSON, uvicorn (bare ASGI)"),
    Transport("http-flask", "HTTP/JSON, Flask + gunicorn sync"),
    Transport("grpc", "gRPC, grpc-go -> grpcio"),
    Transport("zmq-ipc", "ZeroMQ over ipc://, zmq4 (Go) -> pyzmq ROUTER"),
    Transport("nng-ipc", "NNG over ipc://, mangos v3 (Go) -> pynng REP"),
)
# The message-library peers: bench/servers/mq_echo.py LIBRARY, and the module it imports.
MQ_PEERS = {"zmq-ipc": ("zmq", "zmq"), "nng-ipc": ("nng", "pynng")}
# The floor is the best this machine allows, so each hand-off is measured where it is
# fastest: spinning on two CPUs (it presumes both sides run at once), blocking both on one
# CPU and on two (on a VM a wake-up across CPUs goes through the hypervisor and can cost 20x
# one within a CPU; which is faster depends on the machine, so both run, and the lower p50
# is the semaphore floor).
FLOORS = (Transport("floor-spin", "C floor, spin, 2 CPUs"),
          Transport("floor-sem-1cpu", "C floor, semaphores, 1 CPU"),
          Transport("floor-sem-2cpu", "C floor, semaphores, 2 CPUs"))
SEM_FLOORS = ("floor-sem-1cpu", "floor-sem-2cpu")
LABELS = {t.key: t.label for t in (*ECHO_TRANSPORTS, *FLOORS)}
MODEL_START_TIMEOUT = 180  # the Gemma server imports JAX and compiles before it is ready


class BenchError(RuntimeError):
    pass


# -- servers --------------------------------------------------------------------------------

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


def ring_bytes(config: Config) -> str:
    """Slot capacity for the largest payload, request and reply alike: every echo reply
    then fits one frame, so the ring is measured as one copy each way. (With the default
    64 KiB reply frames a 1 MiB reply would take 16 frames, each acked by the client.)"""
    return str(max(-(-max(*config.sizes, IMAGE) // 64) * 64, 64 << 10))


@dataclasses.dataclass
class ModelSection:
    """The end-to-end path of one served model: its server, the Go cells that drive it over
    MODEL_TRANSPORTS (targets "<key>-<transport>"), and the in-process baseline
    (bench/inprocess.py) that every row is compared with."""
    key: str
    title: str
    serve_args: list[str]
    inprocess_args: list[str]
    cells: list[dict]
    # (op, size) of the in-process measurement that latency rows are divided by.
    baseline: tuple[str, int]
    skipped: str | None = None
    server: dict | None = None


MODEL_TRANSPORTS = ("shm", "unix", "http")
# A ring client that stops spinning before the model answers pays a semaphore wake-up on top
# (tens of µs on a VM), so single-image classify is also measured with a client spin budget
# that outlasts the model call: what a latency-bound caller would configure.
LONG_SPIN_US = 500.0
TARGET_LABELS = {"shm": "shm", "shm-long": f"shm, client spin {LONG_SPIN_US:.0f} µs",
                 "unix": "unix", "http": "http"}
CLASSIFY_BATCH = 64
CLASSIFY_CONC = 16
PROMPT, PROMPT_STEPS = "Hello there", 16
# The tiny Gemma's limits: small shapes compile fast. Server and in-process baseline share
# them, since the compiled sampler depends on them.
GEMMA_CACHE, GEMMA_MAX_NEW = 256, 64


def model_sections(args, quick: bool) -> list[ModelSection]:
    cifar_model = ["--model-path", args.cifar_model] if args.cifar_model else []
    threads = ["--threads", str(args.cifar_threads)]
    cifar = ModelSection(
        "cifar", "CIFAR-10 classify (LiteRT CNN)",
        serve_args=["--model", "cifar", *threads, *cifar_model],
        inprocess_args=["cifar", *threads, *cifar_model, "--batch", str(CLASSIFY_BATCH)],
        cells=[{"target": f"cifar-{t}", "op": "classify", "size": IMAGE, "conc": 1}
               for t in (*MODEL_TRANSPORTS, "shm-long")] + [
            {"target": "cifar-shm", "op": "classify", "size": IMAGE, "conc": CLASSIFY_CONC},
            # Two batches in flight, so the server has the next one when it finishes one.
            {"target": "cifar-shm", "op": "classify_batch", "size": IMAGE * CLASSIFY_BATCH,
             "conc": 2, "batch": CLASSIFY_BATCH}],
        baseline=("predict_one", IMAGE))
    gemma_paths = [args.gemma_checkpoint, args.gemma_tokenizer, args.gemma_variant]
    limits = ["--cache-length", str(GEMMA_CACHE)]
    gemma = ModelSection(
        "gemma", f"Gemma prompt, {PROMPT_STEPS} new tokens",
        serve_args=["--model", "gemma", *limits, "--max-new-tokens", str(GEMMA_MAX_NEW)],
        inprocess_args=["gemma", *limits, "--max-new-tokens-limit", str(GEMMA_MAX_NEW),
                        "--prompt", PROMPT, "--steps", str(PROMPT_STEPS)],
        cells=[{"target": f"gemma-{t}", "op": "prompt", "size": len(PROMPT), "conc": 1,
                "prompt": PROMPT, "max_new_tokens": PROMPT_STEPS} for t in MODEL_TRANSPORTS],
        baseline=("generate", len(PROMPT)))
    if args.skip_models:
        cifar.skipped = gemma.skipped = "--skip-models"
    elif quick and not all(gemma_paths):
        gemma.skipped = ("--quick: making and compiling a tiny Gemma takes longer than a smoke "
                         "run (pass --gemma-checkpoint/--gemma-tokenizer/--gemma-variant)")
    else:
        checkpoint, tokenizer, variant = gemma_paths if all(gemma_paths) else tiny_gemma()
        # Absolute: orbax does not find a relative checkpoint's metadata.
        paths = ["--checkpoint", str(Path(checkpoint).resolve()), "--tokenizer",
                 str(Path(tokenizer).resolve()), "--variant", variant]
        gemma.serve_args += paths
        gemma.inprocess_args += paths
    return [cifar, gemma]


def tiny_gemma() -> tuple[str, str, str]:
    """A tiny random-weight Gemma (``shmserve make-tiny-gemma``), made once into bench/build:
    its files are a pure function of a fixed seed."""
    out = BUILD / "tiny-gemma"
    if not (out / "variant.json").exists():
        print("making a tiny Gemma checkpoint (once) ...", file=sys.stderr, flush=True)
        subprocess.run([*SHMSERVE, "make-tiny-gemma", str(out)], cwd=ROOT, check=True,
                       capture_output=True)
    return str(out / "checkpoint"), str(out / "tokenizer.model"), \
        json.loads((out / "variant.json").read_text())["name"]


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
    block = server("shmserve-echo-block", [*SHMSERVE, "serve", "--model", "echo", "--transport",
                                           "shm", "--name", block_name, "--spin-us", "0",
                                           *geometry], ring_names=[block_name])
    flask = server("flask-gunicorn", [PYTHON, str(BENCH / "servers" / "flask_echo.py")])
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
    # Each server leads its own session, so its pid is its process group.
    targets = {
        "shm-spin": {"url": f"shm://{spin_name}", "spin_us": SPIN_US, "server_pgid": echo.pid},
        # The same server, with the Go client confined to one CPU: on a 2-CPU host two busy
        # client threads take CPU time from the server's loop (bench/README.md).
        "shm-spin-1p": {"url": f"shm://{spin_name}", "spin_us": SPIN_US, "server_pgid": echo.pid,
                        "gomaxprocs": 1},
        "shm-block": {"url": f"shm://{block_name}", "spin_us": 0, "server_pgid": block.pid},
        "unix": {"url": e.address("unix"), "conns": conns, "server_pgid": echo.pid},
        "tcp": {"url": e.address("tcp"), "conns": conns, "server_pgid": echo.pid},
        "http-uvicorn": {"url": e.address("http"), "conns": conns, "server_pgid": echo.pid},
        "http-flask": {"url": flask_url, "conns": conns, "server_pgid": flask.pid},
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
    servers = [echo, bare, block, flask, grpc, *mq.values(), *model_servers.values()]
    return {"targets": targets, "skipped": skipped,
            "servers": {s.name: s.proc.args for s in servers}}


# -- measurements ---------------------------------------------------------------------------

class Cell:
    """One (target, op, size, conc) measurement, merged over repetitions."""

    def __init__(self, target: str, op: str, size: int, conc: int):
        self.target, self.op, self.size, self.conc = target, op, size, conc
        self.hist = HdrHistogram(*HIST_ARGS)
        self.elapsed_ns = 0
        self.units = 1
        self.cpu_s: dict[str, float] = {}  # only for cells the Go driver measured
        self.reps: list[dict] = []

    def add(self, hist: HdrHistogram, elapsed_ns: int, units: int = 1,
            cpu_s: dict | None = None) -> None:
        self.hist.add(hist)
        self.elapsed_ns += elapsed_ns
        self.units = units
        for side, seconds in (cpu_s or {}).items():
            self.cpu_s[side] = self.cpu_s.get(side, 0.0) + seconds
        self.reps.append({"p50_us": hist.get_value_at_percentile(50) / 1e3,
                          "per_s": hist.get_total_count() * units / elapsed_ns * 1e9})

    def p(self, percentile: float) -> float:
        """Latency percentile in µs."""
        return self.hist.get_value_at_percentile(percentile) / 1e3

    @property
    def per_s(self) -> float:
        """Calls (or, for batches, units) per second over all repetitions."""
        return self.hist.get_total_count() * self.units / self.elapsed_ns * 1e9

    def cores(self, side: str) -> float | None:
        """CPUs kept busy on one side during the measured windows."""
        return self.cpu_s[side] / self.elapsed_ns * 1e9 if side in self.cpu_s else None

    def summary(self) -> dict:
        h = self.hist
        return {"target": self.target, "op": self.op, "size": self.size, "conc": self.conc,
                "count": h.get_total_count(), "units_per_call": self.units,
                "p50_us": self.p(50), "p90_us": self.p(90), "p99_us": self.p(99),
                "p999_us": self.p(99.9), "max_us": h.get_max_value() / 1e3,
                "mean_us": h.get_mean_value() / 1e3, "per_s": self.per_s,
                "client_cores": self.cores("client"), "server_cores": self.cores("server"),
                "reps": self.reps,
                "hist": h.encode().decode()}


class Results:
    def __init__(self):
        self.cells: dict[tuple, Cell] = {}

    def cell(self, target: str, op: str, size: int, conc: int) -> Cell:
        key = (target, op, size, conc)
        if key not in self.cells:
            self.cells[key] = Cell(*key)
        return self.cells[key]

    def get(self, target: str, op: str, size: int, conc: int) -> Cell | None:
        return self.cells.get((target, op, size, conc))


def run_floor(results: Results, config: Config, tmp: Path, rng: random.Random) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    placements = {"floor-spin": ("spin", cpus[:2]), "floor-sem-1cpu": ("sem", cpus[:1] * 2),
                  "floor-sem-2cpu": ("sem", cpus[:2])}
    runs = [(key, size) for key, (_, pin) in placements.items() if len(pin) == 2
            for size in config.sizes]
    rng.shuffle(runs)
    samples = tmp / "floor.bin"
    for key, size in runs:
        mode, pin = placements[key]
        proc = subprocess.run([str(PINGPONG), "--mode", mode, "--size", str(size), "--seconds",
                               str(config.floor_seconds), "--warmup-seconds",
                               str(config.floor_seconds / 5), "--samples", str(samples),
                               "--cpus", f"{pin[0]},{pin[1]}"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise BenchError(f"{key} {size} B failed: {proc.stderr.strip()}")
        info = json.loads(proc.stdout)
        hist = HdrHistogram(*HIST_ARGS)
        # Record each distinct latency once with its count: millions of samples, a few
        # thousand distinct values.
        values, counts = np.unique(np.fromfile(samples, np.uint32), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            hist.record_value(max(value, 1), count)
        results.cell(key, "echo", size, 1).add(hist, info["elapsed_ns"])


def echo_cells(config: Config, keys: list[str]) -> list[dict]:
    return [{"target": key, "op": "echo", "size": size, "conc": conc}
            for key in keys for size in config.sizes for conc in config.concs]


def run_go(results: Results, config: Config, targets: dict, cells: list[dict],
           rng: random.Random) -> None:
    cells = list(cells)
    rng.shuffle(cells)
    used = {c["target"] for c in cells}
    plan = {"targets": {k: v for k, v in targets.items() if k in used}, "cells": cells,
            "warmup_ms": config.warmup_ms, "measure_ms": config.measure_ms,
            "min_calls": MIN_CALLS}
    budget = len(cells) * (config.warmup_ms + config.measure_ms) / 1e3 + 120
    try:
        proc = subprocess.run([str(GOBENCH)], input=json.dumps(plan), capture_output=True,
                              text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"Go driver still running after {budget:.0f} s: a server hangs") \
            from None
    if proc.returncode:
        raise BenchError(f"Go driver failed:\n{proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        if r["errors"]:
            raise BenchError(f"{r['target']} {r['op']} {r['size']} B x{r['conc']}: "
                             f"{r['errors']} failed call(s), first: {r['first_error']}")
        if not r["count"]:
            raise BenchError(f"{r['target']} {r['op']} {r['size']} B x{r['conc']}: no call "
                             "completed in the measuring window")
        results.cell(r["target"], r["op"], r["size"], r["conc"]).add(
            HdrHistogram.decode(r["hist"]), r["elapsed_ns"], r["units"],
            {"client": r["client_cpu_s"], "server": r["server_cpu_s"]})


def run_inprocess(results: Results, config: Config, section: ModelSection) -> None:
    proc = subprocess.run([PYTHON, str(BENCH / "inprocess.py"), *section.inprocess_args,
                           "--seconds", str(config.model_seconds)],
                          capture_output=True, text=True, timeout=MODEL_START_TIMEOUT, cwd=ROOT)
    if proc.returncode:
        raise BenchError(f"in-process {section.key} baseline failed:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    for m in json.loads(proc.stdout.splitlines()[-1])["measurements"]:
        results.cell(f"inprocess-{section.key}", m["op"], m["size"], 1).add(
            HdrHistogram.decode(m["hist"]), m["elapsed_ns"], m["units"])


# -- goals ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Goal:
    name: str
    text: str
    value: float | None  # the ratio (or rate) checked
    limit: float
    at_most: bool  # True: value <= limit passes
    detail: str
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def goals(results: Results, cifar: ModelSection) -> list[Goal]:
    """Each goal is judged per repetition, on cells measured minutes apart at most, and the
    median over repetitions decides. Merged histograms weigh each repetition by its call
    count, and a closed loop makes the most calls when the machine is fastest: on a shared
    machine whose scheduler switches regimes (a wake-up within one CPU or across two), a
    ratio of merged p50s can pair one regime's numerator with another's denominator."""
    def ratio_goal(name, text, num, dens, limit, at_most, metric="p50_us", unit="x",
                   skipped=None):
        """num over dens, per repetition; several dens (floors): the lowest each time."""
        a, bs = results.get(*num), [results.get(*den) for den in dens]
        if a is None or None in bs:
            return Goal(name, text, None, limit, at_most, skipped or "not measured", unit)
        tops = [r[metric] for r in a.reps]
        bottoms = [min(b.reps[i][metric] for b in bs) for i in range(len(tops))] if bs \
            else [1e3] * len(tops)  # no denominator: an absolute rate, in k/s
        ratios = [x / y for x, y in zip(tops, bottoms)]
        fmt = fmt_us if metric == "p50_us" else fmt_rate
        what = "p50 µs" if metric == "p50_us" else "per s"
        names = dens[0][0] if len(dens) == 1 else f"min({', '.join(d[0] for d in dens)})"
        detail = "per rep " + " ".join(f"{r:.2f}" for r in ratios) + f"; {num[0]} " + \
            " ".join(fmt(x) for x in tops) + (f" vs {names} " + " ".join(
                fmt(y) for y in bottoms) if bs else "") + f" ({what})"
        return Goal(name, text, statistics.median(ratios), limit, at_most, detail, unit)

    def echo(target, conc=1):
        return (target, "echo", IMAGE, conc)

    batch = IMAGE * CLASSIFY_BATCH
    return [
        ratio_goal("shm-vs-spin-floor", "shm echo p50 at 3072 B <= 2.0x the C spin floor",
                   echo("shm-spin"), [echo("floor-spin")], 2.0, True),
        ratio_goal("shm-vs-unix", "shm echo p50 at 3072 B >= 8x faster than the Unix socket",
                   echo("unix"), [echo("shm-spin")], 8.0, False),
        ratio_goal("metrics-overhead", "shm echo p50 at 3072 B with metrics on <= 1.03x metrics "
                   "off", echo("shm-spin"), [echo("shm-nometrics")], 1.03, True),
        ratio_goal("shm-vs-zmq", "shm echo p50 at 3072 B >= 10x faster than ZeroMQ over ipc",
                   echo("zmq-ipc"), [echo("shm-spin")], 10.0, False),
        ratio_goal("shm-vs-nng", "shm echo p50 at 3072 B >= 10x faster than NNG over ipc",
                   echo("nng-ipc"), [echo("shm-spin")], 10.0, False),
        ratio_goal("block-vs-sem-floor", "block-only shm echo p50 at 3072 B <= 1.5x the C "
                   "semaphore floor", echo("shm-block"), [echo(f) for f in SEM_FLOORS], 1.5, True),
        ratio_goal("shm-throughput", "shm echo at 3072 B, 16 in flight >= 500k msgs/s",
                   echo("shm-spin", 16), [], 500.0, False, "per_s", "k/s"),
        ratio_goal("shm-vs-unix-throughput", "shm echo at 3072 B, 16 in flight >= 5x the Unix "
                   "socket's", echo("shm-spin", 16), [echo("unix", 16)], 5.0, False, "per_s"),
        ratio_goal("classify-vs-inprocess", f"classify p50 over shm (client spin "
                   f"{LONG_SPIN_US:.0f} µs) <= 1.10x in-process predict_one p50",
                   ("cifar-shm-long", "classify", IMAGE, 1),
                   [("inprocess-cifar", "predict_one", IMAGE, 1)], 1.10, True,
                   skipped=cifar.skipped),
        ratio_goal("batch-vs-inprocess", f"CLASSIFY_BATCH of {CLASSIFY_BATCH} over shm >= 90% "
                   f"of in-process batch-{CLASSIFY_BATCH} images/s",
                   ("cifar-shm", "classify_batch", batch, 2),
                   [("inprocess-cifar", "predict_batch", batch, 1)], 0.90, False, "per_s",
                   skipped=cifar.skipped),
    ]


# -- report ---------------------------------------------------------------------------------

def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else ""
    except OSError:
        return ""


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    packages = {}
    for dist in ("numpy", "posix_ipc", "uvicorn", "uvloop", "httptools", "flask", "gunicorn",
                 "grpcio", "hdrhistogram", "ai-edge-litert"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[dist] = importlib.metadata.version(dist)
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "kernel": platform.release(),
            "platform": platform.platform(), "python": platform.python_version(),
            "go": tool_version(["go", "version"]), "gcc": tool_version(["gcc", "--version"]),
            "packages": packages}


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v < 1e3 else f"{v / 1e3:.1f}k" if v < 1e6 else f"{v / 1e6:.2f}M"


def fmt_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 and not size % (1 << 20) else \
        f"{size >> 10} KiB" if size >= 1 << 10 and not size % (1 << 10) and size != IMAGE else \
        f"{size} B"


def markdown(report: dict, results: Results, goal_list: list[Goal], config: Config,
             sections: list[ModelSection], png_stem: str) -> str:
    m = report["machine"]
    load = report["load"]
    lines = [
        "# shmserve transport benchmark",
        "",
        f"Generated by `bench/run.py{' --quick' if report['quick'] else ''}` on {report['date']} "
        f"at commit `{report['commit']}`{' (dirty tree)' if report['dirty'] else ''}.",
        "",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, Linux {m['kernel']}; {m['go']}; "
        f"Python {m['python']}.",
        f"- Load average (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load['start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in load['end'])} at end.",
        f"- {config.reps} repetition(s), cells shuffled within each; per cell {config.warmup_ms} "
        f"ms warm-up then {config.measure_ms} ms measured, closed loop, `conc` calls in flight. "
        f"Floor: {config.floor_seconds} s per size and mode.",
        "- Latencies are round trips from the Go caller's view (HdrHistogram, merged over "
        "repetitions); `x floor` is p50 over the C floor's p50 at the same size (the lower "
        "semaphore floor of the two placements); `CPUs @1` is "
        "the CPU time the Go client + the server's processes used per second of a 1-in-flight "
        "cell (what spinning, or a heavy stack, costs).",
        "",
        "## Goals",
        "",
        "| goal | measured | limit | result | from |",
        "|---|---:|---:|---|---|",
    ]
    for g in goal_list:
        value = "-" if g.value is None else f"{g.value:.2f}{g.unit}" if g.unit == "x" else \
            f"{g.value:.0f}{g.unit}"
        limit = f"{'<=' if g.at_most else '>='} {g.limit:g}{g.unit}"
        lines.append(f"| {g.text} | {value} | {limit} | **{g.verdict}** | {g.detail} |")
    lines += ["", "## Echo", ""]
    concs = config.concs
    head = ("| transport | p50 µs | p99 µs | x spin floor | x sem floor | CPUs @1 | "
            + " | ".join(f"msgs/s @{c}" for c in concs) + f" | p50 µs @{concs[-1]} |")
    for size in config.sizes:
        spin_floor = results.get("floor-spin", "echo", size, 1)
        sem_floor = min((results.get(f, "echo", size, 1) for f in SEM_FLOORS
                         if results.get(f, "echo", size, 1)), key=lambda c: c.p(50),
                        default=None)

        def times(cell, floor):
            return f"{cell.p(50) / floor.p(50):.1f}" if floor else "-"

        lines += [f"### {fmt_size(size)}", "", head, "|---" + "|---:" * (6 + len(concs)) + "|"]
        for key in [t.key for t in (*FLOORS, *ECHO_TRANSPORTS)]:
            one = results.get(key, "echo", size, 1)
            if one is None:
                continue
            many = [results.get(key, "echo", size, c) for c in concs]
            top = many[-1]
            cpus = "-" if one.cores("client") is None else \
                f"{one.cores('client'):.2f}+{one.cores('server'):.2f}"
            lines.append(
                f"| {LABELS[key]} | {fmt_us(one.p(50))} | {fmt_us(one.p(99))} "
                f"| {times(one, spin_floor)} | {times(one, sem_floor)} "
                f"| {cpus} | "
                + " | ".join(fmt_rate(c.per_s if c else None) for c in many)
                + f" | {fmt_us(top.p(50) if top else None)} |")
        lines.append("")
    lines += ["## Models", "",
              "Each model's server runs shm, unix and http; `x in-process` divides a p50 by the "
              "in-process call's p50 measured in the same run; items/s counts images for "
              "classify, calls otherwise.", ""]
    for section in sections:
        lines += [f"### {section.title}", ""]
        if section.skipped:
            lines += [f"Skipped: {section.skipped}", ""]
            continue
        base = results.get(f"inprocess-{section.key}", *section.baseline, 1)
        inproc = [c for c in results.cells.values() if c.target == f"inprocess-{section.key}"]
        served = [results.get(c["target"], c["op"], c["size"], c["conc"]) for c in section.cells]
        lines += ["| path | in flight | p50 µs | p99 µs | x in-process | items/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for c in [*inproc, *served]:
            where = "in-process" if c.target.startswith("inprocess") else \
                f"over {TARGET_LABELS[c.target.split('-', 1)[1]]}"
            batch = f", batch of {c.units}" if c.units > 1 else ""
            ratio = f"{c.p(50) / base.p(50):.2f}" if base and not batch else "-"
            lines.append(f"| `{c.op}` {where}{batch} | {c.conc} | {fmt_us(c.p(50))} "
                         f"| {fmt_us(c.p(99))} | {ratio} | {c.per_s:,.0f} |")
        lines.append("")
    lines += ["", "## Plots", "", f"![latency CDF at 3072 B]({png_stem}-cdf.png)", "",
              f"![throughput vs concurrency]({png_stem}-throughput.png)", ""]
    return "\n".join(lines)


def plots(results: Results, config: Config, stem: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    percentiles = np.concatenate([np.linspace(0.1, 99, 200), [99.5, 99.9, 99.99]])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key in [t.key for t in (*FLOORS, *ECHO_TRANSPORTS)]:
        c = results.get(key, "echo", IMAGE, 1)
        if c is None:
            continue
        xs = [c.hist.get_value_at_percentile(p) / 1e3 for p in percentiles]
        ax.plot(xs, percentiles / 100, label=LABELS[key],
                linestyle="--" if key.startswith("floor") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency (µs, log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Echo latency CDF, 3072 B payload, 1 in flight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(f"{stem}-cdf.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for t in ECHO_TRANSPORTS:
        pts = [(c, results.get(t.key, "echo", IMAGE, c)) for c in config.concs]
        pts = [(c, cell.per_s) for c, cell in pts if cell]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=t.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(config.concs, [str(c) for c in config.concs])
    ax.set_yscale("log")
    ax.set_xlabel("calls in flight")
    ax.set_ylabel("echo round trips per second (log scale)")
    ax.set_title("Echo throughput vs concurrency, 3072 B payload")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}-throughput.png", dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------

def check_built() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (PINGPONG, GOBENCH) if not p.exists()]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run `make bench-build` first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes, "
                        "concurrencies and repetitions, short cells")
    parser.add_argument("--reps", type=int, help="repetitions (default: 3, quick 1)")
    parser.add_argument("--out-dir", type=Path, help="default bench/results, or "
                        "bench/results/tmp for --quick")
    parser.add_argument("--transports", default=",".join(t.key for t in ECHO_TRANSPORTS),
                        help="echo transports to measure, comma-separated (default: all)")
    parser.add_argument("--skip-models", action="store_true",
                        help="echo only: skip the classify and prompt sections")
    parser.add_argument("--cifar-model", help="LiteRT model to serve (default: the shipped one)")
    parser.add_argument("--cifar-threads", type=int, default=2,
                        help="LiteRT threads, for the server and the in-process baseline alike")
    parser.add_argument("--gemma-checkpoint", help="Gemma checkpoint for the prompt section "
                        "(default: a tiny random one, made once under bench/build)")
    parser.add_argument("--gemma-tokenizer", help="its tokenizer.model")
    parser.add_argument("--gemma-variant", help="its architecture name")
    parser.add_argument("--seed", type=int, default=1, help="cell order shuffle seed")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal FAILs")
    args = parser.parse_args()
    keys = [k.strip() for k in args.transports.split(",") if k.strip()]
    if unknown := set(keys) - {t.key for t in ECHO_TRANSPORTS}:
        parser.error(f"unknown transport(s) {', '.join(sorted(unknown))}; known: "
                     f"{', '.join(t.key for t in ECHO_TRANSPORTS)}")
    config = QUICK if args.quick else FULL
    if args.reps:
        config = dataclasses.replace(config, reps=args.reps)
    out_dir = args.out_dir or (BENCH / "results" / ("tmp" if args.quick else ""))

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)

    check_built()
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(f"warning: 1-minute load average {load_start[0]:.1f} on "
              f"{len(os.sched_getaffinity(0))} CPUs: other work will show in these numbers",
              file=sys.stderr)
    results = Results()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmserve-bench-")))
        sections = model_sections(args, args.quick)
        print("starting servers ...", file=sys.stderr, flush=True)
        state = start_servers(stack, config, tmp, sections)
        live = [s for s in sections if not s.skipped]
        for section in sections:
            if section.skipped:
                print(f"SKIP {section.title}: {section.skipped}", file=sys.stderr)
        for key, why in state["skipped"].items():
            print(f"SKIP {key}: {why}", file=sys.stderr)
        keys = [k for k in keys if k not in state["skipped"]]
        cells = echo_cells(config, keys) + [c for s in live for c in s.cells]
        for rep in range(config.reps):
            rng = random.Random(args.seed * 1000 + rep)
            print(f"rep {rep + 1}/{config.reps}: floor, "
                  f"{''.join(f'in-process {s.key}, ' for s in live)}{len(cells)} Go cells ... "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            run_floor(results, config, tmp, rng)
            for section in live:
                run_inprocess(results, config, section)
            run_go(results, config, state["targets"], cells, rng)
    goal_list = goals(results, next(s for s in sections if s.key == "cifar"))

    commit = git("rev-parse", "--short", "HEAD") or "nocommit"
    report = {
        "date": started.isoformat(timespec="seconds"), "commit": commit,
        "commit_full": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "quick": args.quick, "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine_info(),
        "load": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(config) | {"spin_us": SPIN_US, "slots": SLOTS,
                                                "seed": args.seed},
        "servers": state["servers"], "skipped_transports": state["skipped"],
        "models": {s.key: {"title": s.title, "skipped": s.skipped, "server": s.server}
                   for s in sections},
        "goals": [g.as_dict() for g in goal_list],
        "cells": [c.summary() for c in results.cells.values()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{started:%Y-%m-%d}-{commit}"
    (stem.with_suffix(".json")).write_text(json.dumps(report, indent=1) + "\n")
    (stem.with_suffix(".md")).write_text(markdown(report, results, goal_list, config, sections, stem.name))
    plots(results, config, stem)
    latest = out_dir / "latest"
    shutil.copyfile(stem.with_suffix(".json"), latest.with_suffix(".json"))
    latest.with_suffix(".md").write_text(markdown(report, results, goal_list, config, sections, "latest"))
    for kind in ("cdf", "throughput"):
        shutil.copyfile(f"{stem}-{kind}.png", f"{latest}-{kind}.png")

    print(markdown(report, results, goal_list, config, sections, stem.name).split("## Plots")[0])
    width = max(len(g.text) for g in goal_list)
    for g in goal_list:
        shown = "n/a" if g.value is None else f"{g.value:.2f}{g.unit}"
        print(f"{g.verdict:4}  {g.text:<{width}}  {shown:>10}  "
              f"(limit {'<=' if g.at_most else '>='} {g.limit:g}{g.unit})")
    print(f"wrote {stem}.json/.md/-cdf.png/-throughput.png and {latest}.* "
          f"in {report['duration_s']} s")
    return 1 if args.strict and any(g.verdict == "FAIL" for g in goal_list) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
