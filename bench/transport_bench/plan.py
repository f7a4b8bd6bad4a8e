"""What one run measures: the transports and floors, the sizes and concurrencies, the
model sections and their cells, and where the tools live."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent

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
    Transport("shm-block-1cpu", "shm ring, block only, client and server on 1 CPU"),
    Transport("unix", "Unix socket, classic packets"),
    Transport("unix-classic", "Unix socket, the classic one-client Python server"),
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


def bench_cpus() -> list[int]:
    """Where the pinned placements run: the first two CPUs this process may use."""
    return sorted(os.sched_getaffinity(0))[:2]


# The block-only ring is placed as the semaphore floor is, the scheduler's choice standing
# for two CPUs, so that its best placement is judged against the floor's best.
BLOCK_PLACEMENTS = ("shm-block", "shm-block-1cpu")
LABELS = {t.key: t.label for t in (*ECHO_TRANSPORTS, *FLOORS)}
MODEL_START_TIMEOUT = 180  # the Gemma server imports JAX and compiles before it is ready


class BenchError(RuntimeError):
    pass



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
