"""Typed configuration: five sections, YAML on disk, dotted overrides on the command line.

A config file has the sections ``model``, ``training``, ``data``, ``generation`` and ``advanced``::

    model:
      d_model: 256
    training:
      batch_size: 32

A key may also stand at the top level without its section (``compile: true``, or the bare
``d_model: 128`` of the size presets): it is filed under the one section that has a key of that
name. Key names are unique across sections, so this is never ambiguous.

Each key's meaning is the one-line docstring under its field; ``mini-transformer config --list``
and the ``--help`` of the commands that take a config list them (config_docs.py).

Any key can be overridden from the command line as ``--section.key value`` or
``--section.key=value`` (or, as in YAML, without its section: ``--compile true``). Every mistake (unknown key, wrong type, impossible sizes) raises
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
from .textfile import read_user_text

# yaml is imported where it is used: the command line's --help imports this module and never
# reads YAML, and yaml's import is a fifth of --help's time.

SECTIONS = ("model", "training", "data", "generation", "advanced")
COMMAND_LINE = "command line"  # the source name of --section.key overrides (see Config.set_by)
PRESETS_DIR = Path(__file__).parent / "configs"
# Seeds are below 2**32, as numpy's legacy ones: the offsets added to them (a rank, a sample's
# index, a resumed step) then stay far inside the 64 bits torch and numpy take.
SEED_LIMIT = 2**32


def default_ffn_hidden_size(d_model: int, activation: str = "swiglu") -> int:
    """SwiGLU hidden size: about 8/3 of ``d_model`` (same parameters as a 4x MLP), rounded up to 64.
    The non-gated relu2 MLP has two matrices instead of three: 4 x ``d_model``, as GPT-2's."""
    if activation == "relu2":
        return 4 * d_model
    hidden = int(8 * d_model / 3)
    return 64 * ((hidden + 63) // 64)


@dataclass
class ModelConfig:
    """The architecture. Everything the model needs to be built, and nothing else."""

    vocab_size: Optional[int] = None
    """Vocabulary size; null: taken from the tokenizer when training starts."""
    d_model: int = 256
    """Width of the residual stream (the embedding size)."""
    n_heads: int = 8
    """Attention heads per layer; d_model must be divisible by it."""
    n_kv_heads: Optional[int] = None
    """Key/value heads: null is n_heads (multi-head), 1 is multi-query, in between grouped-query."""
    n_layers: int = 6
    """Transformer blocks."""
    block_size: int = 256
    """Context length in tokens."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights and residual branches, in [0, 1)."""
    ffn_hidden_size: Optional[int] = None
    """Feed-forward hidden size; null: swiglu about 8/3 of d_model rounded up to a multiple of 64, relu2 4 x d_model."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """The normalisation layer of every block and of the final norm."""
    norm_eps: float = 1e-5
    """Epsilon of the norm layers."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding's frequencies."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the LM head."""
    bias: bool = False
    """Biases in the attention and feed-forward linear layers and in LayerNorm."""
    attention: Literal["auto", "sdpa", "flash", "math"] = "auto"
    """Attention kernel: auto picks flash-attn, SDPA or the explicit path; math is the explicit softmax."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation (residual projections scaled by 1/sqrt(2 n_layers))."""
    # Options from the modded-nanogpt speedrun, each off by default (README, "The model").
    activation: Literal["swiglu", "relu2"] = "swiglu"
    """Feed-forward: swiglu down(silu(gate(x)) * up(x)), or relu2 down(relu(up(x))^2), the speedrun's non-gated MLP."""
    qk_norm: bool = False
    """RMSNorm of each head's queries and keys (learned weight of head_dim, eps norm_eps), before RoPE."""
    logit_softcap: Optional[float] = None
    """Cap the logits smoothly: cap * tanh(logits / cap) (15 or 30 are usual); null: off."""
    zero_init_projections: bool = False
    """Initialise the attention output and feed-forward down projections to zero (each block starts as the identity)."""

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.ffn_hidden_size or default_ffn_hidden_size(self.d_model, self.activation)


@dataclass
class TrainingConfig:
    """The optimisation loop: batches, schedule, precision, evaluation and checkpoints."""

    batch_size: int = 32
    """Sequences per micro-batch on each process."""
    learning_rate: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    max_iters: int = 10000
    """Optimizer steps to train for."""
    max_seconds: Optional[float] = None
    """Wall-time budget in seconds, from the start of the command: training stops early enough
    for the last evaluation, checkpoint and final val pass to end within it (as timed so far);
    null: no time limit."""
    # The schedule follows max_iters unless set: warmup at most a tenth of the run, decay to its
    # end (training/schedule.py resolve_schedule, which also says when a set one does not fit).
    warmup_iters: int = 500
    """Steps of linear warmup from 0 to learning_rate (500: 5% of the default max_iters, as in config.yaml)."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """The decay after warmup: cosine or linear down to min_lr, or constant."""
    lr_decay_iters: Optional[int] = None
    """The step where the decay reaches min_lr; null: max_iters."""
    min_lr: Optional[float] = None
    """The learning rate at the end of the decay; null: learning_rate / 10."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on matrices and embeddings (not norms or biases)."""
    beta1: float = 0.9
    """AdamW's beta1."""
    beta2: float = 0.95
    """AdamW's beta2."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    # Muon (training/muon.py) takes the 2-D weight matrices inside the blocks; AdamW keeps the
    # embedding, the LM head, norms and biases with the keys above.
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon for the blocks' weight matrices, AdamW for embedding, LM head, norms, biases."""
    muon_learning_rate: float = 0.02
    """Muon's peak learning rate; the schedule scales it as it scales learning_rate."""
    muon_weight_decay: float = 0.01
    """Muon's decoupled weight decay (each step multiplies the matrices by 1 - lr x weight_decay)."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov), in [0, 1)."""
    muon_split_fused: bool = True  # measured: 0.05-0.06 lower val loss than false (BENCHMARKS.md)
    """Orthogonalise q, k, v and gate, up apart (false: the fused qkv and gate_up matrices whole)."""
    grad_clip: float = 1.0
    """Clip the gradient norm at this value; 0 disables clipping."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, each loss divided by their number."""
    # Sequences per optimizer step over all processes. When set, gradient_accumulation_steps is
    # derived: global_batch_size / (batch_size x world_size), which must divide exactly.
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all processes; null: batch_size x accumulation x world size."""
    # Dropout annealing: dropout goes from model.dropout to dropout_end over the first
    # dropout_anneal_fraction of training. None disables annealing.
    dropout_end: Optional[float] = None
    """Anneal dropout from model.dropout to this value; null: no annealing."""
    dropout_anneal: Literal["linear", "cosine"] = "linear"
    """The shape of the dropout annealing."""
    dropout_anneal_fraction: float = 1.0
    """The fraction of training, in (0, 1], over which dropout anneals."""
    eval_interval: int = 500
    """Steps between evaluations (train and val loss; checkpoints are saved at evaluations)."""
    eval_iters: int = 200
    """Batches averaged per evaluation."""
    log_interval: int = 10
    """Steps between log lines (progress bar and metrics.jsonl)."""
    out_dir: str = "out"
    """Where checkpoints, metrics.jsonl and TensorBoard events go (and where generate looks)."""
    always_save_checkpoint: bool = False
    """Save at every evaluation, not only when the val loss improves."""
    keep_last: int = 3
    """How many step checkpoints to keep besides the best one."""
    max_bad_steps: int = 5
    """Steps in a row with a non-finite loss or gradient before the run stops."""
    init_from: Optional[str] = None
    """A checkpoint (or Hugging Face model) directory to start from; null: random weights."""
    seed: int = 1337
    """Random seed of the weights, the batches and dropout."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Precision: auto is bf16 autocast where the hardware supports it (fp16 on older GPUs), else fp32."""
    compile: bool = False
    """Run the model through torch.compile (works on CPU too, with a C compiler)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, more compute."""
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp replicates the model, fsdp shards it (FSDP2); auto is ddp."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """The torch.distributed backend; auto is nccl on CUDA, gloo on CPU."""
    dist_timeout_s: float = 300.0
    """Seconds a collective may wait before the job fails (torchrun)."""
    tensorboard: bool = True
    """Write TensorBoard events to out_dir/tensorboard when tensorboard is installed."""


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    path: Optional[str] = "data/input.txt"
    """The text: a file, a directory of .txt files, a glob, or a directory made by prepare."""
    dataset: Optional[str] = None
    """A named corpus instead of path: shakespeare (downloaded once) or pystdlib (offline)."""
    tokenizer: Literal["char", "byte", "bpe", "gpt2"] = "char"
    """char, byte, bpe (trained on the text) or gpt2 (GPT-2's BPE via tiktoken)."""
    bpe_vocab_size: int = 2048
    """Vocabulary size of the bpe tokenizer."""
    bpe_train_bytes: Optional[int] = None
    """Learn the BPE merges from the first N bytes only; null: the whole text."""
    val_fraction: float = 0.1
    """The last fraction of the tokens, held out for validation."""
    cache_dir: str = "data/cache"
    """Where prepared token files are cached, keyed by the text's content and the tokenizer."""
    text_field: str = "text"
    """The field that holds the text in .jsonl and .parquet files at path."""


@dataclass
class GenerationConfig:
    """Defaults for sampling; each can also be given as a flag of ``generate``."""

    max_tokens: int = 200
    """New tokens per sample (generate --max_tokens)."""
    temperature: float = 0.8
    """0 is greedy; 0.1-0.5 focused, 0.8-1.0 balanced, above 1 wild."""
    top_k: Optional[int] = None
    """Keep the k most likely tokens; null: off."""
    top_p: Optional[float] = None
    """Keep the most likely tokens up to this total probability; null: off."""
    min_p: Optional[float] = None
    """Drop tokens less likely than min_p times the top token; null: off."""
    repetition_penalty: float = 1.0
    """Above 1 discourages repeating tokens; 1.0: off."""
    num_samples: int = 1
    """Samples per prompt."""
    stop: list[str] = field(default_factory=list)
    """Stop a sample when one of these strings appears."""
    # Past block_size the window slides: a row keeps its last context_keep tokens and is
    # prefilled again (None: block_size // 2). See mini_transformer/generation/engine.py.
    context_keep: Optional[int] = None
    """Past block_size the window slides, keeping this many tokens; null: block_size // 2."""
    # Compile the decode step (torch.compile, static shapes): several seconds of compilation,
    # then faster tokens. Also the generate flag --compile.
    compile_decode: bool = False
    """Compile the decode step with torch.compile: seconds up front, faster tokens after."""
    # The weights' precision while generating: auto is bf16 on CUDA GPUs that support it (fp16
    # on older ones), where decoding reads half the bytes; elsewhere the checkpoint's own (fp32).
    # Also the generate flag --dtype.
    decode_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """The weights' precision while generating: auto is bf16 on CUDA, the checkpoint's fp32 elsewhere."""


@dataclass
class AdvancedConfig:
    """Optional features: LoRA, quantization, attention logging, speculative sampling."""

    use_lora: bool = False
    """Train LoRA adapters instead of all the weights (finetune sets it)."""
    lora_rank: int = 8
    """Rank of each LoRA adapter."""
    lora_alpha: float = 16.0
    """LoRA's scale: the adapters' update is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: list[str] = field(default_factory=lambda: ["attention"])
    """The layers that get adapters: attention, ffn, or both."""
    quantize: Optional[Literal["int8", "int4"]] = None
    """Weight-only quantization when a checkpoint loads: int8, int4, or null (none)."""
    quantize_group_size: int = 64  # divides the widths of every preset (128 does not divide 704)
    """int4: consecutive input weights sharing one scale and zero point."""
    quantize_embedding: bool = False
    """Also quantize the token embedding (and the LM head tied to it)."""
    log_attention: bool = False
    """Save the attention maps of a generation (generate --log_attention)."""
    speculative_sampling: bool = False
    """Speculative decoding with draft_checkpoint as the draft model."""
    draft_checkpoint: Optional[str] = None
    """The draft model's checkpoint for speculative decoding."""
    speculative_gamma: int = 4
    """Draft tokens proposed per round of speculative decoding."""


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
    # Which keys a user set, and where: "section.key" -> the source that set it last (a preset,
    # a file, or COMMAND_LINE). Recorded by the loader, never saved: the run's schedule follows
    # max_iters only where its own keys were not set (training/schedule.py).
    set_by: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # -- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    # -- provenance -------------------------------------------------------------------------
    def is_set(self, dotted: str) -> bool:
        """Whether ``section.key`` was given by a user: recorded by the loader, or (in a config
        built in Python) different from the built-in default."""
        if dotted in self.set_by:
            return True
        section, key = dotted.split(".", 1)
        default = getattr(SECTION_TYPES[section](), key)
        return getattr(getattr(self, section), key) != default

    def set_on_command_line(self, dotted: str) -> bool:
        """Whether ``section.key`` was set last and most directly: on the command line, or in
        Python (changed from its default without the loader seeing it)."""
        source = self.set_by.get(dotted)
        return source == COMMAND_LINE or (source is None and self.is_set(dotted))

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
        self._check_magnitudes()
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
        for key, value in [("training.learning_rate", t.learning_rate),
                           ("training.muon_learning_rate", t.muon_learning_rate), ("model.norm_eps", m.norm_eps),
                           ("model.rope_base", m.rope_base), ("training.eps", t.eps)]:
            if value <= 0:
                raise UserError(f"{key} must be positive, got {value}; set it to a value > 0")
        if m.logit_softcap is not None and m.logit_softcap <= 0:
            raise UserError(f"model.logit_softcap must be positive, got {m.logit_softcap}; 30 is usual, "
                            "or leave it unset (null) for no cap")
        for key, value in [("training.weight_decay", t.weight_decay), ("training.grad_clip", t.grad_clip),
                           ("training.muon_weight_decay", t.muon_weight_decay),
                           ("training.warmup_iters", t.warmup_iters), ("model.init_std", m.init_std)]:
            if value < 0:
                raise UserError(f"{key} must be >= 0, got {value}; 0 turns it off")
        for key, value in [("training.beta1", t.beta1), ("training.beta2", t.beta2),
                           ("training.muon_momentum", t.muon_momentum)]:
            if not 0.0 <= value < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {value}; typical values are 0.9 and 0.95")
        if not 0.0 < d.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}; 0.1 is the default")
        if not 0.0 < t.dropout_anneal_fraction <= 1.0:
            raise UserError(
                f"training.dropout_anneal_fraction must be in (0, 1], got {t.dropout_anneal_fraction}; "
                "1.0 (the default) anneals over the whole run")
        if not 0 <= t.seed < SEED_LIMIT:
            raise UserError(f"training.seed must be in [0, 2**32), got {t.seed}; any such integer, like 1337")
        if t.min_lr is not None and t.min_lr < 0:
            raise UserError(f"training.min_lr must be >= 0, got {t.min_lr}; leave it unset for learning_rate / 10")
        for target in a.lora_targets:
            if target not in ("attention", "ffn"):
                raise UserError(
                    f"advanced.lora_targets has unknown entry {target!r}; use 'attention' and/or 'ffn'")
        for key, value, unset in [("training.lr_decay_iters", t.lr_decay_iters, "to decay until max_iters"),
                                  ("training.max_seconds", t.max_seconds, "for no time limit")]:
            if value is not None and value < 0:
                raise UserError(f"{key} must be >= 0, got {value}; leave it unset (null) {unset}")
        if t.dist_timeout_s <= 0:
            raise UserError(f"training.dist_timeout_s must be positive, got {t.dist_timeout_s}; 300 is the default")
        if g.context_keep is not None and not 1 <= g.context_keep < m.block_size:
            raise UserError(f"generation.context_keep must be in [1, model.block_size) = [1, {m.block_size}), got "
                            f"{g.context_keep}; leave it unset for block_size // 2")

    def _check_magnitudes(self) -> None:
        """Refuse integers that overflow what tensors are indexed with: a tensor dimension
        (d_model, a batch) past int32, any count past int64 (``1.0e+30`` reads as an integer)."""
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if isinstance(value, bool) or not isinstance(value, int):
                    continue
                limit = _INT32_MAX if f"{section}.{key}" in _DIMENSIONS else _INT64_MAX
                if abs(value) > limit:
                    raise UserError(f"{section}.{key} = {value:.3g} is too large (at most {limit:,}); "
                                    f"fix the value of {section}.{key}")

    def check_batch_is_indexable(self) -> None:
        """Refuse, for training, a batch whose token tensor could not be indexed (past int32).

        Not part of :meth:`validate`: generation reads the same config and never makes that batch."""
        tokens = self.training.batch_size * self.model.block_size  # one batch tensor's elements
        if tokens > _INT32_MAX:
            raise UserError(f"training.batch_size x model.block_size = {tokens:,} tokens in one batch is too many "
                            f"(at most {_INT32_MAX:,}); lower training.batch_size (gradient_accumulation_steps "
                            "makes up the rest)")


_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1
# The settings that become a tensor's dimension (or a product of a few of them does).
_DIMENSIONS = frozenset({
    "model.vocab_size", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.n_layers", "model.block_size",
    "model.ffn_hidden_size", "training.batch_size", "training.global_batch_size", "data.bpe_vocab_size",
    "generation.max_tokens", "generation.num_samples", "generation.top_k", "generation.context_keep",
    "advanced.lora_rank", "advanced.quantize_group_size", "advanced.speculative_gamma",
})


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
        merge_into(config, parse_overrides(overrides), COMMAND_LINE)
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
    if not path.exists():
        raise SettingError(f"config file {str(path)!r} not found; check the path, or start from a built-in "
                           f"preset: {', '.join(preset_names())}", fixes=[{"preset": "NAME"}])
    return read_yaml_file(path, "check the path")


def read_yaml_file(path: Path, fix: str) -> dict[str, Any]:
    """The mapping a YAML config file holds; ``fix`` says what to do if it does not exist."""
    import yaml

    text = read_user_text(path, "config file", fix, usual_name="config.yaml")
    try:
        raw = yaml.safe_load(text)
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
    """Turn ``["--model.d_model", "128", "--training.max_iters=100", "--compile", "true"]`` into
    nested data. A key without its section (``--compile``) is filed under its section, as in YAML."""
    result: dict[str, dict[str, Any]] = {}
    flat_homes = _flat_key_homes()
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0][2:]
        if not arg.startswith("--") or not ("." in name or name in flat_homes):
            hint = _suggest(name) if arg.startswith("--") else "overrides look like --section.key value"
            raise UserError(f"unexpected argument {arg!r}; {hint}")
        if "=" in arg:
            text = arg.split("=", 1)[1]
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value, like {arg} {_example_value(name)} "
                                f"or {arg}={_example_value(name)}")
            text = args[i + 1]
            i += 2
        section, _, key = name.partition(".") if "." in name else (flat_homes[name], ".", name)
        result.setdefault(section, {})[key] = _OverrideText(text)
    return result


def _example_value(name: str) -> str:
    """A value to show in a hint about ``name``: its default, or true for a switch."""
    key = name.rsplit(".", 1)[-1]
    section = _flat_key_homes().get(key)
    if section is None:
        return "VALUE"
    default = getattr(SECTION_TYPES[section](), key)
    if isinstance(default, bool):
        return "true"
    return "VALUE" if default is None or isinstance(default, list) else str(default)


class _OverrideText(str):
    """A value typed on the command line: parsed as YAML unless its key wants a string."""


def merge_into(config: Config, raw: dict[str, Any], source: str) -> None:
    """Validate ``raw`` key by key and write it into ``config``."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}; write it like "
                        "'model: {d_model: 256}'")
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
        dotted = f"{section}.{key}"
        raise UserError(f"{source}: unknown config key {dotted!r}; {_suggest(dotted)}")
    coerced = coerce_value(value, hints[key], f"{section}.{key}", source)
    setattr(section_obj, key, coerced)
    config.set_by[f"{section}.{key}"] = source


def config_keys() -> list[str]:
    """Every config key as ``section.key``, in declaration order."""
    return [f"{section}.{key}" for section, cls in SECTION_TYPES.items() for key in _type_hints(cls)]


def _suggest(name: str) -> str:
    candidates = config_keys()
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
