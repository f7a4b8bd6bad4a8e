"""Serve any LiteRT (TFLite) model file: ``shmserve serve --model litert --model-path FILE.tflite``.

The signature is read from the interpreter: the inputs and outputs of the model's first
signature (``serving_default`` for a converted SavedModel or Keras model), by their names
there, or the plain tensor names when the file has no signature. A model whose every input
and output has a dynamic dim 0 (``shape_signature`` -1) is served batched, up to
``max_batch_size`` rows (``--model-option max_batch_size=N``, default 64); the server stacks
concurrent requests into one ``invoke``.

Threading: ``Interpreters`` is NOT thread-safe (each call writes input tensors, invokes and
reads outputs), which fits the server: it calls ``infer`` one batch at a time.
``Interpreter.invoke()`` releases the GIL, so transports keep reading meanwhile.
"""
from __future__ import annotations

from collections import OrderedDict
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from shmserve import Model, Signature, TensorSpec
from shmserve.models import thread_count

# Interpreters kept for other input shapes (batch sizes) besides the pinned first one.
# Resizing an interpreter costs a re-plan on the next invoke (tens to hundreds of µs, growing
# with the batch), building one ~1 ms: keeping a few shapes resident makes a client that
# alternates between a handful of batch sizes pay it once per size.
_SPARE_SHAPES = 3


class Interpreters:
    """One model's LiteRT interpreters, each sized for one set of input shapes."""

    def __init__(self, model: bytes, num_threads: int):
        self.model = model
        self.num_threads = num_threads = thread_count(num_threads)
        first = Interpreter(model_content=model, num_threads=num_threads)
        signatures = first.get_signature_list()
        if signatures:
            runner = first.get_signature_runner(next(iter(signatures)))
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
        else:
            inputs = {d["name"]: d for d in first.get_input_details()}
            outputs = {d["name"]: d for d in first.get_output_details()}
        # (name, tensor index, numpy dtype, shape with -1 for dynamic dims)
        self.inputs = [(n, d["index"], np.dtype(d["dtype"]), tuple(int(x) for x in d["shape_signature"]))
                       for n, d in inputs.items()]
        self.outputs = [(n, d["index"], np.dtype(d["dtype"]), tuple(int(x) for x in d["shape_signature"]))
                        for n, d in outputs.items()]
        self._first = first
        self._first_shapes: tuple | None = None
        # Most recently used last; a miss with every spare taken resizes the least recently
        # used one.
        self._spares: OrderedDict[tuple, Interpreter] = OrderedDict()

    @property
    def batched(self) -> bool:
        return all(shape and shape[0] == -1 for _, _, _, shape in self.inputs + self.outputs)

    def signature(self, max_batch_size: int) -> Signature:
        def specs(tensors):
            return [TensorSpec(name, dtype, shape) for name, _, dtype, shape in tensors]
        return Signature(specs(self.inputs), specs(self.outputs),
                         max_batch_size=max_batch_size if self.batched else 0)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs (copies the caller may keep) for input arrays in signature order; any
        strided view is gathered into the input tensor in one copy."""
        interpreter = self._for(tuple(a.shape for a in arrays))
        for (_, index, _, _), array in zip(self.inputs, arrays):
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for _, index, _, _ in self.outputs]

    def _for(self, shapes: tuple) -> Interpreter:
        if self._first_shapes is None:
            self._resize(self._first, shapes)
            self._first_shapes = shapes
        if shapes == self._first_shapes:
            return self._first
        interpreter = self._spares.get(shapes)
        if interpreter is not None:
            self._spares.move_to_end(shapes)
            return interpreter
        if len(self._spares) < _SPARE_SHAPES:
            interpreter = Interpreter(model_content=self.model, num_threads=self.num_threads)
        else:
            _, interpreter = self._spares.popitem(last=False)
        self._resize(interpreter, shapes)
        self._spares[shapes] = interpreter
        return interpreter

    def _resize(self, interpreter: Interpreter, shapes: tuple) -> None:
        for (_, index, _, _), shape in zip(self.inputs, shapes):
            # strict: only dims the model declares dynamic may change, loudly otherwise.
            interpreter.resize_tensor_input(index, list(shape), strict=True)
        interpreter.allocate_tensors()


class LiteRTModel(Model):
    """A .tflite file served with the signature it declares."""

    def __init__(self, path: str | PathLike[str], threads: int = 2, max_batch_size: int = 64,
                 name: str | None = None):
        self.path = Path(path)
        self.interpreters = Interpreters(self.path.read_bytes(), threads)
        self.name = name or self.path.stem
        self.signature = self.interpreters.signature(int(max_batch_size))

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.path), "threads": self.interpreters.num_threads}

    def warmup(self) -> None:
        # The first call sizes the pinned interpreter: make it the lone request's shape.
        rows = (1,) if self.signature.max_batch_size else ()
        self.interpreters.run([np.zeros(rows + tuple(max(d, 1) for d in spec.shape[len(rows):]),
                                        spec.dtype.np) for spec in self.signature.inputs])

    def infer(self, inputs):
        return self.interpreters.run([inputs[spec.name] for spec in self.signature.inputs])


def build(model_path: str | None = None, threads: int = 2, max_batch_size: int = 64) -> LiteRTModel:
    if not model_path:
        raise ValueError("--model litert needs --model-path FILE.tflite")
    return LiteRTModel(model_path, threads=threads, max_batch_size=max_batch_size)
