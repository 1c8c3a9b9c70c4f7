"""Where text comes from, and how it is streamed: input files, standard input, named datasets.

A corpus is an ordered list of :class:`Source` files, read as one stream of bytes with
``"\\n\\n"`` between files (a blank line, so one file's last paragraph never runs into the next
file's first). Everything here streams in blocks, so a corpus larger than memory is fine.

A JSON Lines or Parquet file (see :mod:`.documents`) is a list of documents rather than one
text. Its documents, and its boundaries with neighbouring files, are separated by the
``document_break`` the caller gives: :data:`DOCUMENT_BREAK` (a marker for the end-of-text
token) or text such as ``"\\n\\n"``.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import SettingError, UserError
from .documents import document_format, iter_documents

SEPARATOR = "\n\n"
DEFAULT_CHUNK_SIZE = 1 << 20  # bytes read at a time, and the target size of an encoded piece
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One input file. ``name`` is what the user sees and what ``meta.json`` records."""

    path: Path
    name: str
    text_field: str = "text"  # which field of a JSON Lines or Parquet record holds the text

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def has_documents(self) -> bool:
        """A JSON Lines or Parquet file (a list of documents), not a text file."""
        return document_format(self.path) is not None


class _DocumentBreak:
    def __repr__(self) -> str:
        return "DOCUMENT_BREAK"


# In a text stream, the place between two documents where the end-of-text token goes (text
# cannot carry it: the tokenizers encode "<|endoftext|>" in text as ordinary characters).
DOCUMENT_BREAK: Any = _DocumentBreak()


# -- resolving inputs ------------------------------------------------------------------------

# Where an input is missing or unreadable, the fixes the command line spells with its flags.
OWN_TEXT = {"input": "FILE"}
BUILT_IN_DATASET = {"dataset": "NAME"}


def expand_input(spec: str, text_field: str = "text") -> list[Source]:
    """One input: a file, a directory (its ``*.txt`` files, recursively) or a glob.

    ``text_field`` is the field holding the text in JSON Lines and Parquet files.
    """
    return [Source(src.path, src.name, text_field) for src in _expand_input(spec)]


def _expand_input(spec: str) -> list[Source]:
    if any(c in spec for c in GLOB_CHARS) and not Path(spec).exists():
        paths = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise UserError(f"no files match {spec!r}; check the pattern (quote it so the shell "
                            "doesn't expand it), e.g. 'data/**/*.txt'")
        return [Source(Path(p), p) for p in paths]
    path = Path(spec)
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*.txt") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not paths:
            raise UserError(f"directory {spec!r} has no .txt files; put text files in it or give a "
                            "glob for other extensions, e.g. 'dir/**/*.md'")
        return [Source(p, str(p)) for p in paths]
    if not path.exists():
        raise SettingError(f"input file {spec!r} not found; check the path, give a directory or a glob like "
                           f"'data/*.txt', or use a built-in dataset: {' or '.join(DATASETS)}",
                           fixes=[BUILT_IN_DATASET])
    if not path.is_file():
        raise UserError(f"input {spec!r} is not a regular file; pass a text file, a directory or a glob")
    return [Source(path, spec)]


def check_not_empty(sources: list[Source]) -> None:
    for src in sources:
        if src.size == 0:
            raise UserError(f"input file {src.name!r} is empty; put text in it or leave it out of the input")


@contextlib.contextmanager
def open_inputs(specs: Iterable[str], text_field: str = "text") -> Iterator[list[Source]]:
    """Resolve inputs (see :func:`expand_input`) to sources; ``-`` (stdin) is spooled to a temporary file.

    Standard input is read once to disk because the char and BPE tokenizers need two passes.
    """
    tmp_paths: list[str] = []
    try:
        sources: list[Source] = []
        for spec in specs:
            if spec == "-":
                fd, tmp = tempfile.mkstemp(prefix="mini-transformer-stdin-", suffix=".txt")
                tmp_paths.append(tmp)
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(sys.stdin.buffer, f, DEFAULT_CHUNK_SIZE)
                sources.append(Source(Path(tmp), "<stdin>"))
            else:
                sources.extend(expand_input(spec, text_field))
        if not sources:
            raise SettingError("no input given; give text files (or a directory, a glob, or - for standard "
                               f"input), or use a built-in dataset: {' or '.join(DATASETS)}",
                               fixes=[OWN_TEXT, BUILT_IN_DATASET])
        check_not_empty(sources)
        yield sources
    finally:
        for tmp in tmp_paths:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# -- reading ---------------------------------------------------------------------------------

ProgressFn = Optional[Callable[[int], None]]


def iter_file_blocks(src: Source, chunk_size: int, on_bytes: ProgressFn = None,
                     hasher: Optional["hashlib._Hash"] = None) -> Iterator[bytes]:
    """The bytes of one file in blocks of ``chunk_size``; optionally hashed and counted."""
    with open(src.path, "rb") as f:
        while block := f.read(chunk_size):
            if hasher is not None:
                hasher.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
            yield block


def iter_corpus_bytes(sources: list[Source], chunk_size: int, on_bytes: ProgressFn = None,
                      hashers: Optional[list] = None, document_break: Any = DOCUMENT_BREAK) -> Iterator[Any]:
    """All sources as one byte stream, with the separator between files (``document_break``
    around and between documents: see :func:`iter_corpus_text`)."""
    for k, src in enumerate(sources):
        if k:
            yield _separator(sources, k, document_break.encode() if isinstance(document_break, str)
                             else document_break, SEPARATOR.encode())
        hasher = hashers[k] if hashers else None
        if src.has_documents:
            for text in _joined_documents(src, document_break, on_bytes, hasher):
                yield text.encode() if isinstance(text, str) else text
        else:
            yield from iter_file_blocks(src, chunk_size, on_bytes, hasher)


def _separator(sources: list[Source], k: int, document_break: Any, separator: Any) -> Any:
    """What goes between ``sources[k - 1]`` and ``sources[k]``: a file of documents ends and
    starts documents, so the document break; between two text files, the blank line."""
    return document_break if sources[k - 1].has_documents or sources[k].has_documents else separator


def _joined_documents(src: Source, document_break: Any, on_bytes: ProgressFn, hasher) -> Iterator[Any]:
    for j, text in enumerate(iter_documents(src, on_bytes, hasher)):
        if j:
            yield document_break
        yield text


def _complete_utf8_len(data: bytes) -> int:
    """Length of ``data`` without a trailing *incomplete* multi-byte UTF-8 sequence (0-3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: complete
        if byte >= 0xC0:  # a lead byte: how long should its sequence be?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # only continuation bytes: let the decoder report the error


def decode_utf8_blocks(blocks: Iterable[bytes], name: str) -> Iterator[str]:
    """Decode a file's blocks as UTF-8; a multi-byte character split across blocks is carried over.

    Invalid UTF-8 raises UserError with the byte offset in the file.
    """
    pending = b""
    offset = 0  # file offset of pending[0]
    for block in blocks:
        data = pending + block
        cut = _complete_utf8_len(data)
        yield _strict_decode(data[:cut], name, offset)
        offset += cut
        pending = data[cut:]
    if pending:
        yield _strict_decode(pending, name, offset)


def _strict_decode(data: bytes, name: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingError(
            f"input file {name!r} is not valid UTF-8 at byte offset {offset + exc.start}; convert it to "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8), or use the byte tokenizer, which takes any bytes",
            fixes=[{"tokenizer": "byte"}]) from None


def iter_corpus_text(sources: list[Source], chunk_size: int, on_bytes: ProgressFn = None,
                     hashers: Optional[list] = None, document_break: Any = SEPARATOR) -> Iterator[Any]:
    """All sources as one stream of text blocks, with the separator between files.

    The documents of a JSON Lines or Parquet file come one by one with ``document_break``
    between them, and in place of the separator where such a file meets its neighbours: text
    (e.g. the separator itself) or :data:`DOCUMENT_BREAK`, which is then an item of the stream.
    """
    for k, src in enumerate(sources):
        if k:
            yield _separator(sources, k, document_break, SEPARATOR)
        hasher = hashers[k] if hashers else None
        if src.has_documents:
            yield from _joined_documents(src, document_break, on_bytes, hasher)
        else:
            yield from decode_utf8_blocks(iter_file_blocks(src, chunk_size, on_bytes, hasher), src.name)


# -- cutting text into pieces that encode independently ------------------------------------

def bpe_safe_cut(buf: str) -> int:
    """The last position where the GPT-2 pre-tokenizer is guaranteed to split, or 0 if none.

    Cut just before a whitespace character that follows a non-whitespace one. In the GPT-2
    regex (``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``) only the
    ``\\s+`` alternatives contain whitespace other than a *leading* space, and a whitespace run
    starts exactly here, so no pre-token crosses the cut and the regex has no look-behind: both
    sides pre-tokenize exactly as they do in the whole text. (A cut *inside* a whitespace run
    would change ``\\s+(?!\\S)``.) Newlines are preferred, then spaces.
    """
    for sep in ("\n", " "):
        i = buf.rfind(sep)
        while i > 0:
            if not buf[i - 1].isspace():  # str.isspace covers Unicode White_Space (regex \\s)
                return i
            i = buf.rfind(sep, 0, i)
    return 0


def any_cut(buf: str) -> int:
    """Character-level tokenizers can cut anywhere."""
    return len(buf)


def iter_pieces(texts: Iterable[Any], piece_size: int, safe_cut: Callable[[str], int] = any_cut) -> Iterator[Any]:
    """Re-cut a text stream into pieces of about ``piece_size`` characters at safe positions.

    A stretch with no safe position (one enormous word) grows until one appears. A
    :data:`DOCUMENT_BREAK` in the stream ends the piece before it and is passed on.
    """
    parts: list[str] = []
    size = 0
    for text in texts:
        if text is DOCUMENT_BREAK:
            if tail := "".join(parts):
                yield tail
            yield text
            parts, size = [], 0
            continue
        parts.append(text)
        size += len(text)
        if size < piece_size:
            continue
        buf = "".join(parts)
        start = 0
        while len(buf) - start >= piece_size:
            # safe_cut only looks at neighbouring characters, so a cut found in a window is
            # a cut of the whole text.
            cut = safe_cut(buf[start:start + piece_size]) or safe_cut(buf[start:])
            if cut == 0:
                break
            yield buf[start:start + cut]
            start += cut
        parts = [buf[start:]]
        size = len(parts[0])
    tail = "".join(parts)
    if tail:
        yield tail


# -- hashing ---------------------------------------------------------------------------------

def sha256_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path, cache_file: Path) -> str:
    """sha256 of a file, remembered by (size, mtime) in ``cache_file`` so reruns skip re-reading."""
    st = path.stat()
    key = str(path.resolve())
    try:
        table = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path)
    table[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):
        atomic_write_text(cache_file, json.dumps(table, indent=1))
    return digest


# -- named datasets --------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 10.0
PYSTDLIB_MAX_BYTES = 4 * 1024 * 1024  # enough for a real corpus, small enough for a quick demo
PYSTDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
DATASETS = ("shakespeare", "pystdlib")


def dataset_sources(name: str, cache_dir: str | os.PathLike) -> list[Source]:
    """The files of a named corpus (``shakespeare`` is downloaded once into ``cache_dir``)."""
    if name == "shakespeare":
        return [shakespeare_source(Path(cache_dir) / "datasets")]
    if name == "pystdlib":
        return pystdlib_sources()
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SettingError(f"unknown dataset {name!r}; {hint}choose one of: {', '.join(DATASETS)}, "
                       "or give your own text", fixes=[OWN_TEXT])


def shakespeare_source(directory: Path) -> Source:
    """Tiny Shakespeare (1.1 MB), downloaded on first use, checked against its sha256."""
    path = directory / "tinyshakespeare.txt"
    if not (path.is_file() and sha256_file(path) == SHAKESPEARE_SHA256):
        data = _download(SHAKESPEARE_URL, "Tiny Shakespeare")
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise SettingError(f"the downloaded Tiny Shakespeare has sha256 {digest[:12]}..., expected "
                               f"{SHAKESPEARE_SHA256[:12]}...; retry, or give a trusted copy of the text",
                               fixes=[OWN_TEXT])
        atomic_write_bytes(path, data)
    return Source(path, "shakespeare:input.txt")


def _download(url: str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SettingError(f"could not download {what} from {url} ({reason}); if you are offline, "
                           "give a local copy of the text instead", fixes=[{"input": "path/to/input.txt"}]) from None


def pystdlib_sources(max_bytes: int = PYSTDLIB_MAX_BYTES) -> list[Source]:
    """This Python's own standard-library ``.py`` files: a real corpus that needs no network.

    Sorted by path (deterministic for a given Python version), test suites and site-packages
    skipped, files that are not UTF-8 skipped, and at most ``max_bytes`` in all.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: list[Source] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in PYSTDLIB_SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        sources.append(Source(path, f"pystdlib:{rel.as_posix()}"))
        total += size
    if not sources:
        raise SettingError(f"no standard-library sources found under {root}; give your own text instead",
                           fixes=[OWN_TEXT])
    return sources
