"""Export a checkpoint as a Hugging Face directory that ``transformers`` loads without custom code.

What is written (one directory, renamed into place complete or not at all)::

    out/
      config.json               LlamaForCausalLM (rmsnorm) or StableLmForCausalLM (layernorm)
      model.safetensors         weights under HF's names (fused qkv and gate_up split)
      generation_config.json    token ids and this checkpoint's sampling defaults
      tokenizer.json            the tokenizer for PreTrainedTokenizerFast, with
      tokenizer_config.json     its special tokens and model_max_length = max_position_embeddings
      adapter/                  only with adapter_format="peft": a PEFT LoRA adapter
        adapter_config.json
        adapter_model.safetensors

LoRA. A model with adapters (a LoRA run's checkpoint, or a base plus an adapter directory) is
exported merged by default. As a PEFT adapter, each of our fused layers becomes several PEFT
layers, exactly: our update on ``attn.qkv`` is ``B @ A * alpha / r`` with B of (q+k+v rows, r),
so ``q_proj`` gets the same A and B's q rows, and so on; ``gate_up`` likewise.

Context. ``max_position_embeddings`` is ``block_size``, or, for a model imported from Hugging
Face (``checkpoint.json`` records its ``max_position_embeddings``), the larger of the two: a
fine-tuning run trains on shorter windows, but RoPE depends on the position only, so the model
is still the same function over the original context. The tokenizer's ``model_max_length`` (the
longest input transformers lets through with ``truncation=True``) is that same length.

Quantized checkpoints hold no full-precision weights; exporting one needs ``dequantize=True``,
which writes the float32 weights the quantized ones stand for (the quantization error stays).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from ...atomic import atomic_directory, atomic_write_text
from ...checkpoint import (load_model, load_tokenizer_from, paths_overlap, read_config, read_provenance,
                           resolve_checkpoint)
from ...config import Config, ModelConfig
from ...errors import SettingError, UserError
from ...lora import TARGET_LAYERS, LoRASettings, load_adapter, lora_settings, lora_state_dict, merge_lora
from ...model import Transformer
from ...quantize import QuantizedEmbedding, QuantizedLinear, load_quantized, read_quantization_meta
from ...safetensors_io import write_safetensors
from ...weights import assign_weights, tied_names, weights_state_dict
from . import ADAPTER_FORMATS
from .layout import (BLOCK_KEYS, GENERATION_CONFIG_FILE, HF_CONFIG_FILE, HF_WEIGHTS_FILE, TOP_LEVEL_KEYS,
                     check_exportable, hf_architecture, hf_config, hf_module_names, row_splits, to_hf_state_dict)
from .tokenizer import save_hf_tokenizer

AdapterFormat = Literal["merged", "peft"]  # for type checkers; ADAPTER_FORMATS at run time
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_ADAPTER_DIR = "adapter"
# Written into every export: a later export replaces only a directory that carries it.
EXPORT_MARK = ".mini-transformer-export.json"
# PEFT's saved names: the PeftModel wraps the CausalLM (``base_model.model``), whose decoder is ``model``.
PEFT_PREFIX = "base_model.model.model.layers"


@dataclass
class ExportResult:
    """Where the export went and what the caller should tell the user."""

    out_dir: Path
    architecture: str
    adapter_dir: Optional[Path] = None
    notices: list[str] = field(default_factory=list)


def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              adapter_format: AdapterFormat = "merged", dequantize: bool = False,
              adapter: Optional[str | os.PathLike] = None,
              adapter_out: Optional[str | os.PathLike] = None) -> ExportResult:
    """Write ``checkpoint_dir`` (a checkpoint or a run's ``out_dir``) as an HF directory ``out_dir``.

    ``adapter``: a LoRA adapter directory (from ``finetune``) to apply to the checkpoint first.
    ``adapter_format``: ``"merged"`` folds LoRA adapters into the weights; ``"peft"`` writes the
    base weights and the adapter as a PEFT adapter in ``adapter_out`` (default ``out_dir/adapter``).
    ``dequantize``: export a quantized checkpoint as the float32 weights it stands for.
    Mistakes (an architecture no HF class holds exactly, a quantized checkpoint without
    ``dequantize``, ``"peft"`` without adapters, an ``out_dir`` that is not an export) raise
    :class:`UserError` before anything is written; a failed export leaves nothing behind.
    """
    if adapter_format not in ADAPTER_FORMATS:
        raise UserError(f"unknown adapter format {adapter_format!r}; use {' or '.join(ADAPTER_FORMATS)}")
    if adapter_out is not None and adapter_format != "peft":
        raise SettingError("adapter_out is only used when the adapter is written in PEFT format; leave it unset, "
                           "or write the adapter in PEFT format", setting="adapter_out",
                           fixes=[{"adapter_format": "peft"}])
    directory = resolve_checkpoint(checkpoint_dir, prefer="best")
    config = read_config(directory)
    check_exportable(config.model)
    out = Path(out_dir)
    _check_target(out, directory, "the export")
    adapter_path = Path(adapter_out) if adapter_out is not None else out / DEFAULT_ADAPTER_DIR
    separate_adapter = adapter_format == "peft" and not adapter_path.resolve().is_relative_to(out.resolve())
    if adapter_format == "peft" and adapter_path.resolve() == out.resolve():
        raise UserError("the adapter needs a directory of its own, not the export's; leave the adapter "
                        f"directory unset for {out / DEFAULT_ADAPTER_DIR}")
    if separate_adapter:
        _check_target(adapter_path, directory, "the adapter")

    model, notices = load_export_model(directory, config, adapter=adapter, dequantize=dequantize)
    settings = lora_settings(model)
    if adapter_format == "peft" and settings is None:
        raise UserError(f"{directory} has no LoRA adapter to write in PEFT format; export it merged, "
                        "or name the adapter directory that finetune wrote")
    peft_state: dict[str, torch.Tensor] = {}
    if settings is not None and adapter_format == "peft":
        peft_state = peft_state_dict(lora_state_dict(model), config.model)
        base_state = _base_without_lora(weights_state_dict(model))
    else:
        if settings is not None:
            merge_lora(model)
            notices.append(f"LoRA adapter (rank {settings.rank}) merged into the weights")
        base_state = weights_state_dict(model)
    hf_state = to_hf_state_dict(base_state, config.model)
    del model, base_state

    tokenizer = load_tokenizer_from(directory, config.model.vocab_size)
    dtype = _dtype_name(hf_state[TOP_LEVEL_KEYS["tok_emb.weight"]].dtype)
    context = exported_context(config.model, directory)
    # Only a tokenizer imported from Hugging Face has a pad token (pad_id); ours have none.
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": getattr(tokenizer, "pad_id", None)}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(out, if_exists="replace"))
        atomic_write_text(tmp / EXPORT_MARK, _json({"source": str(directory.resolve())}))
        atomic_write_text(tmp / HF_CONFIG_FILE, _json(hf_config(config.model, dtype=dtype,
                                                                max_position_embeddings=context, **ids)))
        write_safetensors(tmp / HF_WEIGHTS_FILE, hf_state, {"format": "pt"})
        atomic_write_text(tmp / GENERATION_CONFIG_FILE, _json(generation_config(config, **ids)))
        save_hf_tokenizer(tokenizer, tmp, model_max_length=context)
        if adapter_format == "peft":
            assert settings is not None
            adapter_tmp = (stack.enter_context(atomic_directory(adapter_path, if_exists="replace"))
                           if separate_adapter else tmp / adapter_path.resolve().relative_to(out.resolve()))
            adapter_tmp.mkdir(parents=True, exist_ok=True)
            if separate_adapter:
                atomic_write_text(adapter_tmp / EXPORT_MARK, _json({"source": str(directory.resolve())}))
            write_safetensors(adapter_tmp / PEFT_WEIGHTS_FILE, peft_state, {"format": "pt"})
            atomic_write_text(adapter_tmp / PEFT_CONFIG_FILE,
                              _json(peft_config(settings, base_model=str(out.resolve()))))
    return ExportResult(out, hf_architecture(config.model),
                        adapter_path if adapter_format == "peft" else None, notices)


def exported_context(config: ModelConfig, directory: Path) -> int:
    """``max_position_embeddings`` of the export: ``block_size``, or the longer context of the
    Hugging Face model that ``directory``'s weights were imported from (see the module's notes)."""
    source = read_provenance(directory).get("max_position_embeddings")
    if not isinstance(source, int) or isinstance(source, bool):
        return config.block_size
    return max(config.block_size, source)


# -- loading ---------------------------------------------------------------------------------------

def load_export_model(directory: Path, config: Config, *, adapter: Optional[str | os.PathLike],
                      dequantize: bool, target: str = "the Hugging Face classes") -> tuple[Transformer, list[str]]:
    """The checkpoint's model in full precision on the CPU (with its adapters), and notices.

    ``target``: what the export writes, named in the refusal of a quantized checkpoint (which
    needs ``dequantize``)."""
    notices: list[str] = []
    meta = read_quantization_meta(directory)
    if meta is None:
        model = load_model(directory, "cpu", config)
    else:
        detail = f"{meta.get('mode')}" + (f", group size {meta['group_size']}" if meta.get("group_size") else "")
        if not dequantize:
            raise SettingError(f"{directory} is quantized ({detail}) and {target} hold "
                               "full-precision weights; export the checkpoint it was quantized from, or "
                               "dequantize it to write float32 weights", fixes=[{"dequantize": ""}])
        model = dequantized_model(load_quantized(directory, config.model), config.model)
        notices.append(f"dequantized: the {detail} weights were written as float32 (the quantization error "
                       "remains; the full-precision checkpoint it came from exports without it)")
    if adapter is not None:
        load_adapter(adapter, model)
    return model, notices


def dequantized_model(quantized: torch.nn.Module, config: ModelConfig) -> Transformer:
    """A plain :class:`Transformer` whose weights are the dequantized (float32) ones of ``quantized``."""
    state: dict[str, torch.Tensor] = {}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
        elif isinstance(module, QuantizedEmbedding):
            state[f"{name}.weight"] = module.weight.float()
    with torch.device("meta"):
        model = Transformer(config)
    plain = set(model.state_dict()) - set(tied_names(model))  # the names a plain model saves
    for name, tensor in quantized.state_dict().items():
        if name in plain and name not in state:
            state[name] = tensor
    assign_weights(model, {name: tensor for name, tensor in state.items() if name in plain})
    return model


def _base_without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as a plain model's: adapters dropped, ``qkv.base.weight`` -> ``qkv.weight``."""
    return {name.replace(".base.", "."): tensor for name, tensor in state.items()
            if not name.endswith((".lora_A", ".lora_B"))}


# -- PEFT ------------------------------------------------------------------------------------------

def peft_state_dict(lora_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our adapters (``blocks.{i}.attn.qkv.lora_A`` ...) as PEFT's per-projection ones.

    A fused layer's A (r, in) goes to each of its HF projections unchanged; its B (out, r) is split
    by rows like the weight. Each copy is its own tensor (safetensors refuses shared memory).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state.items():
        module, _, which = key.rpartition(".")  # blocks.{i}.attn.qkv, lora_A
        _, index, our_module = module.split(".", 2)
        names = hf_module_names(our_module)
        if which == "lora_A":
            pieces = [tensor] * len(names)
        else:
            pieces = list(tensor.split(row_splits(f"{our_module}.weight", config))) if len(names) > 1 else [tensor]
        for name, piece in zip(names, pieces, strict=True):
            out[f"{PEFT_PREFIX}.{index}.{name}.{which}.weight"] = piece.detach().to("cpu").clone(
                memory_format=torch.contiguous_format)
    return out


def peft_target_modules(settings: LoRASettings) -> list[str]:
    """PEFT ``target_modules`` (HF projection names) for our LoRA targets."""
    # ffn.up (the relu2 MLP) has no HF layer: such models are refused before (check_exportable).
    modules = [name.rpartition(".")[2] for target in settings.targets for ours in TARGET_LAYERS[target]
               if f"{ours}.weight" in BLOCK_KEYS for name in hf_module_names(ours)]
    return sorted(set(modules))


def peft_config(settings: LoRASettings, base_model: Optional[str] = None) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter with ``settings`` (scaling alpha / r, as ours)."""
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.dropout,
        "target_modules": peft_target_modules(settings),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


# -- the other files -------------------------------------------------------------------------------

def generation_config(config: Config, *, bos_token_id: Optional[int], eos_token_id: Optional[int],
                      pad_token_id: Optional[int]) -> dict[str, Any]:
    """``generation_config.json``: the token ids and this checkpoint's sampling defaults.

    HF applies the repetition penalty, temperature, top-k, top-p and min-p in our order. Its own
    defaults (top-k 50 when sampling) would otherwise apply, so unset filters are written off.
    """
    g = config.generation
    out: dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
                           "max_new_tokens": g.max_tokens}
    if g.temperature == 0:
        out["do_sample"] = False
    else:
        out.update(do_sample=True, temperature=g.temperature, top_k=g.top_k or 0, top_p=g.top_p or 1.0)
        if g.min_p is not None:
            out["min_p"] = g.min_p
    if g.repetition_penalty != 1.0:
        out["repetition_penalty"] = g.repetition_penalty
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _check_target(target: Path, source: Path, what: str) -> None:
    """Refuse a target that overlaps the checkpoint, or a non-empty directory that is not an export."""
    if paths_overlap(target, source):
        raise UserError(f"{target} overlaps the checkpoint {source}; choose a directory for {what} outside it")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is a file; choose a new directory for {what}")
    # Only an earlier export (it carries EXPORT_MARK) is replaced: a directory that merely looks like
    # a Hugging Face model (a downloaded one, say) may hold files this export would delete.
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARK).is_file():
        raise UserError(f"{target} exists and was not written by export; choose a new directory for {what}, "
                        "or delete it first")
