"""Serve a JAX function: ``shmserve serve --model jax --model-option function=MODULE:FN``.

``FN`` takes the inputs as arrays, in signature order, and returns one array, a sequence in
signature order or a dict by output name. The signature is the ``shmserve.Signature`` named
by ``--model-option signature=MODULE:NAME`` (default: ``SIGNATURE`` in FN's module); MODULE
is anything ``--model`` takes (``pkg.module`` or ``path/file.py``).

``FN`` is jitted, and every shape is compiled before the server reports ready: a batched
signature is run on batches padded up to a power of two (1, 2, 4, ... ``max_batch_size``),
so the server compiles log2(max_batch_size) + 1 programs at warm-up instead of one per batch
size the first time each arrives, which would stall that request for the compile.
``--threads N`` sizes XLA's CPU thread pool (see ``configure_cpu_client``).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from shmserve import Model, Signature
from shmserve.models import thread_count


def configure_cpu_client(threads: int | None = None) -> None:
    """Set up JAX's CPU client for serving; JAX reads these settings when it creates the
    client, so call this before anything makes an array. The settings are the process's, like
    the model it serves.

    Computations run on the calling thread: asynchronous dispatch hands every call to a worker
    thread and blocks the caller on the result, which a server needs at once (two thread
    hand-offs per call for nothing). ``threads`` sizes XLA's CPU thread pool (its default is
    one thread per CPU): a small model's one-row call runs faster on one thread, and is not
    slowed by a client spinning on the other CPU, while a large batch runs faster on all of
    them (bench/README.md has both measurements)."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if threads is not None:
        os.environ["PJRT_NPROC"] = str(thread_count(threads))  # what XLA sizes its pool by


def _buckets(max_batch_size: int) -> list[int]:
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch_size]


class Compiled:
    """A compiled callable (``call(*arrays)``, e.g. a ``jax.jit`` function), its outputs as
    numpy arrays in signature order; with ``pad_batches`` run on padded batch buckets, for
    compilers that specialise on every shape."""

    def __init__(self, call: Callable, signature: Signature, pad_batches: bool = True):
        self.call = call
        self.signature = signature
        batched = signature.max_batch_size > 0
        self.buckets = _buckets(signature.max_batch_size) if batched and pad_batches else []
        # bucket_of[rows]: the bucket a batch of that many rows is padded to.
        self._bucket_of = [next(b for b in self.buckets if b >= rows)
                           for rows in range(self.buckets[-1] + 1)] if self.buckets else []
        self._warm_rows = self.buckets or ([1] if batched else [None])

    def warmup(self) -> None:
        for rows in self._warm_rows:
            lead = () if rows is None else (rows,)
            self.run([np.zeros(lead + tuple(max(d, 1) for d in spec.shape[len(lead):]),
                               spec.dtype.np) for spec in self.signature.inputs])

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        rows = arrays[0].shape[0] if self.buckets else None
        bucket = self._bucket_of[rows] if rows is not None else None
        if bucket != rows:
            copies = []
            for array in arrays:
                pad = np.zeros((bucket, *array.shape[1:]), array.dtype)
                pad[:rows] = array
                copies.append(pad)
        else:
            # Inputs are views of the transport's buffer, and JAX keeps an argument it aliased
            # until its next call, past submit(): the lifetime rule wants a copy.
            copies = [np.array(array) for array in arrays]
        outputs = self.call(*copies)
        specs = self.signature.outputs
        if isinstance(outputs, dict):
            outputs = [outputs[spec.name] for spec in specs]
        elif not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        if len(outputs) != len(specs):
            raise TypeError(f"the function returned {len(outputs)} output(s); the signature "
                            f"declares {len(specs)}")
        if bucket != rows:
            return [np.asarray(out)[:rows] for out in outputs]
        return [np.asarray(out) for out in outputs]


class JaxModel(Model):
    """A JAX function served under a declared signature."""

    def __init__(self, function: Callable, signature: Signature, name: str | None = None):
        import jax

        self.name = name or getattr(function, "__name__", "jax")
        self.signature = signature
        self.compiled = Compiled(jax.jit(function), signature)

    def warmup(self) -> None:
        self.compiled.warmup()

    def infer(self, inputs):
        return self.compiled.run([inputs[spec.name] for spec in self.signature.inputs])


def build(function: str | None = None, signature: str | None = None,
          threads: int | None = None) -> JaxModel:
    from shmserve.models import ModelLoadError, resolve

    if not function:
        raise ModelLoadError("--model jax needs --model-option function=MODULE:FN")
    configure_cpu_client(threads)  # before FN's module, which may make arrays at import
    module = function.rpartition(":")[0]
    fn = resolve(function)
    sig = resolve(signature or f"{module}:SIGNATURE")
    if not callable(fn):
        raise ModelLoadError(f"{function} is a {type(fn).__name__}, not a function")
    if not isinstance(sig, Signature):
        raise ModelLoadError(f"{signature or module + ':SIGNATURE'} is a {type(sig).__name__}, "
                             f"not a shmserve.Signature")
    return JaxModel(fn, sig, name=function.rpartition(":")[2])
