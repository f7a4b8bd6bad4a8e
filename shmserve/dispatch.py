"""Transport-independent request handling: validation, grouping, model calls, typed errors.

Every transport turns what it reads into ``Request`` objects and hands a list of them to
``Dispatcher.dispatch``; the model answers through ``Request.reply``. Echo is answered here
for every model, as the classic server did.
"""
from __future__ import annotations

import abc
import logging
import threading

import numpy as np

from .protocol import ErrorCode, MsgType, ProtocolError, check_request, encode_error

log = logging.getLogger("shmserve.dispatch")


class Request(abc.ABC):
    """One request as read by a transport. ``body`` is valid until the final reply."""

    __slots__ = ("msg_type", "body", "done")

    def __init__(self, msg_type: int, body):
        self.msg_type = msg_type
        self.body = body
        self.done = False

    def images(self) -> np.ndarray:
        """The body as (N, 3, 32, 32) uint8, without copying."""
        return np.frombuffer(self.body, dtype=np.uint8).reshape(-1, 3, 32, 32)

    def reply(self, msg_type: int, payload, final: bool = True) -> None:
        if self.done:
            raise RuntimeError("reply after the final reply")
        self.done = final
        self._send(msg_type, payload, final)

    def fail(self, code: ErrorCode, message: str) -> None:
        if not self.done:
            self.reply(MsgType.ERROR, encode_error(code, message))

    @abc.abstractmethod
    def _send(self, msg_type: int, payload, final: bool) -> None:
        """Deliver one reply frame. Must be safe to call from a model's worker thread."""

    def cancelled(self) -> bool:
        """True when the client gave up on this request (only the ring can tell)."""
        return False


class Dispatcher:
    def __init__(self, model):
        self.model = model
        # Models are called from every transport's thread; inference engines are not
        # re-entrant, and one model call at a time is also what batching wants.
        self._model_lock = threading.Lock()

    def dispatch(self, requests) -> None:
        for_model: list[Request] = []
        for request in requests:
            try:
                msg_type = check_request(request.msg_type, len(request.body))
                if msg_type is MsgType.ECHO:
                    request.reply(MsgType.ECHO, request.body)
                    continue
                if msg_type not in self.model.handles:
                    raise ProtocolError(ErrorCode.UNSUPPORTED, f"model {self.model.name!r} does "
                                        f"not serve {msg_type.name}")
            except ProtocolError as exc:
                request.fail(exc.code, exc.message)
                continue
            request.msg_type = msg_type
            for_model.append(request)
        if for_model:
            self._call_model(for_model)

    def _call_model(self, batch: list[Request]) -> None:
        """One model call for everything validated together, so a model can batch across
        request types (CLASSIFY, CLASSIFY_SCORES and CLASSIFY_BATCH share one forward pass)."""
        try:
            with self._model_lock:
                self.model.handle(batch)
        except ProtocolError as exc:
            self._fail_unanswered(batch, exc.code, exc.message)
            return
        except Exception as exc:  # the model's bug must not take the server down
            log.exception("model %s failed on %d request(s)", self.model.name, len(batch))
            self._fail_unanswered(batch, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if not self.model.answers_later:
            self._fail_unanswered(batch, ErrorCode.INTERNAL, "model returned without a reply")

    @staticmethod
    def _fail_unanswered(batch, code, message):
        for request in batch:
            if not request.done:
                request.fail(code, message)
