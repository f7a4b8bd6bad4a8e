"""The model adapters: a .keras file, a .tflite file and a JAX function served with no server
code, their signatures read from the model, called from Go over the ring and a socket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from shmserve.client import RingClient
from shmserve.models import build
from shmserve.models.cifar import DEFAULT_MODEL_PATH, CifarClassifier
from shmserve.protocol import LABELS, MsgType

KERAS_CIFAR = os.path.join(REPO, "shmserve", "assets", "cifar10_cnn.keras")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def go_infer(shmclient, addr: str, out_dir, *inputs: str) -> dict[str, np.ndarray]:
    """`shmclient infer` with NAME=FILE.npy inputs; the outputs it wrote, by name."""
    argv = [shmclient, "infer", "-addr", addr, "-out", str(out_dir)]
    for spec in inputs:
        argv += ["-input", spec]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {p[:-4]: np.load(os.path.join(out_dir, p)) for p in os.listdir(out_dir)}


def serve_fails(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shmserve.cli", "serve", "--transport", "unix",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1]


def test_the_shipped_cifar_keras_file_serves_through_the_keras_adapter(start_server, shmclient,
                                                                       tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    server = start_server("--model", "keras", "--model-path", KERAS_CIFAR, "--model-option",
                          f"labels={labels}", "--transport", "shm,unix", ready_timeout=300)
    batch = images(5)
    np.save(tmp_path / "x.npy", batch)
    reference = CifarClassifier().predict(batch)  # the LiteRT export of the same weights
    for transport in ("shm", "unix"):
        out = tmp_path / transport
        out.mkdir()
        got = go_infer(shmclient, server.ready.address(transport), out,
                       f"planar_rgb={tmp_path / 'x.npy'}")
        assert set(got) == {"logits"}
        assert got["logits"].dtype == np.float32 and got["logits"].shape == (5, 10)
        np.testing.assert_allclose(softmax(got["logits"]), reference, atol=1e-4)
    metadata = subprocess.run([shmclient, "metadata", "-addr", server.ready.address("shm")],
                              capture_output=True, text=True, timeout=60)
    assert metadata.returncode == 0, metadata.stderr
    signature = json.loads(metadata.stdout)
    assert signature["inputs"] == [{"name": "planar_rgb", "datatype": "UINT8",
                                    "shape": [-1, 3, 32, 32]}]
    assert signature["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert signature["max_batch_size"] == 64
    client = RingClient(server.name)
    try:
        msg_type, label = client.call(MsgType.CLASSIFY, batch[2].tobytes())
    finally:
        client.close()
    assert msg_type == MsgType.CLASSIFY and label.decode() == LABELS[int(reference[2].argmax())]


def test_the_litert_adapter_reads_the_signature_and_answers_every_batch_size():
    model = build("litert", {"model_path": str(DEFAULT_MODEL_PATH)}, {"max_batch_size": "16"})
    model.warmup()
    sig = model.signature
    assert [(s.name, s.dtype.name, s.shape) for s in sig.inputs] == [
        ("planar_rgb", "UINT8", (-1, 3, 32, 32))]
    assert [(s.name, s.dtype.name, s.shape) for s in sig.outputs] == [
        ("output_0", "FP32", (-1, 10))]
    assert sig.max_batch_size == 16
    reference = CifarClassifier()
    # More batch sizes than interpreters are kept, revisited: resized ones answer correctly.
    for n in (1, 3, 16, 2, 5, 7, 3, 1, 16):
        x = images(n, seed=n)
        np.testing.assert_allclose(model.infer({"planar_rgb": x})[0], reference.predict(x),
                                   atol=1e-6)


JAX_MODEL = '''
import jax.numpy as jnp
from shmserve import Signature, TensorSpec

SIGNATURE = Signature(
    [TensorSpec("x", "float32", (-1, 4)), TensorSpec("w", "float32", (-1, 4))],
    [TensorSpec("dot", "float32", (-1,)), TensorSpec("positive", "int32", (-1,))],
    max_batch_size=8)
NOT_A_SIGNATURE = 3

def score(x, w):
    return {"dot": (x * w).sum(axis=1), "positive": (x > 0).sum(axis=1).astype(jnp.int32)}
'''


@pytest.fixture
def jax_file(tmp_path):
    path = tmp_path / "scorer.py"
    path.write_text(textwrap.dedent(JAX_MODEL))
    return path


def test_a_jax_function_is_served_under_its_declared_signature(start_server, shmclient,
                                                               tmp_path, jax_file):
    server = start_server("--model", "jax", "--model-option", f"function={jax_file}:score",
                          "--transport", "shm,tcp", "--tcp-port", "0", ready_timeout=300)
    rng = np.random.default_rng(3)
    for transport, rows in (("shm", 3), ("tcp", 8), ("shm", 1)):  # 3 runs padded to 4
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        w = rng.standard_normal((rows, 4)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "w.npy", w)
        out = tmp_path / f"{transport}-{rows}"
        out.mkdir()
        got = go_infer(shmclient, server.ready.address(transport), out,
                       f"x={tmp_path / 'x.npy'}", f"w={tmp_path / 'w.npy'}")
        np.testing.assert_allclose(got["dot"], (x * w).sum(axis=1), rtol=1e-5)
        assert got["positive"].dtype == np.int32
        np.testing.assert_array_equal(got["positive"], (x > 0).sum(axis=1))


@pytest.mark.parametrize("args, says", [
    (("--model", "keras"), "--model-path"),
    (("--model", "litert"), "--model-path"),
    (("--model", "keras", "--model-path", "/nonexistent.keras"), "nonexistent.keras"),
    (("--model", "jax"), "function=MODULE:FN"),
])
def test_an_adapter_without_its_model_exits_2_saying_what_is_missing(args, says):
    assert says in serve_fails(*args)


def test_a_jax_target_that_is_not_a_function_or_signature_exits_2(jax_file):
    assert "no attribute 'nope'" in serve_fails("--model", "jax", "--model-option",
                                                 f"function={jax_file}:nope")
    line = serve_fails("--model", "jax", "--model-option", f"function={jax_file}:score",
                       "--model-option", f"signature={jax_file}:NOT_A_SIGNATURE")
    assert "not a shmserve.Signature" in line


def test_the_keras_adapter_serves_a_two_input_model_on_tensorflow_too(tmp_path):
    """Any Keras 3 model, on a backend chosen by KERAS_BACKEND: built and saved in one child,
    served in another (a server's fresh process, where ``threads`` can still size TensorFlow's
    intra-op pool), so the backend is picked before Keras is imported."""
    path = str(tmp_path / "two.keras")
    make = textwrap.dedent(f'''
        import os, numpy as np
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import keras
        a = keras.Input((3,), name="a", dtype="float32")
        b = keras.Input((2,), name="b", dtype="float32")
        out = keras.layers.Dense(1, name="y")(keras.layers.Concatenate()([a, b]))
        model = keras.Model([a, b], out)
        model.save({path!r})
        x, z = np.ones((5, 3), np.float32), np.full((5, 2), 2, np.float32)
        np.save({path + ".want.npy"!r}, model.predict([x, z], verbose=0))
    ''')
    serve = textwrap.dedent(f'''
        import os, numpy as np
        os.environ["KERAS_BACKEND"] = "tensorflow"
        from shmserve.models import build
        served = build("keras", {{"model_path": {path!r}, "threads": 1}}, {{}})
        served.warmup()
        assert served.backend == "tensorflow", served.backend
        import tensorflow as tf
        assert tf.config.threading.get_intra_op_parallelism_threads() == 1
        assert [s.name for s in served.signature.inputs] == ["a", "b"]
        assert served.signature.outputs[0].shape == (-1, 1)
        x, z = np.ones((5, 3), np.float32), np.full((5, 2), 2, np.float32)
        got = served.infer({{"a": x, "b": z}})[0]
        np.testing.assert_allclose(got, np.load({path + ".want.npy"!r}), rtol=1e-5)
        print("ok", got.shape)
    ''')
    for script in (make, serve):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (5, 1)" in done.stdout


@pytest.mark.parametrize("target, options", [
    ("keras", {"model_path": KERAS_CIFAR}),
    ("jax", {"function": "{jax_file}:score"}),
])
def test_jax_backed_adapters_run_inline_on_as_many_xla_threads_as_asked(target, options,
                                                                         jax_file):
    """Asynchronous CPU dispatch costs a served call two thread hand-offs, and XLA's pool is
    sized by ``threads``: the adapters set both before JAX makes its CPU client (in a child:
    the settings are the process's). One more thread than CPUs, which XLA's default never
    gives, shows the option took."""
    options = {k: v.format(jax_file=jax_file) for k, v in options.items()}
    threads = os.cpu_count() + 1
    script = textwrap.dedent(f'''
        import os
        from shmserve.models import build
        model = build({target!r}, {{"threads": {threads}}}, {options!r})
        model.warmup()
        import jax
        print("async", jax.config.values["jax_cpu_enable_async_dispatch"])
        names = [open(f"/proc/self/task/{{t}}/comm").read().strip()
                 for t in os.listdir("/proc/self/task")]
        print("xla pool", names.count("tf_XLAEigen"))
    ''')
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "async False" in done.stdout
    assert f"xla pool {threads}" in done.stdout, done.stdout


def test_a_serve_option_left_out_leaves_the_factory_default(start_server, tmp_path):
    """`--threads` given reaches a factory that names it; left out, the factory's own default
    applies (not None)."""
    factory = tmp_path / "threaded.py"
    factory.write_text(textwrap.dedent('''
        import shmserve

        class Threaded(shmserve.Model):
            def __init__(self, threads):
                self.threads = threads

            def describe(self):
                return {"model": "threaded", "threads": self.threads}

        def build(threads=7):
            return Threaded(threads)
    '''))
    target = f"{factory}:build"
    assert start_server("--model", target).ready.model["threads"] == 7
    assert start_server("--model", target, "--threads", "3").ready.model["threads"] == 3


@pytest.mark.parametrize("args", [
    ("--model", "keras", "--model-path", KERAS_CIFAR),
    ("--model", "litert", "--model-path", DEFAULT_MODEL_PATH),
    ("--model", "cifar"),
])
def test_threads_below_one_exits_2_naming_the_option(args):
    assert "threads must be at least 1, got 0" in serve_fails(*args, "--threads", "0")
