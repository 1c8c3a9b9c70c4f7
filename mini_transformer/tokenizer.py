"""Tokenizers behind one interface: ``char``, ``byte``, ``bpe``, ``gpt2`` and the imported ``hf``.

Every tokenizer turns text into a list of integer ids and back, and is saved as one JSON file,
``tokenizer.json``, next to the token files of a prepared dataset and in every checkpoint, so
that generation never needs the training data. Loading reads JSON only (never a pickle).

=========  ======================================  ===============================================
kind       vocabulary                              special tokens
=========  ======================================  ===============================================
``char``   the sorted unique characters of the     none: ``eos_id`` and ``bos_id`` are ``None``
           training text (65 for Tiny Shakespeare)  (like nanoGPT's character model)
``byte``   the 256 byte values, then specials      ``<|endoftext|>`` = 256 (``eos_id``; also
                                                   ``bos_id``, the GPT-2 convention)
``bpe``    byte-level BPE trained on your text     ``<|endoftext|>`` = 0 (``eos_id`` = ``bos_id``)
           with Hugging Face ``tokenizers``
``gpt2``   GPT-2's BPE via ``tiktoken`` (50257)    ``<|endoftext|>`` = 50256 (``eos_id`` = ``bos_id``)
``hf``     a Hugging Face ``tokenizer.json``,      the directory's own: ``bos_id``/``eos_id`` from
           imported with its model                 its tokenizer_config (``<s>``, ``</s>``, ...)
=========  ======================================  ===============================================

The first four are built from data (``KINDS``, the choices of ``data.tokenizer``); ``hf`` comes
only from an imported model (:func:`mini_transformer.interop.hf.tokenizer.load_hf_tokenizer`).

Text is always encoded as *ordinary* text: the characters ``<|endoftext|>`` inside a document are
encoded as those characters, not as the special token, so encoding is lossless and a document
can't inject control tokens. Special tokens are added by code (``tokenizer.eos_id``) and decode
to their names. (An ``hf`` tokenizer is as lossless as the imported one: its normalizer may
change the text.)

``decode`` replaces invalid or incomplete UTF-8 with U+FFFD (``errors="replace"``): a streaming
caller decodes the growing list of ids and holds back a trailing U+FFFD until the next token
completes the character.

``tokenizers`` and ``tiktoken`` are optional extras (``pip install 'mini-transformer[bpe]'`` /
``[gpt2]``) and are imported only when a ``bpe``/``hf`` / ``gpt2`` tokenizer is used.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import atomic_write_text
from .errors import SettingError, UserError

TOKENIZER_FILE = "tokenizer.json"
FORMAT = "mini-transformer-tokenizer"
FORMAT_VERSION = 1
KINDS = ("char", "byte", "bpe", "gpt2")
EOT = "<|endoftext|>"
# The BPE trainer reserves memory for the whole vocabulary up front (141 GB for 2**31 entries,
# an abort rather than an exception); 2**20 is four times the largest vocabularies in use.
MAX_BPE_VOCAB_SIZE = 2**20


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set ``kind`` and implement the abstract methods."""

    kind: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included: the model's embedding rows."""

    @property
    def eos_id(self) -> Optional[int]:
        """End-of-text id (``None`` for ``char``, which has no special tokens)."""
        return self.special_tokens.get(EOT)

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-text id: the same ``<|endoftext|>`` token (GPT-2 convention), or ``None``."""
        return self.eos_id

    @property
    def starts_with_bos(self) -> bool:
        """Whether the model this tokenizer came with expects a BOS in front of every text (an
        imported Llama does; our kinds train without one). ``encode`` never adds it: a prompt's
        builder does (:class:`mini_transformer.session.Session`)."""
        return False

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return {}

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (ordinary text: no special tokens are added or parsed)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; the BPE kinds do this on all cores."""
        return [self.encode(t) for t in texts]

    def encode_to_array(self, texts: Sequence[str]) -> np.ndarray:
        """The concatenated ids of ``texts`` as one int64 array (the data pipeline's fast path)."""
        parts = [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid/incomplete UTF-8 becomes U+FFFD."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as plain JSON data (without the header)."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        data = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens, **self.to_json()}
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# -- char ------------------------------------------------------------------------------------

class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the sorted set of characters seen in the data."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("a char vocabulary needs at least one single-character entry")
        self._index = {c: i for i, c in enumerate(self.chars)}
        # Sorted code points: encoding is one np.searchsorted over a UTF-32 view of the text.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array([text]).tolist()

    def encode_to_array(self, texts: Sequence[str]) -> np.ndarray:
        text = "".join(texts)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (len(text),)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self.chars) - 1)
        bad = self._codepoints[ids] != cps
        if bad.any():
            missing = sorted({chr(c) for c in cps[bad].tolist()})
            self._raise_missing(missing)
        return ids.astype(np.int64)

    def _raise_missing(self, missing: list[str]) -> None:
        shown = ", ".join(repr(c) for c in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise UserError(
            f"characters not in the vocabulary: {shown}; this character tokenizer knows only the "
            f"characters of its training text: remove them, or train a model with a byte or BPE "
            f"tokenizer (set data.tokenizer to byte or bpe), which takes any text")

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def to_json(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls(data["chars"])


# -- byte ------------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is ``<|endoftext|>``. Lossless for any text."""

    kind = "byte"
    N_BYTES = 256

    @property
    def vocab_size(self) -> int:
        return self.N_BYTES + 1

    @property
    def special_tokens(self) -> dict[str, int]:
        return {EOT: self.N_BYTES}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of raw bytes (any bytes, not only UTF-8) as int64."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode_to_array(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_bytes("".join(texts).encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i < self.N_BYTES:
                buf.append(i)
            elif i == self.N_BYTES:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(EOT)
                buf.clear()
            else:
                raise ValueError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ByteTokenizer":
        return cls()


# -- bpe and hf (Hugging Face tokenizers) ----------------------------------------------------

def import_tokenizers():
    """The ``tokenizers`` package, or a one-line UserError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError("the bpe and hf tokenizers need the 'tokenizers' package; install it with "
                        "pip install 'mini-transformer[bpe]' (or pip install tokenizers)") from None
    return tokenizers


class _TokenizersBacked(Tokenizer):
    """A tokenizer whose work is done by a Hugging Face ``tokenizers.Tokenizer`` (``backend``)."""

    def __init__(self, backend):
        self._tok = backend
        # Parse special-token text (e.g. "<|endoftext|>") in the input as ordinary text (see the
        # module docstring). The setting is not part of the backend's JSON: set on every load.
        self._tok.encode_special_tokens = True

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` doing the work (shared, not a copy: don't modify it)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; both run on all cores (Rust threads).
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # bpe's ByteLevel decoder (and a Llama-style ByteFallback one) joins the bytes and decodes
        # them lossily: U+FFFD for bad UTF-8.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def backend_json(self) -> dict[str, Any]:
        """The backend's ``tokenizer.json`` content (Hugging Face ``tokenizers`` format)."""
        return json.loads(self._tok.to_str())

    @staticmethod
    def _backend_from_json(data: dict[str, Any]):
        tk = import_tokenizers()
        return tk.Tokenizer.from_str(json.dumps(data))


class BPETokenizer(_TokenizersBacked):
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalization) from Hugging Face ``tokenizers``.

    Byte-level means every string is representable: no unknown token, lossless round trip.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        super().__init__(hf_tokenizer)
        eot = self._tok.token_to_id(EOT)
        self._specials = {} if eot is None else {EOT: eot}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> "BPETokenizer":
        """Learn merges from ``texts`` (any iterable of strings, streamed; ``length`` is for progress)."""
        check_bpe_vocab_size(vocab_size)
        tk = import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def to_json(self) -> dict[str, Any]:
        return {"hf_tokenizer": self.backend_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BPETokenizer":
        return cls(cls._backend_from_json(data["hf_tokenizer"]))


HF_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFTokenizer(_TokenizersBacked):
    """A Hugging Face ``tokenizer.json`` imported with its model (Llama, SmolLM, ... or our own export).

    ``named_tokens`` maps the roles ``bos_token``/``eos_token``/``unk_token``/``pad_token`` to
    token text (or ``None``), as the directory's ``tokenizer_config.json`` names them;
    ``hf_config`` keeps the few settings of that file that an export writes back
    (``add_bos_token``, ``chat_template``, ...). Like every kind, ``encode`` adds no special
    tokens (not even a BOS the original tokenizer would prepend) and reads special-token text as
    ordinary text; the code that wants a BOS adds ``bos_id`` itself.
    """

    kind = "hf"

    def __init__(self, backend, named_tokens: Optional[dict[str, Optional[str]]] = None,
                 hf_config: Optional[dict[str, Any]] = None):
        super().__init__(backend)
        named = dict(named_tokens or {})
        unknown = set(named) - set(HF_TOKEN_ROLES)
        if unknown:
            raise ValueError(f"unknown token roles {sorted(unknown)}; expected some of {HF_TOKEN_ROLES}")
        self.named_tokens: dict[str, Optional[str]] = {role: named.get(role) for role in HF_TOKEN_ROLES}
        for role, text in self.named_tokens.items():
            if text is not None and backend.token_to_id(text) is None:
                raise ValueError(f"the {role} {text!r} is not in the tokenizer's vocabulary")
        self.hf_config: dict[str, Any] = dict(hf_config or {})
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0  # ids may have holes
        self._specials = {t.content: i for i, t in sorted(backend.get_added_tokens_decoder().items())
                          if t.special}

    def _role_id(self, role: str) -> Optional[int]:
        text = self.named_tokens[role]
        return None if text is None else self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> Optional[int]:
        return self._role_id("eos_token")

    @property
    def bos_id(self) -> Optional[int]:
        return self._role_id("bos_token")

    @property
    def pad_id(self) -> Optional[int]:
        return self._role_id("pad_token")

    @property
    def starts_with_bos(self) -> bool:
        """The original tokenizer puts its BOS first: ``add_bos_token``, or a post-processor that
        adds it (Llama's ``TemplateProcessing``)."""
        bos = self.bos_id
        if bos is None:
            return False
        adds_it = self._tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return bool(self.hf_config.get("add_bos_token")) or adds_it

    @property
    def unk_id(self) -> Optional[int]:
        return self._role_id("unk_token")

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def to_json(self) -> dict[str, Any]:
        return {"hf_tokenizer": self.backend_json(), "named_tokens": dict(self.named_tokens),
                "hf_config": dict(self.hf_config)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HFTokenizer":
        return cls(cls._backend_from_json(data["hf_tokenizer"]), data.get("named_tokens"),
                   data.get("hf_config"))


# -- gpt2 (tiktoken) -------------------------------------------------------------------------

GPT2_VOCAB_SIZE = 50257


def _gpt2_encoding():
    try:
        import tiktoken
    except ImportError:
        raise UserError("the gpt2 tokenizer needs the 'tiktoken' package; install it with "
                        "pip install 'mini-transformer[gpt2]' (or pip install tiktoken)") from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken downloads the BPE ranks on first use: network errors vary
        raise SettingError(
            f"the GPT-2 encoding is not available ({type(exc).__name__}: tiktoken could not download "
            f"or find its BPE file, e.g. offline); set TIKTOKEN_CACHE_DIR to a cache that has it, or "
            f"train a byte-level BPE of {GPT2_VOCAB_SIZE} tokens on your own text instead",
            fixes=[{"tokenizer": "bpe", "vocab_size": str(GPT2_VOCAB_SIZE)}]) from None


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (50257 ids) through ``tiktoken``."""

    kind = "gpt2"

    def __init__(self):
        self._enc = _gpt2_encoding()

    @property
    def encoding(self):
        """The ``tiktoken.Encoding`` doing the work (its ranks, pattern and special tokens)."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {EOT: self._enc.eot_token}

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"encoding": "gpt2"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GPT2Tokenizer":
        return cls()


# -- building and loading --------------------------------------------------------------------

_CLASSES: dict[str, type] = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer,
                             "gpt2": GPT2Tokenizer, "hf": HFTokenizer}


def check_bpe_vocab_size(vocab_size: int) -> int:
    """Refuse a BPE vocabulary too small to hold its alphabet, before any text is read."""
    if vocab_size < 257 + 1:
        raise SettingError(f"vocab_size for bpe must be at least 258 (256 bytes + 1 special), got {vocab_size}; "
                           "2048 is a good start", setting="vocab_size")
    if vocab_size > MAX_BPE_VOCAB_SIZE:  # the tokenizers library aborts the process reserving memory for more
        raise SettingError(f"vocab_size for bpe must be at most {MAX_BPE_VOCAB_SIZE:,}, got {vocab_size:,}; "
                           "the largest vocabularies in use have about 256k tokens", setting="vocab_size")
    return vocab_size


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in ``directory/tokenizer.json`` (a prepared dataset or a checkpoint)."""
    path = Path(directory)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no {TOKENIZER_FILE} in {str(path.parent)!r}; prepare the data again "
                        "(mini-transformer prepare) or point to a checkpoint directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{str(path)!r} is not valid JSON; prepare the data again to rewrite it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a mini-transformer tokenizer file; prepare the data again")
    if data.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{str(path)!r} was written by a newer mini-transformer "
                        f"(format {data['version']}); upgrade mini-transformer")
    kind = data.get("kind", "")
    if kind not in _CLASSES:  # not KINDS: an imported model's "hf" tokenizer loads but is never built
        raise UserError(f"{str(path)!r} holds an unknown tokenizer kind {kind!r}; "
                        "it was written by another version of mini-transformer")
    return _CLASSES[kind].from_json(data)
