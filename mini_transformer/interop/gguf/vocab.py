"""Our tokenizers as llama.cpp's byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``).

llama.cpp tokenizes such a vocabulary in three steps: a pre-tokenizer regex (chosen by
``tokenizer.ggml.pre``) cuts the text into pieces; each piece is spelled with GPT-2's
byte-to-unicode table and split into one symbol per byte; adjacent symbols are merged by the
lowest-ranked pair of ``tokenizer.ggml.merges`` until none applies, and each symbol left is
looked up in ``tokenizer.ggml.tokens``. Every kind is written so that this gives our ids:

========  ===========================================================================================
kind      tokens and merges
========  ===========================================================================================
``char``  each character, spelled byte-level; merges only inside a multi-byte character (its
          bytes, left to right), so every merge builds a prefix of one character and no piece
          ever grows past it; an added ``<|endoftext|>`` (see below)
``byte``  the 256 byte symbols, ``<|endoftext|>`` = 256, and one merge that never applies
          (llama.cpp needs at least one)
``bpe``   our ``tokenizers`` vocabulary and merges, unchanged (byte-level already)
``gpt2``  tiktoken's ranks spelled byte-level, the merges they imply (as for Hugging Face)
========  ===========================================================================================

Pre-tokenizer. The ``bpe`` and ``gpt2`` kinds split with GPT-2's regex; for ``char`` and
``byte`` any split at character boundaries gives the same ids, as their merges never cross one.
``PRE`` names a llama.cpp pre-tokenizer type whose regex is GPT-2's exactly and that leaves
spaces alone when detokenizing (``gpt-2`` itself turns " ." into "." there, as GPT-2's
``clean_up_tokenization_spaces`` did), so text round-trips.

End of text. A ``gpt2`` vocabulary without an ``eos_token_id`` ends generation at id 11,
llama.cpp's default, an ordinary character in a ``char`` vocabulary. So a ``char`` vocabulary
gets an ``<|endoftext|>`` control token after its own (id = our vocabulary size, with padding
rows in the embedding and output matrices, :func:`.layout.gguf_state_dict`) as its eos, listed in
``tokenizer.ggml.suppress_tokens`` so that llama.cpp's samplers (``llama-cli``,
``llama-server``) never draw it: generation runs to its length, as ours does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ...errors import UserError
from ...tokenizer import EOT, BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from ..hf.tokenizer import bytes_to_unicode, tiktoken_merges

# A llama.cpp pre-tokenizer type with GPT-2's regex that does not clean up spaces on decoding
# (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_TRILLION, clean_spaces = false).
PRE = "trillion"
TOKENIZER_MODEL = "gpt2"
SUPPRESS_TOKENS_KEY = "tokenizer.ggml.suppress_tokens"  # no constant for it in the gguf package yet

# llama.cpp refuses a gpt2 vocabulary without merges, and the gguf writer leaves an empty array
# out: a vocabulary with none (byte, an ASCII char set) gets this one, which can never apply, as
# byte 0xFF never occurs in UTF-8 text.
UNUSED_MERGE = "ÿ ÿ"

# llama.cpp's token types (gguf.TokenType), as plain ints so that this module needs no gguf.
NORMAL = 1
CONTROL = 3


@dataclass
class GGUFVocab:
    """The ``tokenizer.ggml.*`` content of an export."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "left right", lowest rank first
    eos_id: int
    added_tokens: int = 0  # tokens after our vocabulary (padding rows in the weights)
    suppress: list[int] = field(default_factory=list)  # ids llama.cpp's samplers must never draw


def gguf_vocab(tokenizer: Tokenizer) -> GGUFVocab:
    """``tokenizer`` as a byte-level BPE vocabulary that llama.cpp tokenizes exactly as we do."""
    vocab = _vocab(tokenizer)
    if not vocab.merges:
        vocab.merges = [UNUSED_MERGE]
    return vocab


def _vocab(tokenizer: Tokenizer) -> GGUFVocab:
    if isinstance(tokenizer, CharTokenizer):
        return _char_vocab(tokenizer.chars)
    if isinstance(tokenizer, ByteTokenizer):
        table = bytes_to_unicode()
        return _with_specials([table[b] for b in range(ByteTokenizer.N_BYTES)], [], tokenizer.special_tokens)
    if isinstance(tokenizer, BPETokenizer):
        return _bpe_vocab(json.loads(tokenizer.backend.to_str()))
    if isinstance(tokenizer, GPT2Tokenizer):
        return _tiktoken_vocab(tokenizer)
    raise UserError(f"the {tokenizer.kind!r} tokenizer has no GGUF form here (char, byte, bpe and gpt2 do); "
                    "export the model with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def byte_level(text: str) -> str:
    """``text``'s UTF-8 bytes spelled with GPT-2's byte-to-unicode table."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _char_vocab(chars: list[str]) -> GGUFVocab:
    table = bytes_to_unicode()
    tokens = [byte_level(c) for c in chars]
    merges: dict[str, None] = {}  # ordered set: characters sharing a prefix share its merges
    for c in chars:
        symbols = [table[b] for b in c.encode("utf-8")]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            merges[f"{prefix} {symbol}"] = None
            prefix += symbol
    vocab_size = len(tokens)
    return GGUFVocab(tokens + [EOT], [NORMAL] * vocab_size + [CONTROL], list(merges), eos_id=vocab_size,
                     added_tokens=1, suppress=[vocab_size])


def _with_specials(tokens: list[str], merges: list[str], specials: dict[str, int],
                   size: Optional[int] = None) -> GGUFVocab:
    """A vocabulary whose ``tokens`` (by id) are followed or interleaved by the ``specials``."""
    size = size or len(tokens) + len(specials)
    by_id: list[Optional[str]] = list(tokens) + [None] * (size - len(tokens))
    types = [NORMAL] * size
    for text, i in specials.items():
        by_id[i], types[i] = text, CONTROL
    holes = [i for i, token in enumerate(by_id) if token is None]
    if holes:
        raise ValueError(f"the vocabulary has no token with id {holes[0]}")
    return GGUFVocab([t for t in by_id if t is not None], types, merges, eos_id=specials[EOT])


def _bpe_vocab(backend: dict) -> GGUFVocab:
    model = backend["model"]
    specials = {t["content"]: t["id"] for t in backend["added_tokens"]}
    size = max([*model["vocab"].values(), *specials.values()]) + 1
    tokens: list[Optional[str]] = [None] * size
    for text, i in model["vocab"].items():
        tokens[i] = text
    for text, i in specials.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # both JSON forms
    types = [CONTROL if i in specials.values() else NORMAL for i in range(size)]
    if any(t is None for t in tokens):
        raise ValueError("the BPE vocabulary has holes in its ids")
    return GGUFVocab([t for t in tokens if t is not None], types, merges, eos_id=specials[EOT])


def _tiktoken_vocab(tokenizer: GPT2Tokenizer) -> GGUFVocab:
    encoding = tokenizer.encoding
    ranks: dict[bytes, int] = encoding._mergeable_ranks  # tiktoken keeps these private, no accessor
    table = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    tokens = [spell(token) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    merges = [f"{spell(left)} {spell(right)}" for left, right in tiktoken_merges(ranks)]
    return _with_specials(tokens, merges, dict(encoding._special_tokens), size=encoding.n_vocab)
