"""The public model API: subclass ``Model``, declare what it takes, implement ``infer``.

A model serves every request type its attributes declare:

- ``signature`` (a ``Signature``): INFER and METADATA, and the Open Inference Protocol's
  ``/v2/models/NAME/infer`` over HTTP. ``infer`` receives a dict of numpy arrays by input
  name and returns the outputs (a dict by name, a sequence in signature order, or one array).
- ``labels`` as well (class names): CLASSIFY, CLASSIFY_SCORES and CLASSIFY_BATCH, answered
  from the model's first input (uint8 images, shape (-1, 3, 32, 32)) and first output (one
  probability per label).
- ``serves_prompts = True``: PROMPT and PROMPT_STREAM, handed to ``submit`` as
  ``PromptCall`` objects.

Lifetime rule: input arrays are views of the transport's buffer (a shared-memory ring slot, a
socket buffer) and are valid only until ``infer`` or ``submit`` returns. A model that keeps
one past that (to answer later from its own thread) must copy it (``numpy.array(x)``); the
server checks, and fails the request with INTERNAL instead of letting the buffer be reused
under the model.

``submit`` is where a model may answer later, from its own threads, and stream: the default
stacks concurrent INFER calls into one ``infer`` (when ``signature.max_batch_size`` > 0) and
replies at once. Override it to queue calls instead; answer each with ``reply`` or ``fail``.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .protocol import ErrorCode, MsgType, ProtocolError
from .tensors import Signature, TensorSpec

log = logging.getLogger("shmserve.model")

__all__ = ["Model", "Call", "InferCall", "PromptCall", "Signature", "TensorSpec", "ErrorCode",
           "ProtocolError"]


class Call:
    """One request handed to ``Model.submit``. Answer it exactly once: ``reply`` or ``fail``."""

    __slots__ = ("_request",)

    def __init__(self, request):
        self._request = request

    @property
    def done(self) -> bool:
        return self._request.done

    def cancelled(self) -> bool:
        """True when the client gave up (a ring cancel, a closed connection): stop working."""
        return self._request.cancelled()

    def fail(self, message: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        """Answer with a typed error (INTERNAL unless ``code`` says otherwise)."""
        self._request.fail(ErrorCode(code), message)


class InferCall(Call):
    """An INFER (or CLASSIFY) request: ``inputs`` by name, valid until ``submit`` returns."""

    __slots__ = ("inputs", "_reply_type", "_encode")

    def __init__(self, request, inputs: dict[str, np.ndarray], reply_type: MsgType, encode):
        self._request = request
        self.inputs = inputs
        self._reply_type = reply_type
        self._encode = encode  # outputs -> reply body; raises TypeError on a mismatch

    @property
    def rows(self) -> int:
        """Batch rows in this call (dim 0 of its first input)."""
        first = next(iter(self.inputs.values()))
        return first.shape[0] if first.ndim else 1

    def reply(self, outputs) -> None:
        self._request.reply(self._reply_type, self._encode(outputs))


class PromptCall(Call):
    """A PROMPT or PROMPT_STREAM request. ``stream`` sends a piece as soon as it is ready
    when the client asked for a stream, and gathers it otherwise; ``reply`` ends the call."""

    __slots__ = ("prompt", "max_new_tokens", "streaming", "_pieces")

    def __init__(self, request, prompt: str, max_new_tokens: int, streaming: bool):
        super().__init__(request)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.streaming = streaming
        self._pieces: list[str] = []

    def stream(self, piece: str) -> None:
        if not piece:
            return
        if self.streaming:
            self._request.reply(MsgType.STREAM_CHUNK, piece.encode(), final=False)
        else:
            self._pieces.append(piece)

    def reply(self, text: str = "") -> None:
        """End the call; ``text`` is appended to whatever was streamed."""
        if self.streaming:
            self.stream(text)
            self._request.reply(MsgType.STREAM_END, b"")
        else:
            self._request.reply(MsgType.PROMPT, ("".join(self._pieces) + text).encode())


class Model:
    """Base class for served models. See the module docstring for what each attribute serves."""

    name: str = "model"
    signature: Signature | None = None
    labels: Sequence[str] | None = None
    serves_prompts: bool = False

    def warmup(self) -> None:
        """Compile and allocate before the server reports ready (called once)."""

    def close(self) -> None:
        """Release threads and engines (called once, at stop)."""

    def describe(self) -> dict:
        """What the ready line and /healthz say about the model."""
        return {"model": self.name}

    def infer(self, inputs: dict[str, np.ndarray]):
        """Outputs for one (possibly stacked) batch of inputs. Runs on a server thread, one call
        at a time; raising fails the requests in it with INTERNAL (a ``ProtocolError`` with its
        own code)."""
        raise NotImplementedError(f"{type(self).__name__} declares a signature but no infer()")

    def submit(self, calls: list[Call]) -> None:
        """Answer ``calls``, now or later. The default runs ``infer`` on stacked batches."""
        if len(calls) == 1 and type(calls[0]) is InferCall:  # a lone call: nothing to group
            run_batch(self, calls)
            return
        infer_calls = []
        for call in calls:
            if isinstance(call, InferCall):
                infer_calls.append(call)
            else:
                call.fail(f"model {self.name!r} does not override submit() for prompts",
                          ErrorCode.UNSUPPORTED)
        for group in batches(self.signature, infer_calls):
            run_batch(self, group)


def batches(signature: Signature | None, calls: list[InferCall]) -> list[list[InferCall]]:
    """Groups of calls one ``infer`` can answer together: same non-batch dims, at most
    ``max_batch_size`` rows in all. Unbatched models get one call per group."""
    if signature is None or not signature.max_batch_size or len(calls) < 2:
        return [[call] for call in calls]
    limit = signature.max_batch_size
    groups: dict[tuple, list[list[InferCall]]] = {}
    for call in calls:
        key = tuple(array.shape[1:] for array in call.inputs.values())
        runs = groups.setdefault(key, [[]])
        if runs[-1] and sum(c.rows for c in runs[-1]) + call.rows > limit:
            runs.append([])
        runs[-1].append(call)
    return [run for runs in groups.values() for run in runs]


def run_batch(model: Model, group: list[InferCall]) -> None:
    """One ``infer`` for the group; outputs split back by rows. A failure fails this group only."""
    try:
        if len(group) == 1:
            group[0].reply(model.infer(group[0].inputs))
            return
        names = list(group[0].inputs)
        stacked = {name: np.concatenate([call.inputs[name] for call in group]) for name in names}
        outputs = model.infer(stacked)
        del stacked
        specs = model.signature.outputs
        if isinstance(outputs, dict):
            arrays = [outputs[s.name] for s in specs if s.name in outputs]
        elif isinstance(outputs, (list, tuple)):
            arrays = list(outputs)
        else:
            arrays = [outputs]
        total = sum(call.rows for call in group)
        if len(arrays) != len(specs) or any(np.shape(a)[:1] != (total,) for a in arrays):
            raise TypeError(f"a batch of {total} rows gave outputs of shapes "
                            f"{[list(np.shape(a)) for a in arrays]}; each needs {total} rows")
        row = 0
        for call in group:
            rows = call.rows
            call.reply({s.name: a[row:row + rows] for s, a in zip(specs, arrays)})
            row += rows
    except ProtocolError as exc:
        for call in group:
            if not call.done:
                call.fail(exc.message, exc.code)
    except Exception as exc:  # the model's bug must not take the server down
        log.exception("model %s failed on %d call(s)",
                                                      model.name, len(group))
        for call in group:
            if not call.done:
                call.fail(f"{type(exc).__name__}: {exc}")
