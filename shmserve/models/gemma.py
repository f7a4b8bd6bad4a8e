"""Gemma text generation behind the request dispatch.

Sampling takes milliseconds to seconds, so it runs on one worker thread: the transports keep
serving echo and other requests meanwhile (JAX releases the GIL while it computes). Prompts
that arrive together are sampled in one batched call when they ask for the same number of
steps, which is what the library's sampler can batch.
"""
from __future__ import annotations

import logging
import queue
import threading

from . import Model
from ..protocol import ErrorCode, MsgType, ProtocolError, decode_prompt

log = logging.getLogger("shmserve.gemma")


class GemmaModel(Model):
    name = "gemma"
    handles = frozenset({MsgType.PROMPT, MsgType.PROMPT_STREAM})
    answers_later = True

    def __init__(self, engine, max_batch: int = 8):
        self.engine = engine
        self.max_batch = max_batch
        self._pending: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="gemma", daemon=True)
        self._worker.start()

    def describe(self) -> dict:
        return {"model": self.name, "variant": self.engine.variant,
                "cache_length": self.engine.cache_length,
                "max_new_tokens": self.engine.max_new_tokens_limit}

    def warmup(self) -> None:
        seconds = self.engine.warmup(batch_sizes=(1,), stream=True)
        log.info("gemma warm-up (compilation) took %.1f s", seconds)

    def handle(self, requests) -> None:
        for request in requests:
            try:
                prompt, steps = decode_prompt(request.body)
                # The prompt is copied out: drop the view into the transport's buffer (a ring
                # slot), which must not outlive the request or the mapping.
                request.body = b""
                self.engine.check_prompt(prompt, steps)
            except ProtocolError as exc:
                request.fail(exc.code, exc.message)
                continue
            self._pending.put((request, prompt, steps))

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._pending.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            by_steps: dict[int, list] = {}
            for request, prompt, steps in batch:
                if request.cancelled():
                    request.fail(ErrorCode.CANCELLED, "cancelled before sampling started")
                else:
                    by_steps.setdefault(steps, []).append((request, prompt))
            for steps, group in by_steps.items():
                self._sample(steps, group)

    def _sample(self, steps: int, group: list) -> None:
        requests = [request for request, _ in group]

        def on_piece(index: int, piece: str) -> None:
            request = requests[index]
            if request.msg_type == MsgType.PROMPT_STREAM and not request.cancelled():
                request.reply(MsgType.STREAM_CHUNK, piece.encode(), final=False)

        streaming = any(r.msg_type == MsgType.PROMPT_STREAM for r in requests)
        try:
            texts = self.engine.generate([prompt for _, prompt in group], steps,
                                         on_piece if streaming else None)
        except ProtocolError as exc:
            for request in requests:
                request.fail(exc.code, exc.message)
            return
        except Exception as exc:  # the engine's failure is this batch's, not the server's
            log.exception("sampling failed for %d prompt(s)", len(requests))
            for request in requests:
                request.fail(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        for request, text in zip(requests, texts):
            if request.msg_type == MsgType.PROMPT_STREAM:
                request.reply(MsgType.STREAM_END, b"")
            else:
                request.reply(MsgType.PROMPT, text.encode())


def build(args) -> Model:
    from .gemma_engine import from_env_or_args

    if not args.variant:
        raise ValueError("--model gemma needs --variant (a checkpoint stores no architecture)")
    engine = from_env_or_args(args.checkpoint, args.tokenizer, args.variant,
                              cache_length=args.cache_length,
                              max_new_tokens_limit=args.max_new_tokens)
    return GemmaModel(engine)
