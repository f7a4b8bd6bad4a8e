"""Compare ways of running the CIFAR-10 CNN on CPU, to choose the serving path.

Every path gets what the server gets: uint8 planar (N, 3, 32, 32) numpy arrays
(the Keras model itself starts with Permute + Rescaling) and must hand back
numpy float32 softmax probabilities, so conversions are part of each timing.

Measured per path, in one run on one machine:
- single image: latency p50 / p99 of one (1, 3, 32, 32) call,
- batch of 64: images per second (and the p50 latency of one batch call).

Paths: Keras eager ``model(x)``, ``model.predict``, ``tf.function`` with and
without XLA ``jit_compile``, LiteRT (the served ``CifarClassifier``, uint8
planar input) with 1 and 2 threads plus the bare interpreter calls it wraps,
and Keras-on-JAX under ``jax.jit`` (in a subprocess, since the Keras backend is
fixed at import; skipped if jax is missing).

Needs TensorFlow, Keras and ai_edge_litert, e.g. the project's train group:
    python bench/inference_paths.py
Writes bench/results/inference_paths.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "shmserve" / "assets"
BATCH = 64


def measure(fn, x: np.ndarray, *, max_calls: int, budget_s: float) -> dict:
    """Latencies of ``fn(x)`` after a warm-up, within a call count and time budget."""
    for _ in range(20):
        fn(x)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_calls and time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        fn(x)
        times.append(time.perf_counter_ns() - start)
    us = np.asarray(times) / 1e3
    return {"calls": len(us), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "mean_us": float(us.mean())}


def bench_path(fn, single: np.ndarray, batch: np.ndarray, reference: np.ndarray, budget_s: float) -> dict:
    out = np.asarray(fn(batch))
    one = measure(fn, single, max_calls=5000, budget_s=budget_s)
    many = measure(fn, batch, max_calls=2000, budget_s=budget_s)
    return {
        "single_p50_us": one["p50_us"], "single_p99_us": one["p99_us"], "single_calls": one["calls"],
        "batch_images_per_s": len(batch) * 1e6 / many["mean_us"], "batch_p50_us": many["p50_us"],
        "batch_calls": many["calls"],
        "max_abs_diff_vs_litert": float(np.abs(out - reference).max()),
    }


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    batch = np.random.default_rng(seed).integers(0, 256, (BATCH, 3, 32, 32), np.uint8)
    return batch[:1].copy(), batch


def run_jax_worker(keras_path: Path, reference_path: Path, budget_s: float) -> dict:
    """Keras-on-JAX, run in this (sub)process with KERAS_BACKEND=jax."""
    import jax
    import keras

    model = keras.models.load_model(keras_path)
    # A pure function of (weights, x): jit then traces once per input shape and
    # keeps the weights as device buffers instead of baking in constants.
    weights = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def probabilities(trainable, non_trainable, x):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return jax.nn.softmax(logits, axis=-1)

    single, batch = inputs()
    result = bench_path(lambda x: np.asarray(probabilities(weights, fixed, x)), single, batch,
                        np.load(reference_path), budget_s)
    return {"path": f"Keras {keras.__version__} on JAX {jax.__version__}, jax.jit(stateless_call)", **result}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert", "jax", "jaxlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keras", type=Path, default=ASSETS / "cifar10_cnn.keras")
    parser.add_argument("--tflite", type=Path, default=ASSETS / "cifar10_cnn.tflite")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference_paths")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per measurement (default 3)")
    parser.add_argument("--jax-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.jax_worker:
        print(json.dumps(run_jax_worker(args.keras, args.jax_worker, args.budget)))
        return

    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from shmserve.models.cifar import CifarClassifier

    single, batch = inputs()
    started = _dt.datetime.now(_dt.timezone.utc)
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
            "batch": BATCH, "budget_s_per_measurement": args.budget,
            "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                           "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}}
    reference = CifarClassifier(args.tflite, num_threads=1).predict(batch)
    rows = []

    def add(name: str, fn) -> None:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append({"path": name, **bench_path(fn, single, batch, reference, args.budget)})

    for threads in (1, 2):
        clf = CifarClassifier(args.tflite, num_threads=threads)

        def served(x, clf=clf):
            return clf.predict_one(x[0])[np.newaxis] if len(x) == 1 else clf.predict(x)

        add(f"LiteRT CifarClassifier, {threads} thread(s) [served path]", served)

        # The interpreter calls the classifier wraps, minus its validation and
        # interpreter-per-size cache, to show what the wrapper costs. bench_path
        # changes N only between measurements, so no timed call resizes.
        interp = Interpreter(model_path=str(args.tflite), num_threads=threads)
        i_in, i_out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        size = [0]

        def bare(x, interp=interp, i_in=i_in, i_out=i_out, size=size):
            if len(x) != size[0]:
                interp.resize_tensor_input(i_in, x.shape)
                interp.allocate_tensors()
                size[0] = len(x)
            interp.set_tensor(i_in, x)
            interp.invoke()
            return interp.get_tensor(i_out)

        add(f"LiteRT bare Interpreter, {threads} thread(s)", bare)

    logits_model = keras.models.load_model(args.keras)
    model = keras.Model(logits_model.input, keras.layers.Softmax()(logits_model.output))
    add("Keras eager model(x)", lambda x: model(x, training=False).numpy())
    add("Keras model.predict", lambda x: model.predict(x, verbose=0, batch_size=BATCH))
    signature = [tf.TensorSpec((None, 3, 32, 32), tf.uint8)]
    plain = tf.function(lambda x: model(x, training=False), input_signature=signature)
    add("tf.function", lambda x: plain(x).numpy())
    xla = tf.function(lambda x: model(x, training=False), input_signature=signature, jit_compile=True)
    add("tf.function(jit_compile=True) (XLA)", lambda x: xla(x).numpy())

    if importlib.util.find_spec("jax") is not None:
        print("... Keras on JAX (subprocess)", file=sys.stderr, flush=True)
        reference_path = args.out.with_suffix(".reference.npy")
        reference_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(reference_path, reference)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--keras", str(args.keras), "--budget", str(args.budget),
                 "--jax-worker", str(reference_path)],
                env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, check=True)
        finally:
            reference_path.unlink()
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    info["results"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(info))
    print(markdown(info))


def markdown(info: dict) -> str:
    m, v = info["machine"], info["versions"]
    lines = [
        "# CIFAR-10 CNN inference paths",
        "",
        f"Generated by `bench/inference_paths.py` on {info['date']}.",
        "",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} (shared machine: expect noise).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- TensorFlow threads: intra-op {info['tf_threads']['intra_op'] or 'default'}, "
        f"inter-op {info['tf_threads']['inter_op'] or 'default'}.",
        "- Input: uint8 planar (N, 3, 32, 32) numpy; output: float32 softmax numpy. "
        f"Each measurement runs up to {info['budget_s_per_measurement']:g} s after 20 warm-up calls.",
        "",
        f"| path | single p50 (µs) | single p99 (µs) | batch-{info['batch']} images/s "
        f"| batch-{info['batch']} p50 (ms) | max abs diff vs LiteRT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in info["results"]:
        lines.append(f"| {r['path']} | {r['single_p50_us']:.0f} | {r['single_p99_us']:.0f} "
                     f"| {r['batch_images_per_s']:.0f} | {r['batch_p50_us'] / 1e3:.2f} "
                     f"| {r['max_abs_diff_vs_litert']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
