"""Our tokenizers as Hugging Face ``tokenizers``/``transformers`` files, and back.

Export: :func:`save_hf_tokenizer` writes ``tokenizer.json`` (the ``tokenizers`` format),
``tokenizer_config.json`` and ``special_tokens_map.json`` so that
``transformers.AutoTokenizer.from_pretrained(directory)`` gives the same ids as ours.

Import: :func:`load_hf_tokenizer` reads an HF directory's ``tokenizer.json`` into a tokenizer of
ours (kind ``hf``), saved with our checkpoints like any other kind.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ...tokenizer import Tokenizer


def build_hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly like ``tokenizer``."""
    raise NotImplementedError


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike,
                      model_max_length: Optional[int] = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    raise NotImplementedError


def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (its ``tokenizer.json``) as a tokenizer of ours."""
    raise NotImplementedError
