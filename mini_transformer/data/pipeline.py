"""Text -> token files: ``train.bin``, ``val.bin``, ``meta.json`` and ``tokenizer.json`` in one directory.

The pipeline streams: text is read in blocks (``chunk_size`` bytes), cut into pieces at
positions where cutting cannot change the tokens (anywhere for char/byte; before a whitespace
run for BPE, see :func:`~.sources.bpe_safe_cut`), encoded a batch of pieces at a time (on all
cores for BPE) and appended to a token file. Memory stays bounded whatever the corpus size.
Passes over the data: char 2 (collect the characters, encode), bpe 2 (train, encode), byte and
gpt2 1.

The split: the token stream of the whole corpus is cut once; the first ``1 - val_fraction`` of
the tokens is ``train.bin`` and the last ``val_fraction`` is ``val.bin`` (the end of the text is
validation, like nanoGPT). ``n_train = int(n * (1 - val_fraction))``.

Documents: the records of a JSON Lines or Parquet input (see :mod:`.documents`) are separated
by the tokenizer's end-of-text token (``<|endoftext|>`` for byte, bpe and gpt2), which also
stands between such a file and its neighbours; a tokenizer without one (char) gets a blank line
(``"\\n\\n"``), as between text files. So a model learns where a document ends, and
generation from an empty prompt (which starts at end-of-text) begins a fresh document.

Token files are flat ``uint16`` arrays when the vocabulary fits (<= 65536 ids), else ``uint32``,
read back as numpy memmaps. Every file is written to a temporary name and renamed, and
``meta.json`` is written last: a directory with ``meta.json`` is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_directory, atomic_write_text, fsync_dir, make_dirs, reported_as
from ..config import DataConfig
from ..errors import UserError
from ..tokenizer import (BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer,
                         check_bpe_vocab_size, check_kind, load_tokenizer)
from .sources import (DEFAULT_CHUNK_SIZE, DOCUMENT_BREAK, SEPARATOR, Source, any_cut, bpe_safe_cut,
                      cached_sha256, dataset_sources, expand_input, iter_corpus_bytes, iter_corpus_text,
                      iter_pieces, open_inputs)

META_FILE = "meta.json"
FORMAT = "mini-transformer-data"
FORMAT_VERSION = 1
PIECES_PER_BATCH = 16  # pieces encoded per encode_batch call: parallel work for every core


@dataclass
class PreparedData:
    """A prepared dataset: token memmaps, their tokenizer and ``meta.json``."""

    directory: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: np.memmap  # (n_train,) token ids
    val: np.memmap    # (n_val,) token ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# -- progress --------------------------------------------------------------------------------

@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A byte-count progress bar on stderr (rate and ETA), or a no-op."""
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def _total_bytes(sources: list[Source]) -> int:
    return sum(s.size for s in sources) + len(SEPARATOR) * (len(sources) - 1)


# -- building the tokenizer --------------------------------------------------------------------

def build_tokenizer(kind: str, sources: list[Source], *, vocab_size: int = 2048,
                    train_bytes: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    progress: bool = True) -> Tokenizer:
    """A tokenizer for ``sources``: char collects the characters, bpe learns merges (one pass each).

    ``train_bytes`` limits BPE training to the start of the corpus (about that many bytes, cut
    at a safe position); the whole corpus is still encoded.
    """
    check_kind(kind)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer()
    total = _total_bytes(sources)
    if kind == "char":
        seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
        with _progress(total, "collecting characters", progress) as on_bytes:
            for text in iter_corpus_text(sources, chunk_size, on_bytes):
                seen[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
        return CharTokenizer(chr(c) for c in np.flatnonzero(seen))
    if train_bytes is not None:
        total = min(total, train_bytes)
    with _progress(total, f"training BPE ({vocab_size})", progress) as on_bytes:
        # Small pieces: the trainer buffers a few hundred items of its iterator. No merge
        # crosses a document break (where the end-of-text token will be).
        pieces = iter_pieces(iter_corpus_text(sources, chunk_size, on_bytes, document_break=DOCUMENT_BREAK),
                             max(1, chunk_size // PIECES_PER_BATCH), bpe_safe_cut)
        texts = (piece for piece in pieces if piece is not DOCUMENT_BREAK)
        return BPETokenizer.train(_take_bytes(texts, train_bytes), vocab_size)


def _take_bytes(pieces: Iterator[str], limit: Optional[int]) -> Iterator[str]:
    """The text of ``pieces`` up to its first ``limit`` UTF-8 bytes (all of it when ``limit`` is None).

    The cut is at exactly ``limit`` bytes (less a partial character), whatever the piece
    boundaries are, so the trained merges don't depend on the chunk size.
    """
    seen = 0
    for piece in pieces:
        if limit is None:
            yield piece
            continue
        data = piece.encode("utf-8")
        if seen + len(data) >= limit:
            yield data[:limit - seen].decode("utf-8", errors="ignore")
            return
        seen += len(data)
        yield piece


# -- encoding ----------------------------------------------------------------------------------

def document_separator(tokenizer: Tokenizer) -> str:
    """What separates documents (see the module's docstring), as meta.json records it."""
    return tokenizer.decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else SEPARATOR


def _iter_token_arrays(tokenizer: Tokenizer, sources: list[Source], chunk_size: int, on_bytes,
                       hashers: list) -> Iterator[np.ndarray]:
    """The corpus as a stream of int64 id arrays (the same ids whatever ``chunk_size`` is)."""
    eos = np.array([tokenizer.eos_id if tokenizer.eos_id is not None else -1], dtype=np.int64)
    document_break = DOCUMENT_BREAK if tokenizer.eos_id is not None else SEPARATOR
    if isinstance(tokenizer, ByteTokenizer):  # raw bytes: any file, UTF-8 or not
        for block in iter_corpus_bytes(sources, chunk_size, on_bytes, hashers, document_break):
            yield eos if block is DOCUMENT_BREAK else tokenizer.encode_bytes(block)
        return
    safe_cut = any_cut if isinstance(tokenizer, CharTokenizer) else bpe_safe_cut
    piece_size = max(1, chunk_size // PIECES_PER_BATCH)
    batch: list[str] = []
    texts = iter_corpus_text(sources, chunk_size, on_bytes, hashers, document_break)
    for piece in iter_pieces(texts, piece_size, safe_cut):
        if piece is DOCUMENT_BREAK:
            if batch:
                yield tokenizer.encode_to_array(batch)
                batch = []
            yield eos
            continue
        batch.append(piece)
        if len(batch) == PIECES_PER_BATCH:
            yield tokenizer.encode_to_array(batch)
            batch = []
    if batch:
        yield tokenizer.encode_to_array(batch)


def _encode_to_file(tokenizer: Tokenizer, sources: list[Source], path: Path, dtype: np.dtype,
                    chunk_size: int, progress: bool) -> tuple[int, list[str]]:
    """Write all token ids to ``path``; returns (token count, sha256 of each source)."""
    hashers = [hashlib.sha256() for _ in sources]
    count = 0
    with open(path, "wb") as f, _progress(_total_bytes(sources), "tokenizing", progress) as on_bytes:
        for ids in _iter_token_arrays(tokenizer, sources, chunk_size, on_bytes, hashers):
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
    return count, [h.hexdigest() for h in hashers]


def _split_token_file(tokens: Path, val: Path, n_train: int, itemsize: int) -> None:
    """Move the tail of ``tokens`` to ``val`` and truncate ``tokens`` to the train part (no full copy)."""
    with open(tokens, "r+b") as src, open(val, "wb") as dst:
        src.seek(n_train * itemsize)
        shutil.copyfileobj(src, dst, DEFAULT_CHUNK_SIZE)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(n_train * itemsize)
        src.flush()
        os.fsync(src.fileno())


def split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val): the last ``val_fraction`` of the tokens is validation."""
    n_train = int(n_tokens * (1.0 - val_fraction))
    return n_train, n_tokens - n_train


def write_prepared(sources: list[Source], out_dir: str | os.PathLike, *, tokenizer: str | Tokenizer = "char",
                   vocab_size: int = 2048, train_bytes: Optional[int] = None,
                   val_fraction: float = 0.1, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   progress: bool = True, extra_meta: Optional[dict[str, Any]] = None) -> PreparedData:
    """Tokenize ``sources`` into ``out_dir`` (``tokenizer`` is a kind, or a ready Tokenizer to reuse)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}; 0.1 is the default")
    if tokenizer == "bpe":
        check_bpe_vocab_size(vocab_size)
    out = make_dirs(out_dir)
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()  # the directory is incomplete until meta.json is rewritten
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(
        tokenizer, sources, vocab_size=vocab_size, train_bytes=train_bytes, chunk_size=chunk_size,
        progress=progress)
    dtype = token_dtype(tok.vocab_size)
    with reported_as(out):  # a full disk, named as the directory being written
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".tokens.", suffix=".tmp")
        os.close(fd)
        val_tmp = Path(tmp + ".val")
        try:
            n_tokens, digests = _encode_to_file(tok, sources, Path(tmp), dtype, chunk_size, progress)
            n_train, n_val = split_sizes(n_tokens, val_fraction)
            if n_train == 0 or n_val == 0:
                raise UserError(f"the text gives only {n_tokens} tokens, too few to split into train and "
                                f"validation with val_fraction {val_fraction}; use more text")
            _split_token_file(Path(tmp), val_tmp, n_train, dtype.itemsize)
            for path in (tmp, val_tmp):
                os.chmod(path, 0o644)  # mkstemp makes 0600; token files are ordinary data
            os.replace(tmp, out / "train.bin")
            os.replace(val_tmp, out / "val.bin")
        finally:
            for leftover in (Path(tmp), val_tmp):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    tok.save(out)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "train_tokens": n_train, "val_tokens": n_val, "total_tokens": n_tokens,
        "split": {"val_fraction": val_fraction, "method": "the last val_fraction of the token stream is val.bin"},
        "bpe_vocab_size": vocab_size if tok.kind == "bpe" else None,
        "bpe_train_bytes": train_bytes if tok.kind == "bpe" else None,
        "separator": SEPARATOR,
        **_documents_meta(sources, tok),
        "sources": [{"name": s.name, "bytes": s.size, "sha256": d} for s, d in zip(sources, digests)],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra_meta or {}),
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    fsync_dir(out)
    return load_prepared(out)


def _documents_meta(sources: list[Source], tokenizer: Tokenizer) -> dict[str, Any]:
    """How JSON Lines / Parquet documents were read and joined (nothing for text files alone)."""
    if not any(s.has_documents for s in sources):
        return {}
    return {"text_field": sources[0].text_field, "document_separator": document_separator(tokenizer)}


# -- loading -----------------------------------------------------------------------------------

def is_prepared_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    """Open a directory written by ``mini-transformer prepare`` (or the training cache)."""
    d = Path(directory)
    if not is_prepared_dir(d):
        raise UserError(f"{str(d)!r} is not a prepared dataset (no {META_FILE}); prepare text into it "
                        "first, or use a directory that was prepared")
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        counts = {"train": int(meta["train_tokens"]), "val": int(meta["val_tokens"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{str(d / META_FILE)!r} is damaged; prepare the data again") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{str(d)!r} was not written by this version of mini-transformer prepare; prepare it again")
    arrays = {}
    for split, count in counts.items():
        path = d / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
            raise UserError(f"{str(path)!r} is missing or does not match {META_FILE} "
                            f"({count} tokens expected); prepare the data again")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r")
    return PreparedData(d, meta, load_tokenizer(d), arrays["train"], arrays["val"])


def check_split_lengths(data: PreparedData, block_size: int) -> None:
    """Both splits must hold at least one window of ``block_size + 1`` tokens."""
    for split, tokens in (("train", data.train), ("val", data.val)):
        if len(tokens) < block_size + 1:
            raise UserError(
                f"the {split} split of {str(data.directory)!r} has {len(tokens)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; use more text, a smaller model.block_size "
                f"(at most {max(1, len(tokens) - 1)}), or a different val_fraction")


# -- automatic preparation for training -------------------------------------------------------

def _config_sources(data: DataConfig) -> tuple[list[Source], str]:
    """The sources of a data config and a short name for the cache directory."""
    if data.dataset:
        return dataset_sources(data.dataset, data.cache_dir), data.dataset
    if not data.path:
        raise UserError("no training data: set data.path to a text file (or a prepared directory), "
                        "or data.dataset to shakespeare or pystdlib")
    sources = expand_input(data.path, data.text_field)
    for src in sources:
        if src.size == 0:
            raise UserError(f"input file {src.name!r} is empty; put text in it or set data.path to another file")
    stem = Path(data.path).stem if not any(c in data.path for c in "*?[") else "glob"
    return sources, "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "data"


def cache_key(digests: list[str], tokenizer_settings: dict[str, Any], val_fraction: float) -> str:
    """What decides the token files: source contents, tokenizer settings, split, format."""
    blob = json.dumps({"sources": digests, "tokenizer": tokenizer_settings, "val_fraction": val_fraction,
                       "separator": SEPARATOR, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_dataset(data: DataConfig, *, tokenizer: Optional[Tokenizer] = None, progress: bool = True,
                    dist: Any = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PreparedData:
    """The training data of ``data``, prepared into ``data.cache_dir`` on first use and reused after.

    ``data.dataset`` (a name) wins over ``data.path``; a ``data.path`` that is a prepared
    directory (has ``meta.json``) is used as it is. The cache directory is
    ``cache_dir/<name>-<tokenizer>-<key>`` where the key hashes the source contents, the tokenizer
    settings and ``val_fraction``: edit the text and it is prepared again. ``tokenizer`` (e.g. a
    checkpoint's, when fine-tuning or resuming) is used instead of building one.
    ``dist`` (anything with ``enabled``/``is_main``) makes rank 0 prepare while the others wait.
    """
    if dist is not None and getattr(dist, "enabled", False):
        import torch.distributed  # only here: preparing data alone never needs torch

        failed = False
        if dist.is_main:
            try:
                result = _prepare_dataset(data, tokenizer, progress, chunk_size)
            except BaseException:
                failed = True
                raise
            finally:
                # The other ranks learn whether rank 0 succeeded here, instead of waiting at a
                # barrier until the process-group timeout.
                torch.distributed.broadcast_object_list([failed], src=0)
        else:
            status = [False]
            torch.distributed.broadcast_object_list(status, src=0)  # works on gloo and NCCL
            if status[0]:
                raise UserError("rank 0 failed to prepare the data (its error is printed above)")
            result = _prepare_dataset(data, tokenizer, False, chunk_size)  # now a cache hit
        return result
    return _prepare_dataset(data, tokenizer, progress, chunk_size)


def check_data_settings(data: DataConfig) -> None:
    """What can be refused about ``data`` before any text is read (a run calls this first)."""
    check_kind(data.tokenizer)
    if data.tokenizer == "bpe":
        check_bpe_vocab_size(data.bpe_vocab_size)


def _prepare_dataset(data: DataConfig, tokenizer: Optional[Tokenizer], progress: bool,
                     chunk_size: int) -> PreparedData:
    if not data.dataset and data.path and is_prepared_dir(data.path):
        prepared = load_prepared(data.path)
        if tokenizer is not None and prepared.tokenizer.to_json() != tokenizer.to_json():
            raise UserError(f"{data.path!r} was tokenized with a different tokenizer than the checkpoint's; "
                            "set data.path to the text itself so it is encoded with the checkpoint's tokenizer")
        return prepared
    sources, name = _config_sources(data)
    cache = make_dirs(data.cache_dir)
    digests = [cached_sha256(s.path, cache / "hashes.json") for s in sources]
    if tokenizer is not None:
        settings: dict[str, Any] = {"kind": tokenizer.kind, "tokenizer": tokenizer.to_json()}
    else:
        settings = {"kind": check_kind(data.tokenizer)}
        if data.tokenizer == "bpe":
            settings["bpe_vocab_size"] = data.bpe_vocab_size
            settings["bpe_train_bytes"] = data.bpe_train_bytes
    if any(s.has_documents for s in sources):  # the field read decides the text (text files alone: no key change)
        settings["text_field"] = data.text_field
    key = cache_key(digests, settings, data.val_fraction)
    kind = settings["kind"]
    final = cache / f"{name}-{kind}-{key[:16]}"
    if is_prepared_dir(final):
        return load_prepared(final)
    if final.exists():  # not a prepared entry (atomic_directory never leaves one half-written): ours to replace
        shutil.rmtree(final)
    # The cache entry appears complete or not at all; a concurrent writer that finished first
    # wrote the same files (the key names their inputs), so its entry is kept.
    with atomic_directory(final, if_exists="keep") as tmp:
        write_prepared(sources, tmp, tokenizer=tokenizer if tokenizer is not None else kind,
                       vocab_size=data.bpe_vocab_size, train_bytes=data.bpe_train_bytes,
                       val_fraction=data.val_fraction, chunk_size=chunk_size, progress=progress,
                       extra_meta={"cache_key": key})
    return load_prepared(final)


def prepare_inputs(inputs: list[str], out_dir: str | os.PathLike, text_field: str = "text",
                   **kwargs: Any) -> PreparedData:
    """Input paths (files, directories, globs, or ``-`` for standard input) prepared into ``out_dir``;
    ``text_field`` names the field holding the text in JSON Lines and Parquet files."""
    with open_inputs(inputs, text_field) as sources:
        return write_prepared(sources, out_dir, **kwargs)
