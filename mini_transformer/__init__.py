"""mini-transformer: small decoder-only language models, trained, fine-tuned, quantized, sampled."""

from .config import (
    AdvancedConfig, Config, DataConfig, GenerationConfig, ModelConfig, TrainingConfig, load_config,
)
from .data import PreparedData, load_prepared, prepare_dataset
from .errors import UserError
from .generation import generate, generate_batch, generate_stream, speculative_generate, stream_text
from .model import KVCache, Transformer, TransformerOutput
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AdvancedConfig", "Config", "DataConfig", "GenerationConfig", "KVCache", "ModelConfig", "PreparedData",
    "Tokenizer", "TrainingConfig", "Transformer", "TransformerOutput", "UserError", "generate",
    "generate_batch", "generate_stream", "load_config", "load_prepared", "load_tokenizer", "prepare_dataset",
    "speculative_generate", "stream_text",
]
