"""Writes tiny GGUF chat models (and deliberately broken ones) for fast and fault tests.

A tiny model is a real llama-architecture GGUF with random f16 weights, an SPM
tokenizer (special tokens, the 256 byte tokens and a few word pieces) and a
chatml template: llama-server loads it in tens of milliseconds and answers
chat, ``/apply-template`` and ``/tokenize`` with it. Its answers are noise;
that is all fast and fault tests need. ``n_embd``/``n_layer`` scale it up
when a benchmark needs measurable load and prefill costs.

Broken kinds:
  * ``garbage``   random bytes: not a GGUF at all
  * ``truncated`` a valid tiny model cut in half
  * ``dup_tokens`` a valid file whose vocabulary repeats a token; llama.cpp
    aborts the load (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = [
    "\u2581hello",
    "\u2581world",
    "\u2581the",
    "\u2581a",
    "\u2581is",
    "\u2581model",
    "\u2581user",
    "\u2581assistant",
    "\u2581system",
    "\u2581and",
    "\u2581to",
    "\u2581of",
]

BrokenKind = Literal["garbage", "truncated", "dup_tokens"]


def write_tiny_model(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ctx: int = 2048,
    seed: int = 0,
    duplicate_token: bool = False,
) -> Path:
    """Write a loadable tiny llama GGUF to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    tokens = [*_SPECIAL, *(f"<0x{i:02X}>" for i in range(256)), *_WORDS]
    if duplicate_token:
        tokens.append(_WORDS[0])
    types = (
        [
            gguf.TokenType.UNKNOWN,
            gguf.TokenType.CONTROL,
            gguf.TokenType.CONTROL,
            gguf.TokenType.CONTROL,
            gguf.TokenType.CONTROL,
        ]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * (len(tokens) - 261)
    )
    scores = [0.0] * 261 + [-float(i) for i in range(len(tokens) - 261)]
    n_vocab = len(tokens)
    n_ff = n_embd * 2

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("hotmodel-tiny")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(4)  # <|im_end|> ends a chatml turn
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_broken_model(path: Path, kind: BrokenKind) -> Path:
    """Write a GGUF file that llama-server cannot load."""
    if kind == "garbage":
        path.write_bytes(os.urandom(64 * 1024))
    elif kind == "truncated":
        write_tiny_model(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "dup_tokens":
        write_tiny_model(path, duplicate_token=True)
    else:
        raise ValueError(kind)
    return path
