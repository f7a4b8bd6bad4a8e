"""Transport-independent request handling: validation, batching, model calls, typed errors.

Every transport turns what it reads into ``Request`` objects and hands a list of them to
``Dispatcher.dispatch``. ECHO and METADATA are answered here for every model; the rest is
validated against what the model declares (spec/PROTOCOL.md section 3) and becomes public
``Call`` objects for ``Model.submit``.

Concurrent requests from any transport are combined: the thread that finds the model idle
runs everything queued meanwhile, up to ``max_batch`` calls at a time, so requests from
several connections and ring slots share one model call without a batching thread in between.
"""
from __future__ import annotations

import abc
import collections
import logging
import threading
import time
import weakref

import numpy as np

from . import tensors
from .model import Call, InferCall, Model, PromptCall
from .protocol import (IMAGE_BYTES, ErrorCode, MsgType, ProtocolError, check_request,
                       decode_prompt, encode_error, encode_scores)

log = logging.getLogger("shmserve.dispatch")

IMAGE_SHAPE = (3, 32, 32)
# Distinct TensorList headers kept decoded; clients repeat a handful of shapes.
_LAYOUT_CACHE = 256


def _header_key(body) -> tuple[int, bytes] | None:
    """(body length, header bytes) of a TensorList, found without checking the headers; None
    when they do not even fit the body (parse_layout then says what is wrong)."""
    size = len(body)
    if size < 8:
        return None
    pos = 8
    for _ in range(body[0] | body[1] << 8):
        if pos + 4 > size:
            return None
        pos += (tensors.TENSOR_HEADER.size + 8 * body[pos + 1] + (body[pos + 2] | body[pos + 3] << 8)
                + 7) & ~7
    if pos > size:
        return None
    return size, bytes(body[:pos])


def _buffer_roots(arrays) -> list[weakref.ref]:
    """Weak references to the buffers the arrays are views of: numpy makes its own memoryview
    of a buffer for each frombuffer array, and every view derived from the array (a slice, a
    transpose, a reshape) keeps that one alive. Arrays that own their data (decoded from JSON)
    hold no transport buffer, and a bytes body is never reused."""
    roots = []
    for array in arrays:
        root = array.base
        while type(root) is np.ndarray:  # a view of a view
            root = root.base
        if type(root) is memoryview and type(root.obj) is not bytes:
            roots.append(weakref.ref(root))
    return roots


class Request(abc.ABC):
    """One request as read by a transport. ``body`` is valid until ``release``."""

    __slots__ = ("msg_type", "body", "done", "_recorder", "_started_ns")

    def __init__(self, msg_type: int, body, recorder=None):
        self.msg_type = msg_type
        self.body = body
        self.done = False
        self._recorder = recorder  # a metrics.Recorder, when metrics are served
        if recorder is not None:
            self._started_ns = recorder.begin()

    def reply(self, msg_type: int, payload, final: bool = True) -> None:
        if self.done:
            raise RuntimeError("reply after the final reply")
        self.done = final
        # Counted before the final frame goes out: a client that has its answer then finds it
        # in the metrics it scrapes next.
        if final and self._recorder is not None:
            self.counted(payload[0] | payload[1] << 8 if msg_type == MsgType.ERROR else 0)
        self._send(msg_type, payload, final)

    def counted(self, code: int) -> None:
        """Counts the request's outcome in the metrics, once: at its final reply, or where its
        transport ended it without one (a cancelled or superseded ring request)."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.end(self.msg_type, code, self._started_ns)

    def fail(self, code: ErrorCode, message: str) -> None:
        if not self.done:
            self.reply(MsgType.ERROR, encode_error(code, message))

    def release(self) -> None:
        """Give the body's buffer back to the transport."""
        if isinstance(self.body, memoryview):
            self.body.release()

    @abc.abstractmethod
    def _send(self, msg_type: int, payload, final: bool) -> None:
        """Deliver one reply frame. Must be safe to call from a model's worker thread."""

    def cancelled(self) -> bool:
        """True when the client gave up on this request."""
        return False


def check_model(model) -> None:
    """What the server relies on before serving ``model``; ValueError/TypeError say what is off."""
    if not isinstance(model, Model):
        raise TypeError(f"expected a shmserve.Model, got {type(model).__module__}."
                        f"{type(model).__qualname__}")
    signature = model.signature
    if signature is not None and not isinstance(signature, tensors.Signature):
        raise TypeError(f"model {model.name!r}: signature must be a shmserve.Signature, got "
                        f"{type(signature).__name__}")
    if model.labels is not None:
        image = signature.inputs[0] if signature else None
        scores = signature.outputs[0] if signature else None
        if (image is None or len(signature.inputs) != 1 or image.dtype.name != "UINT8"
                or image.shape != (-1, *IMAGE_SHAPE) or not signature.max_batch_size
                or scores.dtype.name not in ("FP32", "FP64", "FP16")
                or scores.shape not in ((-1, len(model.labels)), (-1, -1))):
            raise ValueError(f"model {model.name!r} has labels, so it needs one UINT8 input of "
                             f"shape [-1, 3, 32, 32] and a first output of shape "
                             f"[-1, {len(model.labels)}] (batched)")


class Dispatcher:
    def __init__(self, model: Model, *, max_batch: int = 64, batch_wait_us: float = 0.0,
                 metrics=None):
        check_model(model)
        self.model = model
        self.metrics = metrics  # a metrics.Metrics, or None when none are served
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_us / 1e6
        self.signature = model.signature
        self.metadata = tensors.metadata_json(model.name, model.signature)
        self._labels = tuple(label.encode() for label in model.labels or ())
        self._bindings: dict[tuple[int, bytes], tensors.Binding] = {}
        self._last_binding: tensors.Binding | None = None
        # Outputs -> INFER reply body; _bind refuses INFER first when there is no signature.
        self._encode_outputs = (tensors.OutputEncoder(model.signature).encode if model.signature
                                else None)
        self._pending: collections.deque[Call] = collections.deque()
        self._arrived = threading.Event()
        self._model_lock = threading.Lock()

    def dispatch(self, requests, may_wait: bool = True) -> None:
        """Answer or queue every request. ``may_wait=False`` from a caller that already waited
        for its batch to fill (the ring loop), so a batch never waits twice."""
        calls = []
        for request in requests:
            try:
                call = self._accept(request)
            except ProtocolError as exc:
                request.fail(exc.code, exc.message)
                call = None
            if call is None:
                request.release()
            else:
                calls.append(call)
        if calls:
            self._run(calls, may_wait)

    # -- validation ------------------------------------------------------------------------
    def _accept(self, request: Request) -> Call | None:
        """The request's Call for the model, or None when it was answered here."""
        msg_type = check_request(request.msg_type, len(request.body))
        if msg_type is MsgType.INFER:
            return InferCall(request, self._bind(request.body), MsgType.INFER,
                             self._encode_outputs)
        if msg_type == MsgType.ECHO:
            request.reply(MsgType.ECHO, request.body)
            return None
        if msg_type is MsgType.METADATA:
            request.reply(MsgType.METADATA, self.metadata)
            return None
        if msg_type in (MsgType.PROMPT, MsgType.PROMPT_STREAM):
            prompt, steps = decode_prompt(request.body)  # content errors come first (3)
            if not self.model.serves_prompts:
                raise self._unsupported(msg_type)
            request.msg_type = msg_type
            return PromptCall(request, prompt, steps, msg_type is MsgType.PROMPT_STREAM)
        # CLASSIFY, CLASSIFY_SCORES, CLASSIFY_BATCH
        if not self._labels:
            raise self._unsupported(msg_type)
        count = len(request.body) // IMAGE_BYTES
        if count > self.signature.max_batch_size:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"{count} images; model "
                                f"{self.model.name!r} takes at most "
                                f"{self.signature.max_batch_size} at once")
        images = np.frombuffer(request.body, np.uint8).reshape(count, *IMAGE_SHAPE)
        encode = self._encode_label if msg_type is MsgType.CLASSIFY else self._encode_scores
        request.msg_type = msg_type
        return InferCall(request, {self.signature.inputs[0].name: images}, msg_type, encode)

    def _unsupported(self, msg_type: MsgType) -> ProtocolError:
        return ProtocolError(ErrorCode.UNSUPPORTED, f"model {self.model.name!r} does not serve "
                             f"{msg_type.name}")

    def _bind(self, body) -> dict[str, np.ndarray]:
        # What a request's inputs are depends only on its header bytes and length, and clients
        # repeat a handful of shapes: keep each header matched to the signature once. A hostile
        # client can only fill the cache, which is bounded.
        binding = self._last_binding  # most clients send one shape: skip finding the key
        if binding is not None and binding.matches(body):
            return binding.arrays(body)
        key = _header_key(body)
        binding = self._bindings.get(key) if key is not None else None
        if binding is not None:
            self._last_binding = binding
            return binding.arrays(body)
        layout, _ = tensors.parse_layout(body)
        arrays = tensors.views(body, layout)
        if self.signature is None:  # structure first, as for prompts (section 3.1)
            raise self._unsupported(MsgType.INFER)
        bound = tensors.bind(self.signature, arrays)
        if key is not None and len(self._bindings) < _LAYOUT_CACHE:
            self._bindings[key] = self._last_binding = tensors.Binding(self.signature, layout,
                                                                       key[1])
        return bound

    # -- replies ---------------------------------------------------------------------------
    def _scores(self, outputs) -> np.ndarray:
        if isinstance(outputs, dict):
            outputs = outputs[self.signature.outputs[0].name]
        elif isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        scores = np.asarray(outputs, np.float32)
        if scores.ndim != 2 or scores.shape[1] != len(self._labels):
            raise TypeError(f"model {self.model.name!r} gave scores of shape "
                            f"{list(scores.shape)}; its labels need [N, {len(self._labels)}]")
        return scores

    def _encode_label(self, outputs) -> bytes:
        return self._labels[int(self._scores(outputs)[0].argmax())]

    def _encode_scores(self, outputs) -> bytes:
        if len(self._labels) != 10:  # a ScoreRecord holds exactly ten probabilities
            raise TypeError("CLASSIFY_SCORES and CLASSIFY_BATCH need a ten-label model")
        return encode_scores(self._scores(outputs))

    # -- model calls -----------------------------------------------------------------------
    def _run(self, calls: list[Call], may_wait: bool) -> None:
        pending = self._pending
        pending.extend(calls)
        if self.batch_wait_s:  # only _gather waits for it, and setting an Event is not free
            self._arrived.set()
        # Whoever holds the lock drains the queue; a thread that finds it held leaves its calls
        # there. The re-check after release closes the window in which the holder took an
        # empty queue just before these calls arrived.
        while pending:
            if not self._model_lock.acquire(blocking=False):
                return
            try:
                if may_wait and self.batch_wait_s:
                    self._gather()
                while pending:
                    batch = [pending.popleft()]
                    while pending and len(batch) < self.max_batch:
                        batch.append(pending.popleft())
                    self._submit(batch)
            finally:
                self._model_lock.release()

    def _gather(self) -> None:
        """Dynamic batching for stream transports: let others join, up to batch_wait."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            self._arrived.wait(remaining)

    def recorder(self, transport: str):
        """The metrics.Recorder a transport hands its requests, or None without metrics."""
        return self.metrics.recorder(transport) if self.metrics is not None else None

    def _submit(self, batch: list[Call]) -> None:
        started = time.perf_counter() if self.metrics is not None else 0.0
        try:
            self.model.submit(batch)
        except ProtocolError as exc:
            self._fail_unanswered(batch, exc.code, exc.message)
        except Exception as exc:  # the model's bug must not take the server down
            log.exception("model %s failed on %d call(s)", self.model.name, len(batch))
            self._fail_unanswered(batch, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if self.metrics is not None:
                self.metrics.model_call(len(batch), time.perf_counter() - started)
            for call in batch:
                self._release(call)

    def _release(self, call: Call) -> None:
        """Enforce the lifetime rule: inputs are views of the transport's buffer, valid until
        submit() returned; one kept past that would read a slot or socket buffer reused by
        another request. A numpy view does not pin the memoryview it was made from (release
        succeeds under it), so what tells is whether the buffer the inputs hang from outlives
        the call's hold on them."""
        kept = False
        if isinstance(call, InferCall):
            held = _buffer_roots(call.inputs.values())
            call.inputs = None
            for root in held:
                kept = kept or root() is not None
        try:
            call._request.release()
        except BufferError:  # something still exports the buffer itself
            kept = True
        if kept:
            message = (f"model {self.model.name!r} kept a view of a request input after "
                       f"submit() returned; copy it (numpy.array) to use it later")
            log.error(message)
            call.fail(message)

    @staticmethod
    def _fail_unanswered(batch, code, message):
        for call in batch:
            if not call.done:
                call.fail(message, code)
