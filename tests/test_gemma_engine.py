"""GemmaEngine on the tiny random Gemma model, through the real gemma loader and sampler.

Offline by construction: every model file is generated into a temp dir, and
Internet sockets are refused for the whole module.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# google-auth (pulled in by TF/kauldron) probes the GCE metadata server otherwise.
os.environ.setdefault("NO_GCE_CHECK", "true")

pytest.importorskip("gemma.gm", reason="the gemma library is not installed (extra: gemma)")

from shmserve.models import gemma_engine, tiny_gemma  # noqa: E402
from shmserve.models.gemma_engine import GemmaEngine, from_env_or_args  # noqa: E402
from shmserve.protocol import ErrorCode, ProtocolError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello world", "The model is small", "xyz"]
CHAT = "<start_of_turn>user\nWhat is shared memory?<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module", autouse=True)
def no_network():
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    socket.socket.connect = connect
    yield
    socket.socket.connect = real_connect


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gemma.make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def engine(tiny, compile_cache):
    engine = GemmaEngine(tiny["checkpoint_path"], tiny["tokenizer_path"], "tiny",
                         compile_cache_dir=compile_cache)
    engine.warmup()
    return engine


def test_import_is_cheap():
    code = ("import sys, shmserve.models.gemma_engine, shmserve.models.tiny_gemma; "
            "print(sorted(m for m in ('jax', 'gemma', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_satisfies_gemma3_ids(tiny):
    from gemma import gm

    tok = gm.text.Gemma3Tokenizer(path=tiny["tokenizer_path"])
    special = tok.special_tokens
    assert tok.vocab_size == tiny["config"]["num_embed"]
    assert [tok.tokens[i] for i in (special.PAD, special.EOS, special.BOS, special.UNK)] == [
        "<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.tokens[special.CUSTOM] == "<unused0>"
    assert tok.tokens[special.START_OF_TURN] == "<start_of_turn>"
    assert tok.tokens[special.END_OF_TURN] == "<end_of_turn>"
    assert tok.encode("<start_of_turn>user\n")[0] == special.START_OF_TURN
    text = "Grüße, 😀 shared  memory\n\t42"
    assert special.UNK not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_make_is_deterministic_and_loads_with_release_loader(tiny, tmp_path):
    import jax
    import numpy as np
    from gemma import gm

    again = tiny_gemma.make_tiny_gemma(tmp_path)
    assert open(again["tokenizer_path"], "rb").read() == open(tiny["tokenizer_path"], "rb").read()
    a = gm.ckpts.load_params(tiny["checkpoint_path"])
    b = gm.ckpts.load_params(again["checkpoint_path"])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert sum(x.size for x in jax.tree.leaves(a)) == tiny["num_params"]
    assert set(a) == {"embedder", "final_norm", "layer_0", "layer_1"}


def test_generate_is_deterministic(engine):
    first = engine.generate(["Hello world"], 32)
    assert engine.last_token_counts[0] > 0
    assert engine.generate(["Hello world"], 32) == first
    assert len(first) == 1 and first[0]


def test_fewer_steps_give_a_prefix(engine):
    full = engine.generate([CHAT], 24)[0]
    n = engine.last_token_counts[0]
    short = engine.generate([CHAT], 8)[0]
    assert engine.last_token_counts[0] == min(n, 8)
    assert full.startswith(short)


@pytest.mark.parametrize("prompt", [PROMPTS[0], CHAT, "Grüße 😀"])
def test_stream_pieces_concatenate_to_text(engine, prompt):
    pieces = []
    streamed = engine.generate([prompt], 32, on_piece=lambda i, p: pieces.append((i, p)))
    assert streamed == engine.generate([prompt], 32)
    assert {i for i, _ in pieces} == {0}
    assert "".join(p for _, p in pieces) == streamed[0]
    assert all(pieces)


def test_batch_equals_single_calls(engine):
    singles, counts = [], []
    for prompt in PROMPTS:
        singles += engine.generate([prompt], 32)
        counts += engine.last_token_counts
    assert engine.generate(PROMPTS, 32) == singles
    assert engine.last_token_counts == counts

    pieces = {i: [] for i in range(len(PROMPTS))}
    streamed = engine.generate(PROMPTS, 32, on_piece=lambda i, p: pieces[i].append(p))
    assert streamed == singles
    assert ["".join(pieces[i]) for i in range(len(PROMPTS))] == singles


def test_end_token_ends_one_row_of_a_batch(engine, monkeypatch):
    # Random weights rarely emit <eos>; declare the 6th token generated for the
    # chat prompt an end token instead, to cut that row early.
    out = engine._sampler.sample(CHAT, max_new_tokens=32, rng=0, return_state=True)
    ids = out.tokens[:32].tolist()
    end = next(t for i, t in enumerate(ids) if i >= 5 and t not in ids[:i])
    cut = ids.index(end)
    monkeypatch.setattr(engine, "_end_tokens", engine._end_tokens | {end})

    expected = engine._tokenizer.decode(ids[:cut])
    assert engine.generate([CHAT], 32) == [expected]
    assert engine.last_token_counts == [cut]

    prompts = [CHAT, PROMPTS[0]]
    singles = [engine.generate([p], 32)[0] for p in prompts]
    pieces = {0: [], 1: []}
    assert engine.generate(prompts, 32, on_piece=lambda i, p: pieces[i].append(p)) == singles
    assert ["".join(pieces[0]), "".join(pieces[1])] == singles
    assert engine.last_token_counts[0] == cut


def test_more_prompts_than_max_batch(engine, monkeypatch):
    expected = [engine.generate([p], 16)[0] for p in PROMPTS]
    monkeypatch.setattr(engine, "max_batch", 2)
    pieces = {i: [] for i in range(len(PROMPTS))}
    assert engine.generate(PROMPTS, 16, on_piece=lambda i, p: pieces[i].append(p)) == expected
    assert ["".join(pieces[i]) for i in range(len(PROMPTS))] == expected


def _code(excinfo) -> ErrorCode:
    return excinfo.value.code


def test_empty_prompt(engine):
    with pytest.raises(ProtocolError) as excinfo:
        engine.generate(["fine", ""], 4)
    assert _code(excinfo) == ErrorCode.EMPTY_PROMPT


@pytest.mark.parametrize("steps", [0, -1, 513, True, 1.5, None])
def test_bad_steps(engine, steps):
    with pytest.raises(ProtocolError) as excinfo:
        engine.generate(["Hello"], steps)
    assert _code(excinfo) == ErrorCode.BAD_ARGUMENT
    assert "max_new_tokens" in excinfo.value.message


def test_invalid_utf8(engine):
    with pytest.raises(ProtocolError) as excinfo:
        engine.generate(["bad \udc80 surrogate"], 4)
    assert _code(excinfo) == ErrorCode.INVALID_UTF8


def test_prompt_too_long_names_the_numbers(engine):
    prompt = "the model "
    while engine.count_tokens(prompt) < 700:
        prompt += "the model "
    n = engine.count_tokens(prompt)
    steps = 1024 - n + 1
    with pytest.raises(ProtocolError) as excinfo:
        engine.generate([prompt], steps)
    assert _code(excinfo) == ErrorCode.PROMPT_TOO_LONG
    assert excinfo.value.message == (f"prompt is {n} tokens (BOS included) + max_new_tokens "
                                     f"{steps} = 1025 > cache length 1024")
    with pytest.raises(ProtocolError) as excinfo:
        engine.generate(["word " * 3000], 1)
    assert _code(excinfo) == ErrorCode.PROMPT_TOO_LONG


def test_exactly_full_cache_is_not_truncated(engine, tiny, compile_cache):
    small = GemmaEngine(tiny["checkpoint_path"], tiny["tokenizer_path"], "tiny",
                        cache_length=64, max_new_tokens_limit=60, compile_cache_dir=compile_cache)
    n = small.count_tokens(CHAT)
    steps = 64 - n
    text = small.generate([CHAT], steps)[0]
    assert text == engine.generate([CHAT], steps)[0]
    assert small.last_token_counts == engine.last_token_counts
    with pytest.raises(ProtocolError) as excinfo:
        small.generate([CHAT], steps + 1)
    assert _code(excinfo) == ErrorCode.PROMPT_TOO_LONG
    assert f"{n + steps + 1} > cache length 64" in excinfo.value.message


def test_env_vars(engine, tiny, compile_cache, monkeypatch):
    monkeypatch.setenv("MODEL_CHECKPOINT", tiny["checkpoint_path"])
    monkeypatch.setenv("MODEL_TOKENIZER", tiny["tokenizer_path"])
    from_env = from_env_or_args(None, None, "tiny", compile_cache_dir=compile_cache)
    assert from_env.generate(["Hello world"], 8) == engine.generate(["Hello world"], 8)
    monkeypatch.delenv("MODEL_TOKENIZER")
    with pytest.raises(ValueError, match="MODEL_TOKENIZER"):
        from_env_or_args(None, None, "tiny")
    with pytest.raises(ValueError, match="MODEL_TOKENIZER"):
        from_env_or_args(tiny["checkpoint_path"], "", "tiny")


def test_tokenizer_cache_dir_cannot_shadow_our_file(tiny, compile_cache, tmp_path, monkeypatch):
    # The library prefers $GEMMA_CACHE_DIR/tokenizer/<same file name> when it exists.
    shadow = tmp_path / "tokenizer" / "tokenizer.model"
    shadow.parent.mkdir()
    shadow.write_bytes(b"not a sentencepiece model")
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(tmp_path))
    engine = GemmaEngine(tiny["checkpoint_path"], tiny["tokenizer_path"], "tiny",
                         compile_cache_dir=compile_cache)
    assert engine.count_tokens("<start_of_turn>") == 2


def test_wrong_or_unknown_variant(tiny):
    with pytest.raises(ValueError, match="does not match variant 'gemma3-270m'"):
        GemmaEngine(tiny["checkpoint_path"], tiny["tokenizer_path"], "gemma3-270m",
                    compile_cache_dir=None)
    with pytest.raises(ValueError, match="unknown Gemma variant 'gemma9-1t'"):
        GemmaEngine(tiny["checkpoint_path"], tiny["tokenizer_path"], "gemma9-1t",
                    compile_cache_dir=None)
    with pytest.raises(FileNotFoundError):
        GemmaEngine(tiny["checkpoint_path"] + "-missing", tiny["tokenizer_path"], "tiny")


def test_release_variants_exist_in_library():
    from gemma import gm

    for model_name, tokenizer_name in gemma_engine.RELEASE_VARIANTS.values():
        assert getattr(gm.nn, model_name) and getattr(gm.text, tokenizer_name)
