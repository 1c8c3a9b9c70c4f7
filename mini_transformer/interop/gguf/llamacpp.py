"""Running a GGUF export in llama.cpp through ``llama-cpp-python`` (the ``llamacpp`` extra).

What the checks and the benchmark need: the logits of a prompt, greedy generation in llama.cpp's
own token loop (its sampler, its end-of-generation test), and the loss over fixed windows (a
perplexity measured as ours is). ``llama-cpp-python`` builds llama.cpp from source on install
(minutes), which is why it is an extra of its own and not in ``dev``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import UserError

INSTALL_HINT = "pip install 'mini-transformer[llamacpp]' (or make llamacpp); it builds llama.cpp, which takes minutes"


def import_llama_cpp():
    """The ``llama_cpp`` package, or a one-line UserError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"running GGUF files needs llama-cpp-python; install it with {INSTALL_HINT}") from None
    return llama_cpp


def load_llama(path: str | os.PathLike, *, n_ctx: int, threads: Optional[int] = None,
               logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` for the file, on the CPU, quiet, its KV-cache in float32 as ours is
    (llama.cpp's default, float16, moves logits by about 1e-3). ``logits_all`` keeps the logits
    of every position (needed by :func:`prompt_logits` and :func:`window_loss`)."""
    llama_cpp = import_llama_cpp()
    threads = threads or os.cpu_count() or 1
    with _quiet():
        return llama_cpp.Llama(model_path=str(Path(path)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                               logits_all=logits_all, verbose=False)


def prompt_logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), n_vocab) for ``ids`` from an empty context (needs ``logits_all``)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def detokenize(llm: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` by llama.cpp's own ``llama_detokenize`` (what its server and tools decode
    with; ``Llama.detokenize`` joins token pieces in Python instead)."""
    import ctypes

    llama_cpp = import_llama_cpp()
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64 + 8 * len(ids)
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buffer, size, False, False)
        if n >= 0:
            return buffer.raw[:n].decode("utf-8", errors="replace")
        size = -n  # too small: llama.cpp says how much it needs


def greedy(llm: Any, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding in llama.cpp's loop: its greedy sampler, stopping at a token its vocabulary
    marks as end of generation (as ``create_completion`` does), that token left out."""
    llama_cpp = import_llama_cpp()
    vocab = llm._model.vocab  # the loaded llama_vocab; llama-cpp-python has no public accessor
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    llm.reset()  # an empty KV-cache: llama-cpp-python would otherwise reuse a cached prompt prefix
    for token in llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        out.append(int(token))
        if len(out) == max_new_tokens:
            break
    return out


def window_loss(llm: Any, tokens: np.ndarray, block_size: int, vocab_size: Optional[int] = None) -> float:
    """Mean cross-entropy over ``tokens`` cut into windows of ``block_size`` (each from an empty
    context, every position predicting the next token): the windows ours evaluates on.

    ``vocab_size``: score over the first ``vocab_size`` logits only, leaving out tokens the file
    adds after our vocabulary (a char vocabulary's end-of-text), so that the distribution is ours.
    """
    total, count = 0.0, 0
    step = block_size
    for start in range(0, len(tokens) - 1, step):
        window = tokens[start:start + block_size + 1]
        if len(window) < 2:
            break
        x, y = window[:-1], window[1:]
        logits = prompt_logits(llm, x.tolist())[:, :vocab_size].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((log_z - logits[np.arange(len(y)), y]).sum())
        count += len(y)
    return total / count


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence llama.cpp's C-level log lines on stderr while loading (``verbose=False`` leaves some)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
