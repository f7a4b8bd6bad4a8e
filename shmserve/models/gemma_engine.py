"""Gemma text generation through the `gemma` library (`from gemma import gm`).

What the library (gemma 4.0.1) allows, and how this engine uses it:

* `gm.text.Sampler.sample(list_of_prompts, ...)` batches prompts in one call,
  streaming included: with `stream=True` it yields one state per decoding step
  holding the next token of every row. So one call serves a whole batch,
  streamed or not. Streaming runs a jitted single step per token from Python
  (plus a device->host read); non-streaming runs the whole loop in one
  `jax.lax.while_loop`, which is faster.
* Every new batch size and every new prompt-length bucket is a new XLA
  compilation (seconds). Batches are therefore padded to a power of two
  (extra rows repeat the first prompt; their output is dropped) and the
  library pads prompts to the buckets in `_PAD_BUCKETS`. Its eager input
  preparation still compiles a few small functions for each new exact
  (batch size, longest prompt) pair: ~0.1-0.3 s on CPU, once per process.
  The persistent compilation cache makes a restarted server pay compilation
  time only once per shape.
* The library pads each prompt batch to a length bucket and fails with an
  unclear shape error when that exceeds the cache, and it silently stops when
  the KV cache fills up. `generate` checks prompt + new tokens against the
  cache first and raises PROMPT_TOO_LONG instead.
* The library's streamed text is each token decoded alone, which loses the
  spaces SentencePiece attaches to pieces and splits multi-byte characters;
  this engine decodes the row's ids so far and sends the new suffix instead.

Threading: `generate` may be called from any one thread at a time (calls are
serialised by a lock). JAX releases the GIL while the device computes, so a
server loop in another thread keeps running; the GIL is held while tracing
(first call per shape, hence `warmup`) and for the few Python steps per token
when streaming. `on_piece` runs on the calling thread between decoding steps:
it must be quick and hand work to other threads in a thread-safe way. An
exception raised by `on_piece` stops the generation and propagates, which is
how a caller cancels.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shmserve.protocol import ErrorCode, ProtocolError

DEFAULT_COMPILE_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shmserve", "jax")

# Release architectures that work with the plain text `gm.text.Sampler`
# (name -> (gm.nn class, gm.text tokenizer class)). Not offered: Gemma 3n and
# Gemma 4 need other samplers, and in gemma 4.0.1 the Sampler fails for every
# Gemma 2 model (it reads BEGIN_OF_TOOL_RESPONSE, which Gemma2Tokenizer's
# special tokens lack).
RELEASE_VARIANTS = {
    "gemma3-270m": ("Gemma3_270M", "Gemma3Tokenizer"),
    "gemma3-1b": ("Gemma3_1B", "Gemma3Tokenizer"),
    "gemma3-4b": ("Gemma3_4B", "Gemma3Tokenizer"),
    "gemma3-12b": ("Gemma3_12B", "Gemma3Tokenizer"),
    "gemma3-27b": ("Gemma3_27B", "Gemma3Tokenizer"),
}
# Gemma 3 4B and larger also carry a vision encoder, which text serving skips.
_MULTIMODAL_CLASSES = {"Gemma3_4B", "Gemma3_12B", "Gemma3_27B"}

# Prompt-length buckets (tokens, BOS included): one compilation each.
_PAD_BUCKETS = (128, 512, 2048, 8192, 32768)
_WARMUP_PROMPT = "Hello"


def from_env_or_args(checkpoint: str | None, tokenizer: str | None, variant: str,
                     **kwargs: Any) -> GemmaEngine:
    """Builds an engine; unset paths come from MODEL_CHECKPOINT / MODEL_TOKENIZER."""
    checkpoint = checkpoint or os.environ.get("MODEL_CHECKPOINT")
    tokenizer = tokenizer or os.environ.get("MODEL_TOKENIZER")
    if not checkpoint or not tokenizer:
        raise ValueError("Gemma needs a checkpoint and a tokenizer: pass them or set "
                         "MODEL_CHECKPOINT and MODEL_TOKENIZER")
    return GemmaEngine(checkpoint, tokenizer, variant, **kwargs)


class GemmaEngine:
    """A loaded Gemma model with greedy (deterministic) decoding."""

    def __init__(self, checkpoint: str, tokenizer: str, variant: str, *,
                 cache_length: int = 1024, max_new_tokens_limit: int = 512,
                 max_batch: int = 8,
                 compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR):
        if not 1 <= max_new_tokens_limit < cache_length:
            raise ValueError(f"max_new_tokens_limit={max_new_tokens_limit} must be in "
                             f"[1, cache_length={cache_length})")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        for what, path in (("checkpoint", checkpoint), ("tokenizer", tokenizer)):
            if not Path(path).exists():
                raise FileNotFoundError(f"Gemma {what} not found: {path}")
        start = time.perf_counter()
        if compile_cache_dir is not None:
            _enable_compile_cache(compile_cache_dir)

        from gemma import gm

        model, tokenizer_cls, text_only = _build_model(variant, checkpoint)
        self._tokenizer = _local_tokenizer(tokenizer_cls, tokenizer)
        if self._tokenizer.vocab_size > model.config.num_embed:
            raise ValueError(f"tokenizer has {self._tokenizer.vocab_size} pieces but "
                             f"{variant} embeds only {model.config.num_embed}")
        params = gm.ckpts.load_params(checkpoint, text_only=text_only)
        _check_params_match(model, params, variant)

        self.variant = variant
        self.cache_length = cache_length
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch = max_batch
        self._sampler = gm.text.Sampler(
            model=model,
            params=params,
            tokenizer=self._tokenizer,
            sampling=gm.text.Greedy(),
            cache_length=cache_length,
            # Output buffer size is static; making it the request limit keeps
            # it small and every accepted request within it.
            max_out_length=max_new_tokens_limit,
            # Buckets beyond the cache would make the library slice the cache
            # shorter than the padded prompt.
            pad_length=tuple(b for b in _PAD_BUCKETS if b < cache_length) + (cache_length,),
        )
        special = self._tokenizer.special_tokens
        self._end_tokens = frozenset(
            (special.EOS, special.END_OF_TURN, special.BEGIN_OF_TOOL_RESPONSE))
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - start
        self.last_token_counts: list[int] = []

    def count_tokens(self, text: str) -> int:
        """Tokens `text` occupies in the cache (BOS included); any thread."""
        return len(self._tokenizer.encode(text)) + 1

    def warmup(self, batch_sizes: Sequence[int] = (1,), stream: bool = True) -> float:
        """Compiles the shortest-prompt shapes; returns the seconds it took.

        Each batch size compiles the non-streaming loop and, if `stream`, the
        streaming step; serve requests only after this returns.
        """
        start = time.perf_counter()
        for n in batch_sizes:
            self.generate([_WARMUP_PROMPT] * n, 2)
            if stream:
                self.generate([_WARMUP_PROMPT] * n, 2, on_piece=lambda i, s: None)
        return time.perf_counter() - start

    def generate(self, prompts: Sequence[str], max_new_tokens: int,
                 on_piece: Callable[[int, str], None] | None = None) -> list[str]:
        """Greedy continuation of each prompt, at most `max_new_tokens` tokens.

        Generation of a prompt ends at an end token (<eos>, <end_of_turn>), which
        is not part of the text. With `on_piece`, text is also streamed as
        `on_piece(prompt_index, piece)`; the pieces of a prompt concatenate to
        its returned text. `last_token_counts` then holds the number of tokens
        generated per prompt.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of str, not one str")
        if not prompts:
            raise ProtocolError(ErrorCode.BAD_ARGUMENT, "no prompts")
        for prompt in prompts:
            self.check_prompt(prompt, max_new_tokens)
        with self._lock:
            texts: list[str] = []
            counts: list[int] = []
            for first in range(0, len(prompts), self.max_batch):
                chunk = list(prompts[first:first + self.max_batch])
                emit = None if on_piece is None else (
                    lambda i, piece, first=first: on_piece(first + i, piece))
                chunk_texts, chunk_counts = self._run_batch(chunk, max_new_tokens, emit)
                texts += chunk_texts
                counts += chunk_counts
            self.last_token_counts = counts
            return texts

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        """Raises the ProtocolError `generate` would raise for this request.

        Safe to call from any thread, also while `generate` runs.
        """
        if (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                or not 1 <= max_new_tokens <= self.max_new_tokens_limit):
            raise ProtocolError(ErrorCode.BAD_ARGUMENT,
                                f"max_new_tokens={max_new_tokens!r} must be in "
                                f"[1, {self.max_new_tokens_limit}]")
        if not isinstance(prompt, str):
            raise ProtocolError(ErrorCode.BAD_ARGUMENT,
                                f"prompt must be str, not {type(prompt).__name__}")
        if not prompt:
            raise ProtocolError(ErrorCode.EMPTY_PROMPT, "empty prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(ErrorCode.INVALID_UTF8,
                                f"prompt is not valid UTF-8: {exc}") from None
        n = self.count_tokens(prompt)
        if n + max_new_tokens > self.cache_length:
            raise ProtocolError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt is {n} tokens (BOS included) + max_new_tokens {max_new_tokens} "
                f"= {n + max_new_tokens} > cache length {self.cache_length}")

    def _run_batch(self, prompts: list[str], max_new_tokens: int,
                   emit: Callable[[int, str], None] | None) -> tuple[list[str], list[int]]:
        import numpy as np

        n = len(prompts)
        padded = prompts + [prompts[0]] * (_batch_bucket(n, self.max_batch) - n)
        ids: list[list[int]] = [[] for _ in range(n)]
        # rng is unused by greedy sampling, but without it the library draws a
        # random seed from Python's global `random`.
        kwargs = dict(max_new_tokens=max_new_tokens, rng=0, return_state=True)
        if emit is None:
            out = self._sampler.sample(padded, **kwargs)
            tokens = np.asarray(out.state.predicted_tokens)[:n, :int(out.state.step)]
            for row, row_tokens in zip(ids, tokens):
                for token in row_tokens.tolist():
                    if token in self._end_tokens:
                        break
                    row.append(token)
            return [self._tokenizer.decode(row) for row in ids], [len(row) for row in ids]

        done = [False] * n
        sent = [""] * n
        for step, out in enumerate(self._sampler.sample(padded, stream=True, **kwargs)):
            column = np.asarray(out.state.predicted_tokens[:n, step]).tolist()
            for i, token in enumerate(column):
                if done[i]:
                    continue
                if token in self._end_tokens:
                    done[i] = True
                    continue
                ids[i].append(token)
                text = self._tokenizer.decode(ids[i])
                # A trailing U+FFFD is usually a multi-byte character whose
                # remaining byte tokens have not been generated yet.
                if not text.endswith("\ufffd") and len(text) > len(sent[i]):
                    emit(i, text[len(sent[i]):])
                    sent[i] = text
            if all(done):
                break
        texts = [self._tokenizer.decode(row) for row in ids]
        for i, text in enumerate(texts):
            if len(text) > len(sent[i]):
                emit(i, text[len(sent[i]):])
        return texts, [len(row) for row in ids]


def _batch_bucket(n: int, max_batch: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


def _enable_compile_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache (process-wide).

    JAX reads the directory at its first compilation, so this must run before
    anything in the process compiles; a later different directory is ignored.
    """
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # The default only caches compilations over 1 s; the sampler's pieces are
    # often quicker than that on their own but add up to many seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _build_model(variant: str, checkpoint: str) -> tuple[Any, Any, bool]:
    """Returns (model, tokenizer class, text_only) for a variant name."""
    import jax.numpy as jnp
    from gemma import gm

    if variant in RELEASE_VARIANTS:
        model_name, tokenizer_name = RELEASE_VARIANTS[variant]
        text_only = model_name in _MULTIMODAL_CLASSES
        model_cls = getattr(gm.nn, model_name)
        model = model_cls(text_only=True) if text_only else model_cls()
        return model, getattr(gm.text, tokenizer_name), text_only

    from shmserve.models import tiny_gemma

    unknown = f"unknown Gemma variant {variant!r}: it is not one of {sorted(RELEASE_VARIANTS)}"
    try:
        description = tiny_gemma.read_variant_file(checkpoint)
    except ValueError as exc:
        raise ValueError(f"{unknown}, and {exc}") from None
    if description["name"] != variant:
        raise ValueError(f"{unknown}, and the checkpoint's {tiny_gemma.VARIANT_FILE} "
                         f"names {description['name']!r}")
    if description["tokenizer"] != "gemma3":
        raise ValueError(f"unsupported tokenizer layout {description['tokenizer']!r}")
    config = tiny_gemma.config_from_json(description["config"])
    model = gm.nn.Transformer(config=config, dtype=jnp.dtype(description["dtype"]))
    return model, gm.text.Gemma3Tokenizer, False


def _local_tokenizer(tokenizer_cls: Any, path: str) -> Any:
    """The library tokenizer class, pinned to exactly the file at `path`.

    The library substitutes ``$GEMMA_CACHE_DIR/tokenizer/<file name>`` (default
    ~/.gemma) for the given path whenever such a file exists, so a cached file
    of the same name would silently replace ours. Loading the model here keeps
    every other behaviour (special ids, encode/decode) of the library class.
    """
    import functools

    import sentencepiece as spm

    class LocalTokenizer(tokenizer_cls):
        @functools.cached_property
        def _sp(self) -> spm.SentencePieceProcessor:
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(Path(self.path).read_bytes())
            return sp

    LocalTokenizer.__name__ = LocalTokenizer.__qualname__ = tokenizer_cls.__name__
    return LocalTokenizer(path=str(Path(path).resolve()))


def _check_params_match(model: Any, params: Any, variant: str) -> None:
    """Fails clearly when the checkpoint is not of the named architecture.

    A checkpoint stores no architecture, and a mismatch otherwise surfaces as
    an obscure shape error at the first generation.
    """
    import jax
    import jax.numpy as jnp

    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens=jnp.zeros((1, 1), jnp.int32))["params"])
    shape = lambda tree: {jax.tree_util.keystr(k): v.shape
                          for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want, got = shape(expected), shape(params)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"checkpoint does not match variant {variant!r}; "
                         f"first differences (param, shape): {diff}")
