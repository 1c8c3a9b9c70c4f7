"""Typed configuration: five sections, YAML on disk, dotted overrides on the command line.

A config file has the sections ``model``, ``training``, ``data``, ``generation`` and ``advanced``::

    model:
      d_model: 256
    training:
      batch_size: 32

A key may also stand at the top level without its section (``compile: true``, or the bare
``d_model: 128`` of the size presets): it is filed under the one section that has a key of that
name. Key names are unique across sections, so this is never ambiguous.

Any key can be overridden from the command line as ``--section.key value`` or
``--section.key=value``. Every mistake (unknown key, wrong type, impossible sizes) raises
:class:`~mini_transformer.errors.UserError` with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .atomic import atomic_write_text
from .errors import SettingError, UserError

# yaml is imported where it is used: the command line's --help imports this module and never
# reads YAML, and yaml's import is a fifth of --help's time.

SECTIONS = ("model", "training", "data", "generation", "advanced")
PRESETS_DIR = Path(__file__).parent / "configs"
# Seeds are below 2**32, as numpy's legacy ones: the offsets added to them (a rank, a sample's
# index, a resumed step) then stay far inside the 64 bits torch and numpy take.
SEED_LIMIT = 2**32


def default_ffn_hidden_size(d_model: int) -> int:
    """SwiGLU hidden size: about 8/3 of ``d_model`` (same parameters as a 4x MLP), rounded up to 64."""
    hidden = int(8 * d_model / 3)
    return 64 * ((hidden + 63) // 64)


@dataclass
class ModelConfig:
    """The architecture. Everything the model needs to be built, and nothing else."""

    vocab_size: Optional[int] = None  # None: taken from the tokenizer when training starts
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    n_layers: int = 6
    block_size: int = 256  # context length
    dropout: float = 0.1
    ffn_hidden_size: Optional[int] = None  # None: about 8/3 * d_model, rounded up to 64
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    attention: Literal["auto", "sdpa", "flash", "math"] = "auto"
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.ffn_hidden_size or default_ffn_hidden_size(self.d_model)


@dataclass
class TrainingConfig:
    """The optimisation loop: batches, schedule, precision, evaluation and checkpoints."""

    batch_size: int = 32
    learning_rate: float = 3e-4
    max_iters: int = 10000
    max_seconds: Optional[float] = None  # stop early (evaluated and saved) after this much wall time
    warmup_iters: int = 100
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: Optional[int] = None  # None: = max_iters
    min_lr: Optional[float] = None  # None: learning_rate / 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    # Sequences per optimizer step over all processes. When set, gradient_accumulation_steps is
    # derived: global_batch_size / (batch_size x world_size), which must divide exactly.
    global_batch_size: Optional[int] = None
    # Dropout annealing: dropout goes from model.dropout to dropout_end over the first
    # dropout_anneal_fraction of training. None disables annealing.
    dropout_end: Optional[float] = None
    dropout_anneal: Literal["linear", "cosine"] = "linear"
    dropout_anneal_fraction: float = 1.0
    eval_interval: int = 500
    eval_iters: int = 200
    log_interval: int = 10
    out_dir: str = "out"
    always_save_checkpoint: bool = False
    keep_last: int = 3  # how many step checkpoints to keep besides the best one
    max_bad_steps: int = 5  # NaN/inf losses in a row before the run stops
    init_from: Optional[str] = None  # a checkpoint directory (or a Hugging Face model directory) to start from
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model (works on CPU too)
    gradient_checkpointing: bool = False
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_timeout_s: float = 300.0  # a collective waiting longer than this fails the job (torchrun)
    tensorboard: bool = True


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    path: Optional[str] = "data/input.txt"
    dataset: Optional[str] = None  # a named corpus instead of path: shakespeare | pystdlib
    tokenizer: Literal["char", "byte", "bpe", "gpt2"] = "char"
    bpe_vocab_size: int = 2048
    bpe_train_bytes: Optional[int] = None  # learn BPE merges from the first N bytes only; None: all
    val_fraction: float = 0.1
    cache_dir: str = "data/cache"


@dataclass
class GenerationConfig:
    """Defaults for sampling; each can also be given as a flag of ``generate``."""

    max_tokens: int = 200
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)
    # Past block_size the window slides: a row keeps its last context_keep tokens and is
    # prefilled again (None: block_size // 2). See mini_transformer/generation/engine.py.
    context_keep: Optional[int] = None
    # Compile the decode step (torch.compile, static shapes): several seconds of compilation,
    # then faster tokens. Also the generate flag --compile.
    compile_decode: bool = False
    # The weights' precision while generating: auto is bf16 on CUDA GPUs that support it (fp16
    # on older ones), where decoding reads half the bytes; elsewhere the checkpoint's own (fp32).
    # Also the generate flag --dtype.
    decode_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class AdvancedConfig:
    """Optional features: LoRA, quantization, attention logging, speculative sampling."""

    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention"])  # attention, ffn
    quantize: Optional[Literal["int8", "int4"]] = None
    quantize_group_size: int = 64  # divides the widths of every preset (128 does not divide 704)
    quantize_embedding: bool = False
    log_attention: bool = False
    speculative_sampling: bool = False
    draft_checkpoint: Optional[str] = None
    speculative_gamma: int = 4


SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "advanced": AdvancedConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    advanced: AdvancedConfig = field(default_factory=AdvancedConfig)

    # -- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        """Build and validate a config from nested (or partly flat) plain data."""
        config = cls()
        merge_into(config, raw, source)
        config.validate()
        return config

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write_text(Path(path), text)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the relations between keys that types alone cannot express."""
        m, t, d, g, a = self.model, self.training, self.data, self.generation, self.advanced
        for key, value in [
            ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
            ("model.n_layers", m.n_layers), ("model.block_size", m.block_size),
            ("model.vocab_size", m.vocab_size), ("model.n_kv_heads", m.n_kv_heads),
            ("model.ffn_hidden_size", m.ffn_hidden_size),
            ("training.batch_size", t.batch_size), ("training.max_iters", t.max_iters),
            ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("training.eval_interval", t.eval_interval), ("training.eval_iters", t.eval_iters),
            ("training.log_interval", t.log_interval), ("training.keep_last", t.keep_last),
            ("training.max_bad_steps", t.max_bad_steps),
            ("data.bpe_vocab_size", d.bpe_vocab_size), ("data.bpe_train_bytes", d.bpe_train_bytes),
            ("generation.num_samples", g.num_samples),
            ("advanced.lora_rank", a.lora_rank), ("advanced.speculative_gamma", a.speculative_gamma),
            ("advanced.quantize_group_size", a.quantize_group_size),
        ]:
            if value is not None and value <= 0:
                raise UserError(f"{key} must be positive, got {value}; set it to a value > 0")
        if m.d_model % m.n_heads:
            raise UserError(
                f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}); "
                f"try d_model {m.n_heads * max(1, round(m.d_model / m.n_heads))} or another n_heads")
        if m.n_heads % m.kv_heads:
            raise UserError(
                f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads}); "
                "use a divisor of n_heads (1 for MQA, n_heads for MHA)")
        if m.head_dim % 2:
            raise UserError(
                f"model.d_model / model.n_heads = {m.head_dim} must be even for rotary embeddings; "
                "change d_model or n_heads")
        for key, value in [("model.dropout", m.dropout), ("training.dropout_end", t.dropout_end),
                           ("advanced.lora_dropout", a.lora_dropout)]:
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {value}; 0.1 is a common choice")
        for key, value in [("training.learning_rate", t.learning_rate), ("model.norm_eps", m.norm_eps),
                           ("model.rope_base", m.rope_base), ("training.eps", t.eps)]:
            if value <= 0:
                raise UserError(f"{key} must be positive, got {value}")
        for key, value in [("training.weight_decay", t.weight_decay), ("training.grad_clip", t.grad_clip),
                           ("training.warmup_iters", t.warmup_iters), ("model.init_std", m.init_std)]:
            if value < 0:
                raise UserError(f"{key} must be >= 0, got {value}")
        for key, value in [("training.beta1", t.beta1), ("training.beta2", t.beta2)]:
            if not 0.0 <= value < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {value}; typical values are 0.9 and 0.95")
        if not 0.0 < d.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}; 0.1 is the default")
        if not 0.0 < t.dropout_anneal_fraction <= 1.0:
            raise UserError(
                f"training.dropout_anneal_fraction must be in (0, 1], got {t.dropout_anneal_fraction}")
        if not 0 <= t.seed < SEED_LIMIT:
            raise UserError(f"training.seed must be in [0, 2**32), got {t.seed}; any such integer, like 1337")
        if t.min_lr is not None and t.min_lr < 0:
            raise UserError(f"training.min_lr must be >= 0, got {t.min_lr}")
        for target in a.lora_targets:
            if target not in ("attention", "ffn"):
                raise UserError(
                    f"advanced.lora_targets has unknown entry {target!r}; use 'attention' and/or 'ffn'")


# -- loading ---------------------------------------------------------------------------------

def load_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults, then a preset, then a YAML file, then ``--section.key value`` overrides."""
    config = Config()
    if preset is not None:
        merge_into(config, _read_yaml(preset_path(preset)), f"preset {preset}")
    if path is not None:
        merge_into(config, _read_yaml(Path(path)), str(path))
    if overrides:
        merge_into(config, parse_overrides(overrides), "command line")
    config.validate()
    return config


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown preset {name!r}; {hint}choose one of: {', '.join(preset_names())}")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise SettingError(f"config file {str(path)!r} not found; check the path, or start from a built-in "
                           f"preset: {', '.join(preset_names())}", fixes=[{"preset": "NAME"}])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections, like 'model: {{d_model: 256}}'")
    return raw


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--model.d_model", "128", "--training.max_iters=100"]`` into nested data."""
    result: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        if "=" in arg:
            dotted, text = arg[2:].split("=", 1)
            i += 1
        else:
            dotted = arg[2:]
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value, like {arg} 128 or {arg}=128")
            text = args[i + 1]
            i += 2
        section, _, key = dotted.partition(".")
        result.setdefault(section, {})[key] = _OverrideText(text)
    return result


class _OverrideText(str):
    """A value typed on the command line: parsed as YAML unless its key wants a string."""


def merge_into(config: Config, raw: dict[str, Any], source: str) -> None:
    """Validate ``raw`` key by key and write it into ``config``."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    flat_homes = _flat_key_homes()
    for name, value in raw.items():
        name = str(name)
        if name in SECTION_TYPES:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{source}: section '{name}' must be a mapping of keys, got {value!r}")
            for key, item in value.items():
                _set_key(config, name, str(key), item, source)
        elif name in flat_homes:
            _set_key(config, flat_homes[name], name, value, source)
        else:
            raise UserError(f"{source}: unknown config key {name!r}; {_suggest(name)}")


def _set_key(config: Config, section: str, key: str, value: Any, source: str) -> None:
    if section not in SECTION_TYPES:
        raise UserError(f"{source}: unknown config section {section!r}; {_suggest(section + '.' + key)}")
    section_obj = getattr(config, section)
    hints = _type_hints(type(section_obj))
    if key not in hints:
        raise UserError(f"{source}: unknown config key '{section}.{key}'; {_suggest(section + '.' + key)}")
    coerced = coerce_value(value, hints[key], f"{section}.{key}", source)
    setattr(section_obj, key, coerced)


def _suggest(name: str) -> str:
    candidates = [f"{s}.{f}" for s, cls in SECTION_TYPES.items() for f in _type_hints(cls)]
    bare = {c.split(".", 1)[1]: c for c in candidates}
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = name.rsplit(".", 1)[-1]
        match = difflib.get_close_matches(leaf, list(bare), n=1, cutoff=0.6)
        close = [bare[match[0]]] if match else []
    if close:
        return f"did you mean '{close[0]}'?"
    return f"valid sections are {', '.join(SECTIONS)} (see config.yaml for every key)"


def _flat_key_homes() -> dict[str, str]:
    homes: dict[str, str] = {}
    for section, cls in SECTION_TYPES.items():
        for key in _type_hints(cls):
            homes[key] = section
    return homes


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        hints = typing.get_type_hints(cls)
        _HINTS_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS_CACHE[cls]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " (or null)"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce_value(value: Any, tp: Any, key: str, source: str = "config") -> Any:
    """Check ``value`` against the type hint ``tp``; return it in that type or raise UserError."""
    text = value if isinstance(value, _OverrideText) else None
    if text is not None:
        if _accepts_str(tp) and not _is_null_text(text, tp):
            value = str(text)
        else:
            import yaml

            try:
                value = yaml.safe_load(str(text))
            except yaml.YAMLError:
                value = str(text)
    ok, result = _coerce(value, tp)
    if not ok:
        shown = text if text is not None else value
        raise UserError(
            f"{source}: {key} must be {_describe(tp)}, got {shown!r} ({type(value).__name__}); "
            f"fix the value of {key}")
    return result


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(a is str for a in typing.get_args(tp))
    return False


def _is_null_text(text: str, tp: Any) -> bool:
    allows_none = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
    return allows_none and text.strip().lower() in ("null", "none", "~")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, result = _coerce(value, arg)
            if ok:
                return True, result
        return False, None
    if origin is Literal:
        return (value in typing.get_args(tp) and isinstance(value, str)), value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, None
        items = []
        for item in value:
            ok, coerced = _coerce(item, item_tp)
            if not ok:
                return False, None
            items.append(coerced)
        return True, items
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it means.
            try:
                value = float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp!r}")
