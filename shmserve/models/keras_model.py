"""Serve any Keras 3 model file: ``shmserve serve --model keras --model-path FILE.keras``.

The signature is read from the model: its inputs and outputs by name, dtype and shape (a
``None`` dim is -1). A model whose every input and output has a ``None`` dim 0 is served
batched, up to ``max_batch_size`` rows (``--model-option max_batch_size=N``, default 64).
``--model-option labels=FILE`` (one class name per line, in output order) adds CLASSIFY,
CLASSIFY_SCORES and CLASSIFY_BATCH for a model whose first output is one probability per
label.

The backend is ``KERAS_BACKEND`` when set, JAX otherwise: on CPU it ran the shipped CIFAR CNN
fastest (bench/README.md). With JAX the model's forward pass is jitted over its weights and
compiled at warm-up for every padded batch bucket (see ``jax_model``); with TensorFlow it is one
``tf.function`` traced once for any batch size; other backends call the model eagerly.
``--threads N`` sizes the backend's CPU thread pool (XLA's under JAX, the intra-op pool under
TensorFlow; default one thread per CPU): one thread ran the CIFAR CNN's one-image call faster
on a 2-CPU machine, all of them its batches of 64 (bench/README.md).
"""
from __future__ import annotations

import functools
import os
from os import PathLike
from pathlib import Path

from shmserve import Model, Signature, TensorSpec
from shmserve.models import thread_count
from shmserve.models.jax_model import Compiled, configure_cpu_client


def _spec(name: str, tensor) -> TensorSpec:
    return TensorSpec(name, str(tensor.dtype), [-1 if d is None else int(d) for d in tensor.shape])


def _read_labels(path: str) -> list[str]:
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"labels file {path} has no labels")
    return labels


class KerasModel(Model):
    """A .keras file served with the signature its inputs and outputs declare."""

    def __init__(self, path: str | PathLike[str], max_batch_size: int = 64,
                 labels: str | None = None, name: str | None = None,
                 threads: int | None = None):
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        self.backend = keras.backend.backend()
        # Before loading, which starts the backend's runtime, whose thread pools these size.
        if self.backend == "jax":
            configure_cpu_client(threads)
        elif threads is not None and self.backend == "tensorflow":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(thread_count(threads))
        elif threads is not None:
            raise ValueError(f"threads: the {self.backend} backend's threads are not set by "
                             f"shmserve; leave --threads out")
        self.path = Path(path)
        self.keras = keras.saving.load_model(self.path, compile=False)
        self.name = name or self.path.stem
        inputs = [_spec(t.name, t) for t in self.keras.inputs]
        outputs = [_spec(n, t) for n, t in zip(self.keras.output_names, self.keras.outputs)]
        batched = all(s.shape and s.shape[0] == -1 for s in inputs + outputs)
        self.signature = Signature(inputs, outputs, int(max_batch_size) if batched else 0)
        if labels:
            self.labels = _read_labels(labels)
            if outputs[0].shape[-1:] != (len(self.labels),):
                raise ValueError(f"{len(self.labels)} labels, but output {outputs[0].name!r} "
                                 f"has shape {list(outputs[0].shape)}")
        # Only XLA under JAX compiles a program per shape; the others take any batch size.
        self.compiled = Compiled(self._forward(), self.signature,
                                 pad_batches=self.backend == "jax")

    def _forward(self):
        """The model's forward pass as ``call(*arrays)``, compiled the way the backend does best."""
        model, many = self.keras, len(self.signature.inputs) > 1
        if self.backend == "jax":
            import jax

            def forward(trainable, non_trainable, *xs):
                outputs, _ = model.stateless_call(trainable, non_trainable,
                                                  list(xs) if many else xs[0], training=False)
                return outputs

            # Weights are arguments, not constants folded into every compiled program.
            return functools.partial(jax.jit(forward),
                                     [v.value for v in model.trainable_variables],
                                     [v.value for v in model.non_trainable_variables])
        if self.backend == "tensorflow":
            import tensorflow as tf

            specs = [tf.TensorSpec([None if d == -1 else d for d in s.shape], s.dtype.np)
                     for s in self.signature.inputs]

            @tf.function(input_signature=specs, autograph=False)
            def forward(*xs):
                return model(list(xs) if many else xs[0], training=False)

            return lambda *xs: _to_numpy(forward(*xs))
        return lambda *xs: _to_numpy(model(list(xs) if many else xs[0], training=False))

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.path), "backend": self.backend}

    def warmup(self) -> None:
        self.compiled.warmup()

    def infer(self, inputs):
        return self.compiled.run([inputs[spec.name] for spec in self.signature.inputs])


def _to_numpy(outputs):
    import keras

    if isinstance(outputs, (list, tuple)):
        return [keras.ops.convert_to_numpy(o) for o in outputs]
    if isinstance(outputs, dict):
        return {k: keras.ops.convert_to_numpy(o) for k, o in outputs.items()}
    return keras.ops.convert_to_numpy(outputs)


def build(model_path: str | None = None, max_batch_size: int = 64,
          labels: str | None = None, threads: int | None = None) -> KerasModel:
    if not model_path:
        raise ValueError("--model keras needs --model-path FILE.keras")
    if not Path(model_path).is_file():  # before importing Keras, which takes seconds
        raise ValueError(f"{model_path}: no such file")
    return KerasModel(model_path, max_batch_size=max_batch_size, labels=labels, threads=threads)
