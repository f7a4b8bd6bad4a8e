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

from shmserve import ErrorCode, Model, ProtocolError

log = logging.getLogger("shmserve.gemma")


class _NobodyWaits(Exception):
    """Every request of a streamed batch was cancelled: the rest of its tokens would go to
    nobody (an HTTP client that disconnected kept the engine busy to the last token)."""


class GemmaModel(Model):
    name = "gemma"
    serves_prompts = True

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

    def submit(self, calls) -> None:
        for call in calls:
            try:
                self.engine.check_prompt(call.prompt, call.max_new_tokens)
            except ProtocolError as exc:
                call.fail(exc.message, exc.code)
                continue
            self._pending.put(call)

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
                    call = self._pending.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._pending.put(None)  # finish this batch, then stop
                    break
                batch.append(call)
            by_steps: dict[int, list] = {}
            for call in batch:
                if call.cancelled():
                    call.fail("cancelled before sampling started", ErrorCode.CANCELLED)
                else:
                    by_steps.setdefault(call.max_new_tokens, []).append(call)
            for steps, group in by_steps.items():
                self._sample(steps, group)

    def _sample(self, steps: int, calls: list) -> None:
        def on_piece(index: int, piece: str) -> None:
            call = calls[index]
            if not call.cancelled():
                if call.streaming:
                    call.stream(piece)
            elif all(other.cancelled() for other in calls):
                raise _NobodyWaits  # the engine stops generating when on_piece raises

        streaming = any(call.streaming for call in calls)
        try:
            texts = self.engine.generate([call.prompt for call in calls], steps,
                                         on_piece if streaming else None)
        except _NobodyWaits:
            for call in calls:
                call.fail("cancelled during sampling", ErrorCode.CANCELLED)
            return
        except ProtocolError as exc:
            for call in calls:
                call.fail(exc.message, exc.code)
            return
        except Exception as exc:  # the engine's failure is this batch's, not the server's
            log.exception("sampling failed for %d prompt(s)", len(calls))
            for call in calls:
                call.fail(f"{type(exc).__name__}: {exc}")
            return
        for call, text in zip(calls, texts):
            if call.cancelled():
                call.fail("cancelled during sampling", ErrorCode.CANCELLED)
            else:
                call.reply("" if call.streaming else text)


def build(checkpoint: str | None = None, tokenizer: str | None = None, variant: str | None = None,
          cache_length: int = 1024, max_new_tokens: int = 512) -> GemmaModel:
    from .gemma_engine import from_env_or_args

    if not variant:
        raise ValueError("--model gemma needs --variant (a checkpoint stores no architecture)")
    engine = from_env_or_args(checkpoint, tokenizer, variant, cache_length=cache_length,
                              max_new_tokens_limit=max_new_tokens)
    return GemmaModel(engine)
