"""mini-transformer: small decoder-only language models, trained, fine-tuned, quantized, sampled.

The public names below load on first use (PEP 562): ``import mini_transformer`` and the command
line's ``--help`` stay fast because PyTorch is imported only when a name that needs it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "AdvancedConfig": "config", "Config": "config", "DataConfig": "config", "GenerationConfig": "config",
    "ModelConfig": "config", "TrainingConfig": "config", "load_config": "config",
    "PreparedData": "data", "load_prepared": "data", "prepare_dataset": "data",
    "UserError": "errors",
    "generate": "generation", "generate_batch": "generation", "generate_stream": "generation",
    "speculative_generate": "generation", "stream_text": "generation",
    "KVCache": "model", "Transformer": "model", "TransformerOutput": "model",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = [
    "AdvancedConfig", "Config", "DataConfig", "GenerationConfig", "KVCache", "ModelConfig", "PreparedData",
    "Tokenizer", "TrainingConfig", "Transformer", "TransformerOutput", "UserError", "generate",
    "generate_batch", "generate_stream", "load_config", "load_prepared", "load_tokenizer", "prepare_dataset",
    "speculative_generate", "stream_text",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: mt.generation
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .config import (
        AdvancedConfig, Config, DataConfig, GenerationConfig, ModelConfig, TrainingConfig, load_config,
    )
    from .data import PreparedData, load_prepared, prepare_dataset
    from .errors import UserError
    from .generation import generate, generate_batch, generate_stream, speculative_generate, stream_text
    from .model import KVCache, Transformer, TransformerOutput
    from .tokenizer import Tokenizer, load_tokenizer
