"""Checkpoints that are never lost and never unpickle arbitrary objects.

A training run's ``out_dir`` looks like this::

    out/
      ckpt-00000500/          one directory per saved step, never overwritten
        model.safetensors     weights (the tied LM head is stored once, as the embedding)
        config.yaml           the resolved config
        tokenizer.json ...    the tokenizer, so generation needs no training data
        train_state.pt        optimizer, scheduler, RNG states, sampler, grad scaler
        checkpoint.json       step, best val loss, format version, config fingerprint
      latest.json             {"checkpoint": "ckpt-00000500", "step": 500}: the newest complete one
      best.json               the checkpoint with the best val loss, and that loss
      metrics.jsonl

A checkpoint is written to a temporary directory, every file fsynced, then renamed into place,
and only then do the pointer files move to it (each pointer is itself replaced atomically). A
``kill -9`` at any moment leaves ``latest.json`` naming a complete checkpoint. Loading reads
safetensors, YAML and JSON, and ``train_state.pt`` with ``torch.load(weights_only=True)``, which
refuses pickled objects other than tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Optional

import torch
import yaml

from .atomic import atomic_directory, atomic_write, atomic_write_text, recover_replaced
from .config import Config
from .decode_layout import to_decode_layout
from .errors import SettingError, UserError, WriteError, first_line
from .lora import apply_lora, load_adapter
from .model import Transformer
from .quantize import is_quantized, load_quantized, quantize_model, read_quantization_meta, save_quantized
from .safetensors_io import read_safetensors, write_safetensors
from .tokenizer import TOKENIZER_FILE, load_tokenizer
from .weights import assign_weights, missing_weights, model_fingerprint, weights_state_dict

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.pt"
META_FILE = "checkpoint.json"
LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"
CHECKPOINT_PREFIX = "ckpt-"


# -- weights ---------------------------------------------------------------------------------

def save_weights(path: Path, model: torch.nn.Module, metadata: Optional[dict[str, str]] = None) -> None:
    write_safetensors(path, weights_state_dict(model), metadata)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "checkpoint weights", "use another checkpoint or retrain")


def load_weights_into(model: Transformer, state: dict[str, torch.Tensor], source: Path, *,
                      assign: bool = False) -> None:
    """Load weights, allowing only tied aliases (the LM head) to be absent; shapes must match exactly.

    ``assign=True`` is for a model built on the meta device: it takes the tensors themselves
    (see :func:`~mini_transformer.weights.assign_weights`) instead of copying them in.
    """
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{source} has weight {name!r} that this model does not; the checkpoint belongs to "
                            "a different model: load it with its own config.yaml, or use another checkpoint")
        if expected[name].shape != tensor.shape:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(expected[name].shape)}; the checkpoint belongs to a different model shape: "
                            "load it with its own config.yaml, or use another checkpoint")
    missing = missing_weights(model, state)
    if missing:
        raise UserError(f"{source} lacks weights {', '.join(missing[:3])}; the checkpoint is incomplete: "
                        "use another checkpoint")
    if assign:
        assign_weights(model, state)
    else:
        model.load_state_dict(state, strict=False)


# -- saving ------------------------------------------------------------------------------------

def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: Transformer,
    config: Config,
    tokenizer: Any,
    train_state: Optional[dict[str, Any]] = None,
    *,
    best_val_loss: Optional[float] = None,
    is_best: bool = False,
    keep_last: int = 3,
    extra_meta: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically and move the pointers to it."""
    out = Path(out_dir)
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    final = out / name
    previous = _read_pointer(out / LATEST_POINTER)
    try:
        if not final.exists():  # a step's checkpoint, once complete, is never rewritten
            with atomic_directory(final, if_exists="keep") as tmp:
                _write_checkpoint_files(tmp, step, model, config, tokenizer, train_state, best_val_loss,
                                        extra_meta)
        _write_pointer(out / LATEST_POINTER, name, step)
        if is_best:
            _write_pointer(out / BEST_POINTER, name, step, best_val_loss)
    except WriteError as exc:
        raise _not_saved(final, exc, out / previous if previous and previous != name else None) from exc
    prune_checkpoints(out, keep_last)
    return final


def _not_saved(final: Path, exc: WriteError, previous: Optional[Path]) -> SettingError:
    """A checkpoint the machine refused to write, and what is left: the pointers still name the
    previous complete one (every file is written atomically)."""
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was saved"
    fix = ("free some space (or lower training.keep_last)" if exc.out_of_space
           else f"make {final.parent} writable (or choose another training.out_dir)")
    if previous is None:
        return SettingError(f"can't save checkpoint {final}: {exc.reason}; {kept}: {fix}, then run again")
    return SettingError(f"can't save checkpoint {final}: {exc.reason}; {kept}: {fix}, then resume the run",
                        fixes=[{"resume": ""}])


def _write_checkpoint_files(directory: Path, step: Optional[int], model: Transformer, config: Config,
                            tokenizer: Any, train_state: Optional[dict[str, Any]], best_val_loss: Optional[float],
                            extra_meta: Optional[dict[str, Any]]) -> None:
    # ``model`` may also be FSDP's gathered full state (anything with ``state_dict``).
    if isinstance(model, torch.nn.Module) and is_quantized(model):
        save_quantized(directory, model)  # compact weights + quantization.json
    else:
        save_weights(directory / WEIGHTS_FILE, model, metadata={"format": "mini-transformer"})
    config.save(directory / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(directory)
    if train_state is not None:
        atomic_torch_save(directory / STATE_FILE, train_state)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "best_val_loss": best_val_loss,
        "model_fingerprint": model_fingerprint(config.model),
        "has_train_state": train_state is not None,
    }
    meta.update(extra_meta or {})
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save ``obj`` (tensors and plain containers only) atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _write_pointer(path: Path, name: str, step: int, val_loss: Optional[float] = None) -> None:
    """``latest.json`` names the checkpoint and step; ``best.json`` adds its val loss."""
    pointer: dict[str, Any] = {"checkpoint": name, "step": step}
    if val_loss is not None:
        pointer["val_loss"] = val_loss
    atomic_write_text(path, json.dumps(pointer))


def remove_stale_pointer_temps(out_dir: str | os.PathLike) -> None:
    """Remove the temporary files of pointer writes that a kill interrupted
    (``.latest.json.*.tmp``, ``.best.json.*.tmp``). Only for the run holding the directory's
    lock (:mod:`mini_transformer.runlock`): another run's may be in flight otherwise."""
    for pointer in (LATEST_POINTER, BEST_POINTER):
        for tmp in Path(out_dir).glob(f".{pointer}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _read_pointer(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints plus the best one; drop stale temp dirs."""
    protected = {_read_pointer(out_dir / BEST_POINTER), _read_pointer(out_dir / LATEST_POINTER)}
    steps = sorted(p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for path in steps[:-keep_last] if keep_last > 0 else steps:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in out_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# -- finding and loading -------------------------------------------------------------------------

def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint directory from a path that is one, or a run's ``out_dir``.

    In an ``out_dir``, ``prefer="best"`` takes the best checkpoint, else the latest;
    ``prefer="latest"`` takes the latest (for resuming).
    """
    p = Path(path)
    if not p.exists():
        recover_replaced(p, stale_temporaries=False)  # a quantize or merge output a kill left renamed aside
    if (p / META_FILE).is_file() or (p / WEIGHTS_FILE).is_file():
        return p
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} not found; train a model first, or point to an existing "
                        "checkpoint directory")
    order = [BEST_POINTER, LATEST_POINTER] if prefer == "best" else [LATEST_POINTER]
    for pointer in order:
        name = _read_pointer(p / pointer)
        if name and (p / name / META_FILE).is_file():
            return p / name
    # The pointer may be missing (a crash before the first pointer write): take the newest complete one.
    complete = sorted(d for d in p.glob(f"{CHECKPOINT_PREFIX}*") if (d / META_FILE).is_file())
    if complete:
        return complete[-1]
    raise UserError(f"no checkpoint in {str(p)!r}; train first, or point to a run's out_dir or a ckpt-* directory")


def refuse_quantized_base(directory: Path) -> None:
    """Training starts from full-precision weights: a quantized checkpoint's int8/int4 layers
    neither train nor match the model's."""
    meta = read_quantization_meta(directory)
    if meta is None:
        return
    try:
        source = json.loads((directory / META_FILE).read_text(encoding="utf-8")).get("quantized_from")
    except (OSError, ValueError, AttributeError):
        source = None
    origin = f" ({source})" if source else ""
    raise SettingError(f"init_from {directory} is quantized ({meta['mode']}) and training needs full-precision "
                       f"weights; start from the checkpoint it was quantized from{origin}", setting="init_from")


def read_config(directory: Path) -> Config:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no {CONFIG_FILE}; it is incomplete, use another one")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"{path} is corrupt (not YAML); use another checkpoint") from None
    # Keys that an older version did not have take their defaults.
    return Config.from_dict(raw or {}, source=str(path))


def read_train_state(directory: Path, map_location: str | torch.device = "cpu",
                     required: Sequence[str] = ()) -> dict[str, Any]:
    """``directory``'s training state: a mapping with (at least) the keys ``required``."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no training state ({STATE_FILE}); "
                        "it can be used for generation or training.init_from, not to resume training")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a corrupt or unsafe file
        first = first_line(exc)
        raise UserError(f"refusing to load {path}: it is corrupt or holds pickled objects ({first[:160]}); "
                        "use another checkpoint") from None
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise not_resumable(path, f"it lacks {', '.join(missing)}")
    return state


def not_resumable(path: Path, why: str) -> UserError:
    """A training state that can't be resumed from; its checkpoint's weights may still start a run."""
    return UserError(f"{path} is not a training state this version can resume from ({why}); resume from "
                     f"another checkpoint, or start a new run (in another training.out_dir) from these weights "
                     f"with training.init_from {path.parent}")


def load_model(directory: Path, device: str | torch.device = "cpu",
               config: Optional[Config] = None) -> Transformer:
    """Build the model of a checkpoint directory and load its weights.

    A quantized checkpoint (``mini-transformer quantize``) comes back with its int8/int4 layers;
    a LoRA training run's checkpoint comes back with its adapters in place.
    """
    config = config or read_config(directory)
    if read_quantization_meta(directory) is not None:
        return load_quantized(directory, config.model).to(device)
    state = read_weights(directory / WEIGHTS_FILE)  # memory-mapped
    # Built on the meta device (no memory, no random init), then given the file's tensors.
    with torch.device("meta"):
        model = Transformer(config.model)
        if any(".lora_A" in name for name in state):
            a = config.advanced
            apply_lora(model, rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                       targets=tuple(a.lora_targets))
    load_weights_into(model, state, directory, assign=True)
    return model.to(device)


def load_tokenizer_from(directory: Path, vocab_size: Optional[int] = None):
    """``directory``'s tokenizer; with the model's ``vocab_size``, refused if it has ids the
    model has no embedding for (a tokenizer.json copied from another run)."""
    tokenizer = load_tokenizer(directory)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"is {vocab_size}: the tokenizer belongs to another model; put back the tokenizer.json "
                        "saved with these weights (or retrain)")
    return tokenizer


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                       adapter: Optional[str | os.PathLike] = None, quantize: Optional[str] = None,
                       group_size: Optional[int] = None, quantize_embedding: Optional[bool] = None,
                       dtype: Optional[torch.dtype] = None, config: Optional[Config] = None,
                       compiled_decode: bool = False):
    """``(model, config, tokenizer)`` from a checkpoint directory or a run's ``out_dir``.

    ``adapter`` adds a LoRA adapter directory (checked against this base); ``dtype`` casts the
    weights, on the CPU before they move, so a model that fits ``device`` only in half precision
    loads; ``quantize`` (``int8``/``int4``) quantizes them (``group_size`` and
    ``quantize_embedding`` default to the checkpoint's settings). The model is in eval mode on
    ``device``, its CPU float32 linear weights in the layout its decode step reads fastest
    (:mod:`~mini_transformer.decode_layout`): ``compiled_decode`` when the decode step will be
    compiled (``generate --compile``), eager otherwise. ``config`` is the checkpoint's own config when the
    caller has read it already (:func:`read_config`), so it is not read twice; it builds the model.
    """
    directory = resolve_checkpoint(path, prefer="best")
    config = config or read_config(directory)
    model = load_model(directory, "cpu", config)
    if adapter is not None:
        load_adapter(adapter, model)
    if dtype is not None:
        model = model.to(dtype)
    if quantize is not None:
        if not is_quantized(model):
            include_embedding = config.advanced.quantize_embedding if quantize_embedding is None else quantize_embedding
            model = quantize_model(model, quantize, group_size or config.advanced.quantize_group_size,
                                   include_embedding=include_embedding)
    tokenizer = load_tokenizer_from(directory, config.model.vocab_size)
    model = to_decode_layout(model.to(device), compiled=compiled_decode)
    model.eval()
    return model, config, tokenizer


def save_inference_checkpoint(directory: str | os.PathLike, model: Transformer, config: Config, tokenizer: Any,
                              extra_meta: Optional[dict[str, Any]] = None,
                              source: Optional[str | os.PathLike] = None) -> Path:
    """A checkpoint for generation only (weights, config, tokenizer), written as one atomic step.

    Used by ``merge`` and ``quantize``. An existing checkpoint at ``directory`` is replaced
    only once the new one is complete (see :func:`~mini_transformer.atomic.atomic_directory`).
    A checkpoint made from another (``source``) carries on its :data:`PROVENANCE_KEYS`.
    """
    final = check_output_directory(directory, source)
    meta = {**(read_provenance(source) if source is not None else {}), **(extra_meta or {})}
    with atomic_directory(final, if_exists="replace") as tmp:
        _write_checkpoint_files(tmp, None, model, config, tokenizer, None, None, meta)
    return final


# checkpoint.json keys that say where the weights came from (an imported Hugging Face model's
# directory, class and context length, which export writes back); checkpoints made from one keep them.
PROVENANCE_KEYS = ("imported_from", "hf_architecture", "max_position_embeddings")


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """The :data:`PROVENANCE_KEYS` that ``directory``'s checkpoint.json holds (``{}`` if none, or no checkpoint)."""
    try:
        meta = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {key: meta[key] for key in PROVENANCE_KEYS if key in meta} if isinstance(meta, dict) else {}


def check_output_directory(directory: str | os.PathLike, source: Optional[str | os.PathLike] = None) -> Path:
    """Where :func:`save_inference_checkpoint` may write: not over or inside ``source``, and not
    over a directory that is not a checkpoint. Callers with slow work to do check first."""
    final = Path(directory)
    if source is not None and paths_overlap(final, Path(source)):
        raise SettingError(f"directory {final} would overwrite the checkpoint it is made from; choose a new one",
                           setting="directory")
    if final.exists() and not (final / META_FILE).is_file():
        raise SettingError(f"directory {final} exists and is not a checkpoint; choose a new one",
                           setting="directory")
    return final


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if one of the two paths is, or lies inside, the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a.is_relative_to(b) or b.is_relative_to(a)
