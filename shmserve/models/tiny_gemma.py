"""Build small random-weight Gemma models for tests and benchmarks.

A released Gemma checkpoint is a few GB and needs a licence click-through, so
tests use a model with the same architecture class (`gm.nn.Transformer`) and
the same on-disk formats instead:

* ``tokenizer.model``: a SentencePiece model whose special pieces sit at the ids
  `gm.text.Gemma3Tokenizer` hard-codes (pad 0, eos 1, bos 2, unk 3, <mask> 4,
  [multimodal] 5, <unused0..98> 6..104, <start_of_turn> 105, <end_of_turn> 106),
  so the real tokenizer class and the sampler's end tokens work unchanged.
* ``checkpoint/``: an orbax checkpoint in the FLAT layout of the released
  checkpoints (``transformer/layer_0/attn/...``), read by `gm.ckpts.load_params`
  through the same conversion path as a real release.
* ``variant.json``: the architecture, because a checkpoint stores none. The
  engine rebuilds the model from it when asked for the variant named inside.

Everything is derived from fixed seeds, so two runs produce the same files.
"""
from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

VARIANT_FILE = "variant.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoint"
_FORMAT = 1

# Pieces 4..106 of the Gemma 3 vocabulary, in id order. They are user-defined
# (not control) symbols so that a prompt written with the chat template, e.g.
# "<start_of_turn>user\n...", encodes them as single tokens as the real one does.
GEMMA3_SPECIAL_PIECES = (
    ["<mask>", "[multimodal]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
_FIRST_SPECIAL_ID = 4

# SentencePiece cannot learn more pieces than a small corpus supports; larger
# vocabularies (benchmark shapes) are padded with filler pieces after training.
_TRAINED_VOCAB = 1024

_TINY_SHAPE = {
    "embed_dim": 64,
    "hidden_dim": 256,
    "num_heads": 4,
    "head_dim": 16,
    "num_kv_heads": 2,
    "sliding_window_size": 32,
}


def make_tiny_gemma(out_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Writes the `tiny` variant (2 layers, Gemma 3 block) to `out_dir`.

    Returns the description written to ``variant.json`` plus the file paths.
    """
    from gemma import gm

    # One sliding-window layer and one global layer, so both attention kinds
    # and both RoPE frequencies of the Gemma 3 block are exercised.
    config = gm.nn.config.TransformerConfig(
        num_embed=_TRAINED_VOCAB,
        final_logit_softcap=None,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL),
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        **_TINY_SHAPE,
    )
    # float32 keeps CPU runs fast and greedy decoding free of bf16 near-ties.
    return make_random_gemma(out_dir, name="tiny", config=config, dtype="float32", seed=seed)


def make_random_gemma(out_dir: str | Path, *, name: str, config: Any,
                      dtype: str = "bfloat16", seed: int = 0) -> dict[str, Any]:
    """Writes a random-weight model of any text-only `TransformerConfig`.

    The tokenizer gets exactly `config.num_embed` pieces, so every id the
    random model can emit decodes.
    """
    import jax
    import jax.numpy as jnp
    from gemma import gm
    from gemma.gm.ckpts import _checkpoint

    if config.vision_encoder is not None:
        raise ValueError("only text-only configs are supported")
    if config.num_embed <= _FIRST_SPECIAL_ID + len(GEMMA3_SPECIAL_PIECES) + 256:
        raise ValueError(f"num_embed={config.num_embed} leaves no room for normal pieces")

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out / TOKENIZER_FILE
    tokenizer_path.write_bytes(build_tokenizer_model(config.num_embed))

    params = _random_params(gm.nn.Transformer(config=config, dtype=jnp.dtype(dtype)), seed)

    checkpoint = out / CHECKPOINT_DIR
    # orbax refuses to overwrite; rebuilding in place must give the same files.
    shutil.rmtree(checkpoint, ignore_errors=True)
    # Released checkpoints use the FLAT layout; gemma's own converter produces
    # it, so load_params takes the same FLAT -> nested path as for a release.
    gm.ckpts.save_params(_checkpoint._nested_to_flat(params), checkpoint,
                         wait_until_finished=True)

    description = {
        "format": _FORMAT,
        "name": name,
        "tokenizer": "gemma3",
        "dtype": dtype,
        "seed": seed,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "config": config_to_json(config),
    }
    (out / VARIANT_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description | {
        "dir": str(out),
        "tokenizer_path": str(tokenizer_path),
        "checkpoint_path": str(checkpoint),
    }


def _random_params(model: Any, seed: int) -> Any:
    """Random weights with the exact structure `model.init` would give.

    `model.init` itself compiles a full forward pass (~12 s on 2 CPU cores even
    for the tiny model), and one jitted function drawing every leaf took XLA
    minutes to compile for a 2.6 B model on a GPU. Instead: trace for shapes
    only, then one small jitted draw per distinct leaf shape (a handful, as all
    layers share shapes). Matrices get std 1/sqrt(embed_dim), which keeps
    activations O(1); norm scales are 0, i.e. identity in Gemma's (1 + scale)
    RMSNorm. The (tied) embedding is 10x smaller: otherwise the residual stream
    is dominated by the input token and a random model just repeats its last
    prompt token, which makes for weak tests.
    """
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("shape", "dtype", "std"))
    def normal(key, shape, dtype, std):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    shapes = jax.eval_shape(
        lambda key: model.init(key, tokens=jnp.zeros((1, 8), jnp.int32))["params"],
        jax.random.key(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    std = model.config.embed_dim ** -0.5
    key = jax.random.key(seed)
    leaves = []
    for i, (path, leaf) in enumerate(flat):
        if path[-1].key == "scale":
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            leaf_std = std / 10 if path[-1].key == "input_embedding" else std
            leaves.append(normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, leaf_std))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def build_tokenizer_model(vocab_size: int) -> bytes:
    """Returns a serialized SentencePiece model with the Gemma 3 id layout."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=min(vocab_size, _TRAINED_VOCAB),
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=GEMMA3_SPECIAL_PIECES,
        # Like the Gemma tokenizers: any UTF-8 text encodes without <unk>, and
        # decode(encode(text)) == text (no dummy prefix, no normalisation).
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        # A single thread makes training deterministic.
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for i in range(len(proto.pieces), vocab_size):
        # Never produced by encoding (no BPE merge leads to them); decoding
        # yields the literal text, which is what random benchmark weights need.
        proto.pieces.add(piece=f"<filler{i}>", score=-1e9,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
    _check_layout(proto, vocab_size)
    return proto.SerializeToString()


def _check_layout(proto: Any, vocab_size: int) -> None:
    expected = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"}
    expected |= {_FIRST_SPECIAL_ID + i: p for i, p in enumerate(GEMMA3_SPECIAL_PIECES)}
    got = {i: proto.pieces[i].piece for i in expected}
    if got != expected or len(proto.pieces) != vocab_size:
        raise AssertionError(f"SentencePiece placed special pieces wrongly: {got}")


def _corpus() -> list[str]:
    """Deterministic pseudo-text: real short words plus invented ones."""
    rng = random.Random(1234)
    syllables = ["ka", "to", "ri", "mu", "sen", "da", "lo", "pi", "ve", "na", "shi",
                 "ga", "ter", "bo", "qui", "ze", "fa", "lu", "mor", "tan", "el", "os"]
    words = ("the a of and to in is it that for on with as was be by this are or from "
             "model memory shared server token ring prompt reply user answer text "
             "Gemma Go Python question small large fast slow").split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
              for _ in range(400)]
    lines = []
    for _ in range(3000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        lines.append(f"{sentence.capitalize()}{rng.choice('.!?,:;')} {rng.randint(0, 9999)}")
    lines += [f"<start_of_turn>user\n{line}<end_of_turn>\n<start_of_turn>model\n"
              for line in lines[:300]]
    return lines


def config_to_json(config: Any) -> dict[str, Any]:
    """`TransformerConfig` -> JSON-safe dict (enums by name)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "vision_encoder":
            continue
        if field.name == "attention_types":
            value = [t.name for t in value]
        elif field.name == "query_pre_attn_norm":
            value = value.name
        out[field.name] = value
    return out


def config_from_json(data: dict[str, Any]) -> Any:
    """Inverse of `config_to_json`."""
    from gemma import gm

    cfg = gm.nn.config
    data = dict(data)
    data["attention_types"] = tuple(cfg.AttentionType[t] for t in data["attention_types"])
    data["query_pre_attn_norm"] = cfg.QueryPreAttentionNormalisation[data["query_pre_attn_norm"]]
    return cfg.TransformerConfig(**data)


def read_variant_file(checkpoint: str | Path) -> dict[str, Any]:
    """Reads the ``variant.json`` written next to `checkpoint`."""
    path = Path(checkpoint).resolve().parent / VARIANT_FILE
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {VARIANT_FILE} next to checkpoint {checkpoint}") from None
    if description.get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported format {description.get('format')!r}")
    return description
