"""Export a checkpoint as one GGUF file, written with the ``gguf`` package (llama.cpp's own writer).

The file holds the architecture's metadata (:mod:`.layout`), the embedded tokenizer
(:mod:`.vocab`) and the weights in the chosen type:

==========  ============================================================================================
outtype     tensors
==========  ============================================================================================
``f32``     every tensor float32 (what the llama.cpp checks compare against ours)
``f16``     matrices float16; norms and biases float32 (as llama.cpp's own converter does)
``q8_0``    matrices Q8_0 (blocks of 32 weights, one float16 scale each: 8.5 bits a weight) through
            ``gguf.quants``; a matrix whose rows are not a multiple of 32 long stays float16
==========  ============================================================================================

LoRA adapters are merged first; a quantized checkpoint needs ``dequantize`` (its int8/int4
weights are written as the float32 ones they stand for, then converted). The file is written to
a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...atomic import atomic_write_named
from ...checkpoint import load_tokenizer_from, read_config, resolve_checkpoint
from ...errors import UserError
from ...lora import lora_settings, merge_lora
from ...weights import weights_state_dict
from ..hf.export import exported_context, load_export_model
from . import OUTTYPES
from .layout import architecture_metadata, check_gguf_exportable, gguf_architecture, gguf_state_dict
from .vocab import PRE, SUPPRESS_TOKENS_KEY, TOKENIZER_MODEL, GGUFVocab, gguf_vocab

Q8_0_BLOCK = 32  # weights per Q8_0 block: a row's length must be a multiple of it


@dataclass
class GGUFExportResult:
    """What was written, and what the caller should tell the user."""

    path: Path
    architecture: str
    outtype: str
    notices: list[str] = field(default_factory=list)


def import_gguf():
    """The ``gguf`` package, or a one-line UserError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the 'gguf' package; install it with pip install "
                        "'mini-transformer[gguf]' (or pip install gguf)") from None
    return gguf


def export_gguf(checkpoint_dir: str | os.PathLike, out_file: str | os.PathLike, *, outtype: str = "f32",
                dequantize: bool = False, adapter: Optional[str | os.PathLike] = None) -> GGUFExportResult:
    """Write ``checkpoint_dir`` (a checkpoint or a run's ``out_dir``) as the GGUF file ``out_file``.

    Mistakes (an architecture llama.cpp does not hold, a tokenizer without a GGUF form, a
    quantized checkpoint without ``dequantize``, a directory as ``out_file``) raise a one-line
    :class:`UserError` before anything is written.
    """
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    gguf = import_gguf()
    directory = resolve_checkpoint(checkpoint_dir, prefer="best")
    config = read_config(directory)
    check_gguf_exportable(config.model)
    out = Path(out_file)
    if out.is_dir():
        raise UserError(f"{out} is a directory; name the .gguf file to write, e.g. {out / 'model.gguf'}")
    vocab = gguf_vocab(load_tokenizer_from(directory))

    model, notices = load_export_model(directory, config, adapter=adapter, dequantize=dequantize,
                                       target="GGUF's f32/f16/q8_0 tensors")
    settings = lora_settings(model)
    if settings is not None:
        merge_lora(model)
        notices.append(f"LoRA adapter (rank {settings.rank}) merged into the weights")
    tensors = gguf_state_dict(weights_state_dict(model), config.model, extra_token_rows=vocab.added_tokens)
    del model

    architecture = gguf_architecture(config.model)
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_name(Path(checkpoint_dir).resolve().name)
    metadata = architecture_metadata(config.model, exported_context(config.model, directory))
    metadata["vocab_size"] = len(vocab.tokens)  # with any token the vocabulary adds
    _add_metadata(writer, architecture, metadata)
    _add_vocab(writer, vocab)
    writer.add_file_type(_FILE_TYPES[outtype](gguf))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kept_f16 = []
    for name, tensor in tensors.items():
        data, raw_dtype = _converted(gguf, tensor.numpy(), outtype)
        if outtype == "q8_0" and tensor.dim() > 1 and raw_dtype is None:
            kept_f16.append(name)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    if kept_f16:
        notices.append(f"{len(kept_f16)} matrices ({kept_f16[0]}, ...) have rows not a multiple of {Q8_0_BLOCK} "
                       "long and were written as f16")

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_named(out, write)
    return GGUFExportResult(out, architecture, outtype, notices)


_FILE_TYPES = {
    "f32": lambda gguf: gguf.LlamaFileType.ALL_F32,
    "f16": lambda gguf: gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def _converted(gguf, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """``data`` (float32) in ``outtype``, and the raw GGML type to declare for a quantized array.

    Vectors (norms, biases) stay float32 in every type: llama.cpp adds and multiplies them in f32.
    """
    if data.ndim < 2 or outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None


def _add_metadata(writer, architecture: str, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        full = f"{architecture}.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    # Our GPT-2 convention: the end-of-text token is also the beginning; none is added to a prompt.
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.suppress:
        writer.add_array(SUPPRESS_TOKENS_KEY, vocab.suppress)
