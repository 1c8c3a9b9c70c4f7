"""A model's weights as a state dict: which architecture they fit, what is saved, how it loads.

Tied weights. With ``tie_embeddings`` the LM head and the embedding share one Parameter, which a
state dict names twice. Files store it once, under its first name (``tok_emb.weight``), and
loading ties it again. :func:`tied_names` finds such aliases the way ``Module.parameters()``
counts a shared Parameter once: by the module registrations, not by memory addresses, so it
also works on a model built on the meta device, whose tensors have no memory to compare.

Loading. :func:`assign_weights` gives a model built on the meta device (no memory taken, no
random init spent) the loaded tensors themselves, ``load_state_dict(assign=True)`` as gpt-fast
does: with memory-mapped safetensors nothing is copied until a weight is cast or moved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
import torch.nn as nn


# Config fields that do not change the weights: the same weights run with any dropout and kernel,
# and however they were initialised.
_NOT_ARCHITECTURE = ("dropout", "attention", "zero_init_projections")
# Fields added after checkpoints and adapters recorded fingerprints, with their defaults: left out
# while at the default, so that a model without the option keeps the fingerprint it had.
_ADDED_LATER = {"activation": "swiglu", "qk_norm": False, "logit_softcap": None}


def architecture(config: Any) -> dict[str, Any]:
    """The fields of a :class:`~mini_transformer.config.ModelConfig` that decide the weights."""
    return {k: v for k, v in vars(config).items()
            if k not in _NOT_ARCHITECTURE and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


def model_fingerprint(config: Any) -> str:
    """A short hash of the architecture: checkpoints and adapters must match it to load."""
    text = json.dumps(architecture(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each name under which a parameter or buffer already seen is registered again -> its first name.

    A tied model gives ``{"lm_head.weight": "tok_emb.weight"}``; an untied one ``{}``.
    """
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in _named_tensors(model):
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
    return aliases


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it is registered by, as the model holds it
    (``state_dict()`` may convert: int4 scales are saved as bf16)."""
    return chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def weights_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The state dict to save: contiguous CPU tensors, each tied weight once (as safetensors needs).

    ``model`` is a module, or anything with a ``state_dict()`` that already names each tensor
    once (FSDP's gathered full state).
    """
    state = model.state_dict()
    aliases = tied_names(model) if isinstance(model, nn.Module) else {}
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items() if name not in aliases}


def missing_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The names ``model`` has that ``state`` lacks, tied aliases excepted (they are saved once)."""
    aliases = tied_names(model)
    return [name for name in model.state_dict() if name not in state and name not in aliases]


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors the weights of ``model``, built on the meta device; in place.

    Names and shapes must already have been checked. A tensor whose dtype differs from the
    model's (int4 scales are stored as bf16) is cast, as ``load_state_dict``'s copy would; the
    others are used as they are, memory-mapped ones included. The tied weights are tied again
    (assigning replaces the shared Parameter in one module only) and the non-persistent
    buffers, which no file holds, are computed.
    """
    aliases = tied_names(model)
    dtypes = {name: tensor.dtype for name, tensor in _named_tensors(model)}
    state = {name: tensor.to(dtypes.get(name, tensor.dtype)) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for alias, name in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, _get_tensor(model, name))
    _compute_rope_tables(model)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{left[0]} is still on the meta device after loading; neither the state dict "
                           "nor the model's own set-up gives it a value")


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _compute_rope_tables(model: nn.Module) -> None:
    """A model built on the meta device has its RoPE tables there too: the model computes them."""
    rope_cos = getattr(model, "rope_cos", None)
    if rope_cos is not None and rope_cos.is_meta:
        model.init_rope("cpu")
