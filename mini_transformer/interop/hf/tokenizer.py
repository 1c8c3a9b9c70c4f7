"""Our tokenizers as Hugging Face ``tokenizers``/``transformers`` files, and back.

Export: :func:`save_hf_tokenizer` writes ``tokenizer.json`` (the ``tokenizers`` format),
``tokenizer_config.json`` and ``special_tokens_map.json``, so that
``transformers.AutoTokenizer.from_pretrained(directory)`` (a ``PreTrainedTokenizerFast``, no custom
code) gives the same ids as ours for any text, and decodes them back to the same text:

========  ==========================================================================================
kind      Hugging Face pipeline
========  ==========================================================================================
``char``  ``WordLevel`` over our vocabulary, one piece per code point (a ``Split`` on every
          character), ``Fuse`` decoder. A character outside the vocabulary makes encoding fail (a
          ``WordLevel`` "missing [UNK]" error), as ours refuses it: no id is ever made up for it.
``byte``  byte-level ``BPE`` without merges: the 256 byte symbols of GPT-2's byte-to-unicode
          table at ids 0-255, ``<|endoftext|>`` = 256.
``bpe``   our own ``tokenizers`` JSON, unchanged.
``gpt2``  byte-level ``BPE`` rebuilt from tiktoken's ranks (as Hugging Face's GPT-2 files are):
          vocabulary = ranks, merges recovered from the ranks, tiktoken's split pattern, and
          ``ignore_merges`` for tiktoken's whole-piece lookup; ``<|endoftext|>`` = 50256.
``hf``    the imported ``tokenizer.json`` and its settings, written back.
========  ==========================================================================================

The end-of-text token is a special token (``bos_token`` = ``eos_token``), and
``split_special_tokens`` is set so that the *text* ``<|endoftext|>`` inside a document encodes as
ordinary characters, as ours does. No BOS/EOS is added on encode (``add_bos_token`` false, no
post-processor), and decoding leaves spaces alone (``clean_up_tokenization_spaces`` false).

Import: :func:`load_hf_tokenizer` reads an HF directory's ``tokenizer.json`` into a tokenizer of
ours (kind ``hf``), with the special tokens its ``tokenizer_config.json`` names; it is saved with
our checkpoints like any other kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ...atomic import atomic_write_text, make_dirs
from ...errors import UserError, first_line
from ...tokenizer import (EOT, FORMAT, HF_TOKEN_ROLES, BPETokenizer, ByteTokenizer, CharTokenizer,
                          GPT2Tokenizer, HFTokenizer, Tokenizer, import_tokenizers)

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SENTENCEPIECE_FILE = "tokenizer.model"

# Settings of an imported tokenizer_config.json that are kept and written back on export: they
# change what transformers' encode adds (BOS/EOS), how it decodes, or how chats are formatted.
KEPT_HF_CONFIG_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "chat_template",
                       "clean_up_tokenization_spaces", "split_special_tokens", "legacy")


# -- export ---------------------------------------------------------------------------------

def build_hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A new ``tokenizers.Tokenizer`` that encodes and decodes exactly like ``tokenizer``.

    Encode it with ``add_special_tokens=False`` and ``encode_special_tokens = True`` (what
    ``split_special_tokens`` sets in ``transformers``) to get our ids for any text.
    """
    if isinstance(tokenizer, CharTokenizer):
        return _char_backend(tokenizer.chars)
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_backend()
    if isinstance(tokenizer, (BPETokenizer, HFTokenizer)):
        tk = import_tokenizers()
        return tk.Tokenizer.from_str(tokenizer.backend.to_str())  # a copy
    if isinstance(tokenizer, GPT2Tokenizer):
        return _tiktoken_backend(tokenizer.encoding)
    raise ValueError(f"no Hugging Face form for the tokenizer kind {tokenizer.kind!r}")


def _char_backend(chars: list[str]) -> Any:
    tk = import_tokenizers()
    # WordLevel's unk token is left out of the vocabulary on purpose: an unknown character then
    # fails to encode (like ours) instead of becoming some id.
    backend = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    # One piece per code point; [\s\S] matches every character, newlines included.
    backend.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tk.decoders.Fuse()  # join the pieces with nothing in between
    return backend


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character (byte-level BPE's alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # whitespace and control bytes move to 256 and up
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]], *,
                        split_pattern: Optional[str], ignore_merges: bool,
                        specials: dict[str, int]) -> Any:
    """Byte-level BPE; ``split_pattern`` (a regex, or None for the whole text) cuts pieces first."""
    tk = import_tokenizers()
    vocab = dict(vocab)
    for text, i in specials.items():  # in the model's vocabulary too, so they keep their ids
        vocab[text] = i
    backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if split_pattern is None:
        backend.pre_tokenizer = byte_level
    else:
        backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Split(tk.Regex(split_pattern), behavior="isolated"), byte_level])
    backend.decoder = tk.decoders.ByteLevel()
    backend.add_special_tokens([tk.AddedToken(text, special=True, normalized=False)
                                for text, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    return backend


def _byte_backend() -> Any:
    table = bytes_to_unicode()
    return _byte_level_backend({table[b]: b for b in range(ByteTokenizer.N_BYTES)}, [],
                               split_pattern=None, ignore_merges=False,
                               specials={EOT: ByteTokenizer.N_BYTES})


def _tiktoken_backend(encoding: Any) -> Any:
    """A ``tiktoken.Encoding`` (GPT-2's) as byte-level BPE with the same ids."""
    ranks: dict[bytes, int] = encoding._mergeable_ranks  # tiktoken keeps these private, no accessor
    table = bytes_to_unicode()

    def to_text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_text(token): rank for token, rank in ranks.items()}
    merges = [(to_text(left), to_text(right)) for left, right in tiktoken_merges(ranks)]
    # ignore_merges: a piece that is a whole token maps to it directly, as tiktoken does.
    return _byte_level_backend(vocab, merges, split_pattern=encoding._pat_str, ignore_merges=True,
                               specials=dict(encoding._special_tokens))


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that tiktoken's ranks imply, in rank order.

    A token of rank ``r`` is the merge of the two parts that BPE reaches on its bytes using only
    the ranks below ``r``; tokens that BPE can't reach that way (none in GPT-2's ranks) get no
    merge, and only the whole-piece lookup (``ignore_merges``) produces them, as in tiktoken.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, max_rank=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on ``token``: merge the lowest-ranked adjacent pair below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:  # strict: the leftmost wins a tie
                best_rank, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def _named_tokens(tokenizer: Tokenizer) -> dict[str, Optional[str]]:
    """bos/eos/unk/pad token text of ``tokenizer`` (``None`` where the kind has none)."""
    if isinstance(tokenizer, HFTokenizer):
        return dict(tokenizer.named_tokens)
    eot = EOT if tokenizer.eos_id is not None else None
    # The byte-level kinds never meet an unknown character; char refuses one: no unk token.
    return {"bos_token": eot, "eos_token": eot, "unk_token": None, "pad_token": None}


def _added_tokens_decoder(backend: Any) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())}


def hf_tokenizer_config(tokenizer: Tokenizer, backend: Any,
                        model_max_length: Optional[int] = None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` content for ``tokenizer`` (whose backend is ``backend``)."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(_named_tokens(tokenizer))
    if isinstance(tokenizer, HFTokenizer):
        # The imported settings, so that transformers behaves as it did on the original directory.
        config.update({k: v for k, v in tokenizer.hf_config.items() if k in KEPT_HF_CONFIG_KEYS})
    else:
        config.update({"add_bos_token": False, "add_eos_token": False,
                       "clean_up_tokenization_spaces": False, "split_special_tokens": True})
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    config["added_tokens_decoder"] = _added_tokens_decoder(backend)
    return config


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike,
                      model_max_length: Optional[int] = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``model_max_length`` is the model's context (``block_size``). ``directory`` is created if
    needed; it must not be one of our checkpoints (our ``tokenizer.json`` has the same name).
    """
    directory = Path(directory)
    make_dirs(directory)
    backend = build_hf_tokenizer(tokenizer)
    config = hf_tokenizer_config(tokenizer, backend, model_max_length)
    special_map = {role: text for role, text in _named_tokens(tokenizer).items() if text is not None}
    atomic_write_text(directory / HF_TOKENIZER_FILE, backend.to_str(pretty=True) + "\n")
    atomic_write_text(directory / HF_TOKENIZER_CONFIG_FILE, _dumps(config))
    atomic_write_text(directory / HF_SPECIAL_TOKENS_MAP_FILE, _dumps(special_map))


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


# -- import ---------------------------------------------------------------------------------

def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (its ``tokenizer.json``) as a tokenizer of ours.

    Its bos/eos/unk/pad tokens are those ``tokenizer_config.json`` names, else
    ``special_tokens_map.json``, else (bos/eos that neither file mentions) the ids in
    ``generation_config.json`` or ``config.json``. A named unk or pad token that the vocabulary lacks is dropped (transformers
    would add it as a new id the model has no row for); a missing bos or eos is refused.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory; give a local Hugging Face model directory")
    path = directory / HF_TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"no {HF_TOKENIZER_FILE} in {str(directory)!r}: only fast tokenizers are supported; a "
            f"sentencepiece-only {SENTENCEPIECE_FILE} must be converted first "
            f"(transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes {HF_TOKENIZER_FILE})")
    data = _read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        raise UserError(f"{str(path)!r} is a mini-transformer tokenizer, not a Hugging Face one; "
                        "this directory is a checkpoint of ours, load it as such")
    tk = import_tokenizers()
    try:
        backend = tk.Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises a bare Exception with a Rust message
        raise UserError(f"{str(path)!r} is not a tokenizers file this version can read ({first_line(exc)}); "
                        "upgrade tokenizers or re-save it with transformers") from None
    config = _read_optional_json(directory / HF_TOKENIZER_CONFIG_FILE)
    named = _named_tokens_of(directory, config, backend)
    for role, token in named.items():
        if token is not None and backend.token_to_id(token) is None:
            if role in ("bos_token", "eos_token"):
                raise UserError(f"{str(directory)!r} names {token!r} as its {role}, but {HF_TOKENIZER_FILE} "
                                f"does not hold that token; fix {HF_TOKENIZER_CONFIG_FILE}")
            named[role] = None
    kept = {k: config[k] for k in KEPT_HF_CONFIG_KEYS if k in config}
    return HFTokenizer(backend, named, kept)


def _named_tokens_of(directory: Path, config: dict[str, Any], backend: Any) -> dict[str, Optional[str]]:
    special_map = _read_optional_json(directory / HF_SPECIAL_TOKENS_MAP_FILE)
    named: dict[str, Optional[str]] = {}
    for role in HF_TOKEN_ROLES:
        value = config[role] if role in config else special_map.get(role)
        named[role] = _token_text(value)
    # Some directories name their bos/eos only by id, in the model's configs. A role the
    # tokenizer files set to null (Qwen's bos_token) stays None, as in transformers.
    unnamed = [role for role in ("bos_token", "eos_token") if role not in config and role not in special_map]
    for config_file in ("generation_config.json", "config.json"):
        model_config = _read_optional_json(directory / config_file)
        for role in unnamed:
            token_id = model_config.get(role + "_id")
            if isinstance(token_id, list):  # several stop ids: the first is the end-of-text
                token_id = token_id[0] if token_id else None
            if named[role] is None and isinstance(token_id, int):
                named[role] = backend.id_to_token(token_id)
    return named


def _token_text(value: Any) -> Optional[str]:
    """A token as tokenizer_config.json writes it: its text, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{str(path)!r} is not valid JSON; download or write it again") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that holds an object (the configs of a Hugging Face directory)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} is not a JSON object; download or write it again")
    return data


def _read_optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}
