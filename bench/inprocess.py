"""In-process baselines for the end-to-end model benchmark (bench/run.py): the model called
directly in this Python process, with no transport at all.

    python bench/inprocess.py cifar [--model-path P] [--threads T] [--batch N] [--seconds S]
    python bench/inprocess.py gemma --checkpoint DIR --tokenizer FILE --variant V
                                    --cache-length N --max-new-tokens-limit N
                                    --prompt TEXT --steps N [--seconds S]

cifar: ``CifarClassifier.predict_one`` on one image (the fastest single-image call the served
model has) and ``predict`` on a batch, with the class, model file and thread count the
server uses. gemma: ``GemmaEngine.generate`` on one prompt, built with the server's cache
and output limits so it runs the same compiled shapes.

Prints one JSON line, ``{"measurements": [...]}``, each with op, size, units per call, call
count, elapsed ns and the per-call latency HdrHistogram (V2 compressed base64, ns): the
same shape as the Go driver's results, merged across repetitions the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The Go driver's histogram range and precision: 1 ns .. 1 min, 3 digits.
HIST_ARGS = (1, 60 * 10**9, 3)
IMAGE = 3072


def timed(op: str, size: int, fn, seconds: float, units: int = 1) -> dict:
    """Closed-loop calls of ``fn`` for ``seconds``, after a quarter of that as warm-up."""
    until = time.perf_counter() + seconds / 4
    while time.perf_counter() < until:
        fn()
    hist = HdrHistogram(*HIST_ARGS)
    clock = time.perf_counter_ns
    started = now = clock()
    until = started + int(seconds * 1e9)
    while now < until:
        fn()
        end = clock()
        hist.record_value(end - now)
        now = end
    return {"op": op, "size": size, "units": units, "count": hist.get_total_count(),
            "elapsed_ns": now - started, "hist": hist.encode().decode()}


def cifar(args) -> list[dict]:
    from shmserve.models.cifar import DEFAULT_MODEL_PATH, CifarClassifier

    classifier = CifarClassifier(args.model_path or DEFAULT_MODEL_PATH, num_threads=args.threads)
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, 3, 32, 32), np.uint8)
    one = batch[0].copy()
    classifier.warmup((1, args.batch))
    return [timed("predict_one", IMAGE, lambda: classifier.predict_one(one), args.seconds),
            timed("predict_batch", IMAGE * args.batch, lambda: classifier.predict(batch),
                  args.seconds, args.batch)]


def gemma(args) -> list[dict]:
    from shmserve.models.gemma_engine import GemmaEngine

    engine = GemmaEngine(args.checkpoint, args.tokenizer, args.variant,
                         cache_length=args.cache_length,
                         max_new_tokens_limit=args.max_new_tokens_limit)
    engine.warmup((1,), stream=False)
    return [timed("generate", len(args.prompt.encode()),
                  lambda: engine.generate([args.prompt], args.steps), args.seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    c = sub.add_parser("cifar")
    c.add_argument("--model-path", default=None)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--batch", type=int, default=64)
    g = sub.add_parser("gemma")
    for flag in ("--checkpoint", "--tokenizer", "--variant", "--prompt"):
        g.add_argument(flag, required=True)
    for flag in ("--cache-length", "--max-new-tokens-limit", "--steps"):
        g.add_argument(flag, type=int, required=True)
    for p in (c, g):
        p.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    measure = {"cifar": cifar, "gemma": gemma}[args.model]
    print(json.dumps({"measurements": measure(args)}))


if __name__ == "__main__":
    main()
