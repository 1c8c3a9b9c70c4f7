"""The training loop: accumulation, precision, clipping, schedules, evaluation, checkpoints.

One optimizer step ("iteration") processes ``batch_size x gradient_accumulation_steps x
world_size`` sequences of ``block_size`` tokens: that is the global batch.

Exact resume: everything random is either a pure function of the step (schedules, evaluation
batches) or saved in the checkpoint (model, optimizer, the torch/numpy/python/CUDA RNG states,
the batch sampler, the grad scaler), so N steps in one run equal N/2 + N/2 with a resume.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..config import Config, ModelConfig, TrainingConfig
from ..data import (PreparedData, RandomBatchSampler, check_data_settings, check_split_lengths, iter_sequential_batches,
                    prepare_dataset)
from ..device import allow_tf32_on_cuda, autocast, dtype_name, resolve_device, resolve_dtype, restore_tf32
from ..errors import SettingError, UserError, first_line
from ..interop.hf.importer import hf_model_config, hf_provenance, is_hf_directory, read_hf_tokenizer, read_hf_weights
from ..memory_check import refuse_if_too_large, training_fix, training_need
from ..lora import apply_lora, base_weights_hash, lora_parameter_counts, save_adapter
from ..model import Transformer
from ..runlock import RunLock, acquire_run_lock
from .distributed import (DistributedContext, all_reduce_mean, any_rank, checkpointable_model, full_optimizer_state_dict,
                          gradient_sync, init_distributed, load_full_optimizer_state, local_scalar, planned_world_size,
                          resolve_global_batch, shard_full_state, shutdown, wrap_model)
from .flops import count_parameters, flops_per_token, measure_matmul_flops, model_flops_utilization
from .metrics import MetricsLogger, Throughput
from .optim import build_optimizer, check_optimizer_supported, set_learning_rates
from .schedule import dropout_at, learning_rate_at, resolve_schedule
from .timing import TimeBudget, expected_time_lines, time_a_step


TROUBLESHOOTING = (
    "the loss is not finite; lower training.learning_rate (try 1e-4), increase training.warmup_iters, "
    "keep training.grad_clip at 1.0, check the data, or use training.dtype fp32"
)

# An embedding may be padded past the tokenizer's vocabulary up to this multiple (GPT-2's 50257
# to 50304 is a little faster on GPUs); more rows than that are never used, and were a mistake.
VOCAB_PADDING = 128


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    best_val_loss: Optional[float]
    final_val_loss: Optional[float]
    losses: list[float] = field(default_factory=list)  # train loss of every optimizer step
    checkpoint: Optional[Path] = None
    interrupted: bool = False
    seconds: float = 0.0
    config: Optional[Config] = None  # as resolved for the run (the caller's is left as it was)


# The signals that ask a run to stop cleanly: Ctrl-C, and how schedulers (SLURM, Kubernetes,
# systemd, torchrun passing on its own) stop a job. SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


class _StopFlag:
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP asks the loop to stop after the current step and
    save; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # not the main thread (or not settable here): leave it alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows a float (a diverged run's loss can pass 709)."""
    return math.exp(loss) if loss < 709 else math.inf


class Trainer:
    """Holds the state of one run: ``setup()`` builds it, ``run()`` trains; see :func:`train`.

    The ``config`` passed in is never changed. ``trainer.config`` is a resolved copy: the
    accumulation steps a global batch implies, and after :meth:`setup` a fine-tuning run's
    architecture and the tokenizer's vocabulary size. It is what checkpoints record. The
    device and dtype that ``auto`` picks are ``trainer.device`` and ``trainer.dtype``; the
    recorded config keeps ``auto``, so that it runs on other machines too.
    """

    def __init__(self, config: Config, *, resume: bool = False, progress: bool = True,
                 log: Any = print, force: bool = False, started: Optional[float] = None):
        self.resume = resume
        self._started = started  # what training.max_seconds counts from (None: set-up)
        self.force = force  # skip the memory check (_check_memory)
        self.progress = progress
        self.log = log
        self.device = resolve_device(config.training.device)
        config = copy.deepcopy(config)  # the caller's stays as passed
        # Resolved (and checked) before joining a process group, so that a bad global batch
        # fails every rank at once.
        training = resolve_global_batch(config.training, planned_world_size(config.training))
        self.config: Config = dataclasses.replace(config, training=training)
        self.config.check_batch_is_indexable()  # a size no device holds, --force or not; before out_dir
        check_optimizer_supported(self.config)
        self.dist: DistributedContext = init_distributed(self.t, self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._tf32_before = allow_tf32_on_cuda(self.device)  # restored by close()
        self.dtype = resolve_dtype(self.t.dtype, self.device)
        self.out_dir = Path(self.t.out_dir)
        self._run_lock: Optional[RunLock] = None  # rank 0's, from setup() to close()

        # Built by setup(), in this order.
        self.data: Optional[PreparedData] = None
        self.tokenizer: Any = None
        self.provenance: dict[str, Any] = {}  # checkpoint.json keys carried on from the base (_base_provenance)
        self.train_sampler: Optional[RandomBatchSampler] = None
        self.model: Optional[Transformer] = None  # evaluation and checkpoints use it directly
        self._base_weights_hash: Optional[str] = None  # of a LoRA run's frozen base
        self.step_model: Optional[torch.nn.Module] = None  # the training step's: compiled, DDP or FSDP
        self.trainable_params: list[torch.nn.Parameter] = []
        self.optimizer: Any = None  # AdamW, or MuonWithAdamW (training/muon.py)
        self.scaler: Optional[torch.amp.GradScaler] = None
        self._skips_on_device = False  # whether fused AdamW skips non-finite steps by itself (Muon does not)
        self.metrics: Optional[MetricsLogger] = None  # rank 0 only

        # Where the run stands: from step 0, or from a resumed checkpoint.
        self.step = 0
        self.best_val_loss: Optional[float] = None
        self.bad_steps = 0  # non-finite steps in a row
        # Steps whose loss, gradient norm and finiteness the host has not read yet: (step, tensors).
        self._pending: list[tuple[int, torch.Tensor]] = []
        # A stop signal (Ctrl-C, SIGTERM, SIGHUP) seen by this process, and whether any rank's has
        # reached the host here: ranks agree through the loss's all-reduce, so all stop at one step.
        self._stop_requested_here = False
        self.stop_agreed = False

    @property
    def t(self) -> TrainingConfig:
        """The resolved training section."""
        return self.config.training

    # -- set-up -------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.dist.is_main and self.log is not None:
            self.log(message)

    def setup(self) -> None:
        """Build the run, each piece once, in one order: the data and the resolved config; the
        model (fresh, or a base checkpoint's weights); LoRA; the wrapping (compile, DDP or
        FSDP); the optimizer; then, when resuming, all of the checkpoint's state."""
        self.budget = TimeBudget(self.t.max_seconds, started=self._started)  # the run's clock
        seed_everything(self.t.seed)
        if not (self.resume or self.t.init_from):  # else the tokenizer is the checkpoint's
            check_data_settings(self.config.data)
        if self.resume and not self.out_dir.is_dir():  # refused before the lock makes the directory
            raise UserError(f"there is no run directory {str(self.out_dir)!r} to resume; check training.out_dir "
                            "(the run's directory), or start a new run without resuming")
        if self.dist.is_main:  # one writer per run directory, locked before anything is written there
            self._run_lock = acquire_run_lock(self.out_dir)
            ckpt.remove_stale_pointer_temps(self.out_dir)  # a killed run's, safe to remove under the lock
        resume_dir, base_dir = self._checkpoints_to_read()
        self._resolve_schedule(resume_dir)
        self._prepare_data_and_config(resume_dir, base_dir)
        if resume_dir is not None:
            self._check_resumable(resume_dir)
        self._check_memory()
        self.model = self._build_model(base_dir)
        self._apply_lora()
        torch.manual_seed(self.t.seed + self.dist.rank)  # the init above is shared; dropout masks differ per rank
        self.step_model = wrap_model(self.model, self.dist, self.device, compile=self.t.compile, dtype=self.dtype)
        self._build_optimizer()  # after wrapping: FSDP swapped in the sharded parameters it must hold
        if resume_dir is not None:
            self._load_resume_state(resume_dir)
        if self.config.advanced.use_lora:
            # The frozen base, hashed once it holds its final weights (a resumed run's come from
            # its checkpoint), for the adapter to name the base it was trained on.
            self._base_weights_hash = base_weights_hash(self.model)
        self._open_outputs(resumed=resume_dir is not None)
        self._describe()
        if self.config.advanced.quantize:
            q = self.config.advanced.quantize
            self._say(f"note: advanced.quantize {q} applies when generating: this run trains and saves "
                      f"full-precision weights, `generate` quantizes them to {q} on load (it reads "
                      f"the run's config), and `mini-transformer quantize --mode {q}` writes a compact copy")

    def _checkpoints_to_read(self) -> tuple[Optional[Path], Optional[Path]]:
        """(the checkpoint to resume, the base checkpoint to fine-tune); either may be None."""
        t = self.t
        resume_dir = ckpt.resolve_checkpoint(self.out_dir, prefer="latest") if self.resume else None
        base_dir = _resolve_base(t.init_from) if t.init_from and not self.resume else None
        if not self.resume:  # on every rank, so that all of them stop, not only rank 0
            _refuse_to_overwrite(self.out_dir)
        if self.config.advanced.use_lora and not t.init_from:
            raise UserError("advanced.use_lora trains adapters on top of a trained model: set training.init_from "
                            "to its checkpoint")
        return resume_dir, base_dir

    def _resolve_schedule(self, resume_dir: Optional[Path]) -> None:
        """The warmup and decay this run trains with (see :func:`resolve_schedule`); a resumed
        run keeps its checkpoint's where they follow max_iters."""
        saved = ckpt.read_config(resume_dir).training if resume_dir is not None else None
        training, lines = resolve_schedule(self.config, saved)
        self.config = dataclasses.replace(self.config, training=training)
        for line in lines:
            self._say(line)

    def _prepare_data_and_config(self, resume_dir: Optional[Path], base_dir: Optional[Path]) -> None:
        """Tokenize the data and resolve the model section: a fine-tuning run has its base's
        architecture (a resumed one its checkpoint's) with this run's dropout, and
        ``vocab_size`` defaults to the tokenizer's."""
        t, model = self.t, self.config.model
        arch_dir = base_dir or (resume_dir if t.init_from else None)
        if arch_dir is not None:
            model = dataclasses.replace(_base_model_config(arch_dir, model.block_size), dropout=model.dropout)
            self.provenance = _base_provenance(arch_dir)
            self._say_unused_model_keys(arch_dir, model)
        # The tokenizer of a checkpoint wins: resumed and fine-tuned runs must encode the same way.
        tokenizer = _base_tokenizer(resume_dir or base_dir, model.vocab_size) if (resume_dir or base_dir) else None
        self.data = prepare_dataset(self.config.data, tokenizer=tokenizer, progress=self.progress and self.dist.is_main,
                                    dist=self.dist)
        self.tokenizer = self.data.tokenizer
        vocab = self.tokenizer.vocab_size
        if model.vocab_size is None:
            model = dataclasses.replace(model, vocab_size=vocab)
        elif model.vocab_size < vocab:
            raise UserError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's "
                            f"vocabulary ({vocab}); remove model.vocab_size or set it to at least {vocab}")
        elif arch_dir is None and resume_dir is None and model.vocab_size > -(-vocab // VOCAB_PADDING) * VOCAB_PADDING:
            gpt2 = " (for GPT-2's vocabulary set data.tokenizer gpt2)" if model.vocab_size in (50257, 50304) else ""
            raise UserError(f"model.vocab_size ({model.vocab_size}) is far above the {self.tokenizer.kind} "
                            f"tokenizer's {vocab} tokens: {model.vocab_size - vocab:,} embedding rows would never be "
                            f"used; remove model.vocab_size, it defaults to the tokenizer's{gpt2}")
        check_split_lengths(self.data, model.block_size)
        self.config = dataclasses.replace(self.config, model=model)
        self.config.validate()
        self.train_sampler = RandomBatchSampler(
            self.data.train, batch_size=t.batch_size, block_size=model.block_size, seed=t.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, device=self.device)

    def _say_unused_model_keys(self, arch_dir: Path, model: ModelConfig) -> None:
        """One line when the model section sets keys that the base's architecture replaces."""
        unused = [f"{f.name} {getattr(self.config.model, f.name)}" for f in dataclasses.fields(ModelConfig)
                  if f.name != "dropout" and self.config.is_set(f"model.{f.name}")
                  and getattr(self.config.model, f.name) != getattr(model, f.name)]
        if unused:
            self._say(f"note: the model is training.init_from's ({arch_dir}: d_model {model.d_model}, "
                      f"{model.n_layers} layers, {model.n_heads} heads, context {model.block_size}); the model "
                      f"section's {', '.join(unused)} do not apply (dropout does)")

    def _check_resumable(self, directory: Path) -> None:
        """Refuse a checkpoint of another model shape, or of the other optimizer, before building
        anything. (A checkpoint from before training.optimizer existed reads as adamw.)"""
        saved = ckpt.read_config(directory)
        if ckpt.model_fingerprint(saved.model) != ckpt.model_fingerprint(self.config.model):
            raise UserError(f"the checkpoint to resume in {directory} is of a different model shape "
                            f"({_shape(saved)} vs {_shape(self.config)}); resume with its config, or start a new "
                            "run in another training.out_dir")
        if saved.training.optimizer != self.t.optimizer:
            raise UserError(f"the checkpoint to resume in {directory} was trained with training.optimizer "
                            f"{saved.training.optimizer}, not {self.t.optimizer}; resume with training.optimizer "
                            f"{saved.training.optimizer}, or start a new run in another training.out_dir with "
                            f"training.init_from {directory}")

    def _check_memory(self) -> None:
        """Refuse a run whose estimate exceeds the memory the device has, before the model exists:
        at once, in one line, instead of allocating until the allocator throws."""
        if self.force:
            return
        need = training_need(self.config, self.dtype, shards=self.dist.world_size if self.dist.fsdp else 1)
        what = "training"
        # The processes of one machine share its RAM; each GPU is its own rank's.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type != "cuda" else 1
        if local > 1:
            need = {part: local * n for part, n in need.items()}
            what = f"training in {local} processes"
        refuse_if_too_large(what, need, self.device, lambda available: training_fix(self.config, need, available))

    def _build_model(self, base_dir: Optional[Path]) -> Transformer:
        torch.manual_seed(self.t.seed)  # the same initial weights on every rank
        model = Transformer(self.config.model).to(self.device)
        if base_dir is not None:
            ckpt.load_weights_into(model, _base_weights(base_dir, self.config.model), base_dir)
            self._say(f"initialised from {base_dir}")
        model.gradient_checkpointing = self.t.gradient_checkpointing
        return model

    def _apply_lora(self) -> None:
        a = self.config.advanced
        if not a.use_lora:
            return
        apply_lora(self.model, rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                   targets=tuple(a.lora_targets))
        trainable, total, fraction = lora_parameter_counts(self.model)
        self._say(f"LoRA rank {a.lora_rank}: {trainable:,} trainable of {total:,} parameters ({fraction:.2%})")

    def _build_optimizer(self) -> None:
        """The optimizer over the trainable parameters (under FSDP, their shards), and the fp16 loss scaler."""
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.t, self.device, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        # Fused AdamW can skip a non-finite step on the device (its found_inf input, which
        # GradScaler uses), so the host need not wait for each step's loss. fp16 loss scaling
        # and FSDP's sharded norms keep the host-side decision, as does Muon (no found_inf input).
        self._skips_on_device = isinstance(self.optimizer, torch.optim.AdamW) \
            and bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled() and self.dist.mode != "fsdp"

    def _load_resume_state(self, directory: Path) -> None:
        """Everything a resumed run continues from: the weights, the optimizer and loss-scaler
        state, the batch sampler's position, the step and best loss, and (last, since building
        the model drew from them) the RNGs."""
        weights = ckpt.read_weights(directory / ckpt.WEIGHTS_FILE)
        # Into the wrapped model: under FSDP each rank keeps its shard of the full weights.
        ckpt.load_weights_into(self.model, shard_full_state(self.model, weights, self.dist), directory)
        state = ckpt.read_train_state(directory, required=("step", "optimizer", "scaler", "sampler", "rng"))
        try:
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist)
            self.scaler.load_state_dict(state["scaler"])
            self.train_sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            self.best_val_loss = state.get("best_val_loss")
            rngs = state["rng"]
            if isinstance(rngs, list) and self.dist.rank >= len(rngs):  # more ranks than the saving run had
                set_rng_state(rngs[0])
                torch.manual_seed(self.t.seed + self.dist.rank + 1_000_003 * self.step)
            else:
                set_rng_state(rngs[self.dist.rank] if isinstance(rngs, list) else rngs)
        except (KeyError, ValueError, TypeError, IndexError) as exc:  # right keys, wrong contents
            raise ckpt.not_resumable(directory / ckpt.STATE_FILE, f"{type(exc).__name__}: {first_line(exc, 120)}") \
                from None
        self._say(f"resumed from {directory} at step {self.step}")

    def _open_outputs(self, resumed: bool) -> None:
        """Rank 0 alone writes: the metrics log (a resumed run's cut back to its step) and the config."""
        if not self.dist.is_main:
            return
        self.metrics = MetricsLogger(self.out_dir, tensorboard=self.t.tensorboard,
                                     resume_step=self.step if resumed else None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out_dir / "config.yaml")

    def _describe(self) -> None:
        t, m = self.t, self.config.model
        params = count_parameters(m)
        global_batch = t.batch_size * t.gradient_accumulation_steps * self.dist.world_size
        self._say(
            f"model: {params.total:,} parameters ({params.non_embedding:,} non-embedding), "
            f"vocab {m.vocab_size} ({self.tokenizer.kind}), context {m.block_size}")
        self._say(
            f"training on {self.device} in {dtype_name(self.dtype)}"
            f"{' x' + str(self.dist.world_size) + ' processes (' + self.dist.mode + ')' if self.dist.enabled else ''}: "
            f"global batch {global_batch} sequences (batch {t.batch_size} x accumulation "
            f"{t.gradient_accumulation_steps} x {self.dist.world_size} process{'es' if self.dist.enabled else ''}) = "
            f"{global_batch * m.block_size:,} tokens per step, "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens")

    # -- one optimizer step ---------------------------------------------------------------------
    def _train_step(self, lr: float) -> None:
        """Forward, backward, clip and optimizer step; the loss and norm wait in ``self._pending``.

        Why no ``.item()`` here: reading a value makes the host wait until the device has
        finished the step, so a GPU would idle while the host queues the next one. Where fused
        AdamW skips non-finite steps by itself, the values are read by :meth:`_settle` every
        few steps instead. Elsewhere the step is decided on the host at once, and the loop
        settles every step.
        """
        t = self.t
        set_learning_rates(self.optimizer, lr, t)  # lr is AdamW's; Muon's is as far along its own
        accum = t.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.train_sampler.next_batch()
            # Gradients are all-reduced only on the last micro-step.
            with gradient_sync(self.step_model, self.dist, enabled=micro == accum - 1):
                with autocast(self.device, self.dtype):
                    loss = self.step_model(x, y).loss / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        # This rank's stop request rides on the loss's all-reduce (no extra collective): its mean
        # is above 0 on every rank once any rank was asked to stop.
        stop_here = torch.full((), float(self._stop_requested_here), device=self.device)  # a fill, no copy
        loss, stop = all_reduce_mean(torch.stack([total, stop_here]), self.dist).unbind()
        if self._skips_on_device:
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            # Where found_inf is 1, fused AdamW leaves weights, moments and step count alone.
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self.optimizer.zero_grad(set_to_none=True)
            self._pending.append((self.step + 1, torch.stack([loss.float(), grad_norm.float(), finite.float(),
                                                             stop.float()])))
            return
        loss_value, stop_value = torch.stack([loss, stop]).tolist()
        norm_value = local_scalar(grad_norm)
        # With fp16 loss scaling an inf gradient is the scaler's business: it skips and rescales.
        finite = math.isfinite(loss_value) and (self.scaler.is_enabled() or math.isfinite(norm_value))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # after an overflow, lowers the scale
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((self.step + 1, torch.tensor([loss_value, norm_value, float(finite), stop_value])))

    def _settle(self) -> list[tuple[float, float]]:
        """Read the pending steps' (loss, grad norm) with one device sync, warn of each skipped
        (non-finite) step, and stop after ``max_bad_steps`` of them in a row."""
        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        values = torch.stack([v.to(self._pending[0][1].device) for _, v in self._pending]).tolist()
        self._pending.clear()
        settled = []
        for step, (loss, norm, finite, stop) in zip(steps, values):
            settled.append((loss, norm))
            if stop > 0:
                self.stop_agreed = True
            if finite:
                self.bad_steps = 0
                continue
            self.bad_steps += 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({loss}); step skipped", stacklevel=2)
            if self.bad_steps >= self.t.max_bad_steps:
                raise UserError(f"{self.bad_steps} steps in a row had a non-finite loss: {TROUBLESHOOTING}")
        return settled

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_loss(self, progress: Any = None) -> dict[str, float]:
        """Mean loss over ``eval_iters`` random batches of each split (seeded by the step);
        ``progress`` (a tqdm bar) advances by one per batch and is closed at the end."""
        self.model.eval()
        result = {}
        for split, tokens in (("train", self.data.train), ("val", self.data.val)):
            sampler = RandomBatchSampler(tokens, batch_size=self.t.batch_size,
                                         block_size=self.config.model.block_size,
                                         seed=self.t.seed + 1_000_003 * (self.step + 1) + (split == "val"),
                                         rank=self.dist.rank, world_size=self.dist.world_size,
                                         device=self.device)
            losses = torch.zeros(self.t.eval_iters, device=self.device)
            for i in range(self.t.eval_iters):
                x, y = sampler.next_batch()
                with autocast(self.device, self.dtype):
                    losses[i] = self.model(x, y).loss
                if progress is not None:
                    progress.update(1)
            result[split] = all_reduce_mean(losses.mean(), self.dist).item()
        self.model.train()
        if progress is not None:
            progress.close()
        return result

    @torch.no_grad()
    def exact_val_loss(self, progress: Any = None) -> float:
        """Token-weighted mean loss over every full window of the whole validation split;
        ``progress`` as in :meth:`estimate_loss`."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        n_batches = forwards = 0
        for i, (x, y) in enumerate(iter_sequential_batches(self.data.val, self.t.batch_size,
                                                           self.config.model.block_size, device=self.device)):
            n_batches = i + 1
            if progress is not None:
                progress.update(1)
            if i % self.dist.world_size != self.dist.rank:
                continue
            with autocast(self.device, self.dtype):
                loss = self.model(x, y).loss
            total += loss.double() * y.numel()
            count += y.numel()
            forwards += 1
        if self.dist.fsdp:  # every forward all-gathers: a rank with a batch fewer runs a dummy one
            dummy = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            for _ in range(-(-n_batches // self.dist.world_size) - forwards):
                self.model(dummy)
        if self.dist.enabled:
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.model.train()
        if progress is not None:
            progress.close()
        return (total / count.clamp(min=1)).item()

    # -- checkpoints ---------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "optimizer": full_optimizer_state_dict(self.model, self.optimizer, self.dist),  # FSDP: gathered
            "scaler": self.scaler.state_dict(),
            "sampler": self.train_sampler.state_dict(),
            "rng": self._gather_rng(),
            "lr": learning_rate_at(self.step, self.t),
        }

    def _gather_rng(self):
        state = rng_state()
        if not self.dist.enabled:
            return state
        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self, is_best: bool = False) -> Optional[Path]:
        state = self.train_state()  # every rank joins the RNG gather (and FSDP's state gathers)
        model = checkpointable_model(self.model, self.dist)  # FSDP: full weights gathered to rank 0
        if not self.dist.is_main:
            return None
        directory = ckpt.save_checkpoint(
            self.out_dir, self.step, model, self.config, self.tokenizer, state,
            best_val_loss=self.best_val_loss, is_best=is_best, keep_last=self.t.keep_last, extra_meta=self.provenance)
        if self.config.advanced.use_lora and (is_best or self.best_val_loss is None):
            # The adapter on its own (a few hundred KB): what `merge` and `generate --adapter` take.
            save_adapter(self.out_dir / "adapter", self.model, weights_hash=self._base_weights_hash)
        return directory

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        t, m = self.t, self.config.model
        budget = self.budget
        started = budget.started
        result = TrainResult(self.out_dir, self.step, self.best_val_loss, None, config=self.config)
        if self.resume and self.step >= t.max_iters:
            self._say(f"the run in {self.out_dir} is already finished (step {self.step} of training.max_iters "
                      f"{t.max_iters}); nothing to do, raise training.max_iters to train it further")
            return result
        # MFU's ceiling: this device's matmul rate in the training dtype, timed now. It is lower
        # than the hardware's rated peak, which real matmuls rarely reach.
        matmul_flops_per_s = measure_matmul_flops(self.device, self.dtype)
        self._say(f"mfu: the model's FLOP rate over this device's {dtype_name(self.dtype)} matmul rate, measured "
                  f"now at {matmul_flops_per_s / 1e12:.3g} TFLOP/s (not the hardware's rated peak)")
        train_flops_per_token = flops_per_token(m)[1]
        tokens_per_step = t.batch_size * m.block_size * t.gradient_accumulation_steps * self.dist.world_size
        self.model.train()
        bar = tqdm(total=t.max_iters, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   unit="it", dynamic_ncols=True, desc="train")
        if self.log is not None and not self.dist.enabled:
            self._say_expected_time(bar)
        throughput = Throughput(tokens_per_step, self.step)
        last_saved: Optional[Path] = None
        if self.step == 0:  # where training starts from: the baseline of the curve (and of fine-tuning)
            with throughput.paused(), budget.timing_evaluation(2 * t.eval_iters, self._exact_val_batches()):
                self._evaluate(lr=learning_rate_at(0, t), bar=bar)
        compiling = t.compile  # the first step waits for torch.compile, minutes on a CPU
        if compiling:
            bar.set_description("train (compiling the model for the first step)")
        with _StopFlag() as stop:
            while self.step < t.max_iters:
                lr = learning_rate_at(self.step, t)
                dropout = dropout_at(self.step, m, t)
                if t.dropout_end is not None:
                    self.model.set_dropout(dropout)
                self._stop_requested_here = stop.requested
                step_started = time.perf_counter()
                self._train_step(lr)
                self.step += 1
                if compiling:
                    compiling = False
                    bar.set_description("train", refresh=False)
                bar.update(1)
                due_to_evaluate = self.step % t.eval_interval == 0
                out_of_time = budget.must_stop(time.perf_counter() - step_started, due_to_evaluate)
                if t.max_seconds is not None:  # each rank's clock differs; all stop at one step
                    out_of_time = any_rank(out_of_time, self.dist, self.device)
                last_step = self.step == t.max_iters or out_of_time
                log_step = self.step % t.log_interval == 0 or self.step == t.max_iters
                eval_step = due_to_evaluate or last_step
                # Read the losses at log and eval steps, and often enough to stop a diverging
                # run within max_bad_steps of its limit. Under torchrun only at steps all ranks
                # read at, for all to see a stop request at the same step.
                asked_alone = stop.requested and not self.dist.enabled
                if (log_step or eval_step or asked_alone or len(self._pending) >= t.max_bad_steps
                        or not self._skips_on_device):
                    settled = self._settle()
                    result.losses.extend(loss for loss, _ in settled)
                    if settled:
                        loss, grad_norm = settled[-1]
                if log_step:
                    now = time.perf_counter()
                    tokens_per_s = throughput.tokens_per_s(self.step)  # evaluation and saving left out
                    mfu = model_flops_utilization(train_flops_per_token, tokens_per_s / self.dist.world_size,
                                                  matmul_flops_per_s)
                    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s "
                                        f"mfu {mfu:.1%} of measured matmul")
                    # mfu's denominator goes with it: a figure of this machine, not a spec sheet's.
                    self._record({"iter": self.step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens_per_s": tokens_per_s, "mfu": mfu, "matmul_flops_per_s": matmul_flops_per_s,
                                  "dropout": dropout, "time_s": now - started})
                if eval_step:
                    with throughput.paused(), budget.timing_evaluation(2 * t.eval_iters, self._exact_val_batches()):
                        improved = self._evaluate(lr, bar)
                        if improved or t.always_save_checkpoint or last_step:
                            last_saved = self.save(is_best=improved) or last_saved
                if out_of_time:
                    self._say(f"stopping at step {self.step}: training.max_seconds ({t.max_seconds:g} s) reached")
                    break
                if self.stop_agreed or asked_alone:
                    last_saved = self.save() or last_saved
                    bar.close()
                    self._say(f"interrupted at step {self.step}; checkpoint saved in {self.out_dir}, "
                              "resume the run to continue")
                    result.interrupted = True
                    break
            result.losses.extend(loss for loss, _ in self._settle())  # a Ctrl-C between two reads
        bar.close()
        if not result.interrupted:
            val = self.exact_val_loss(progress=self._eval_bar(self._exact_val_batches(), "final val loss (whole split)"))
            result.final_val_loss = val
            self._record({"iter": self.step, "final_val_loss": val, "val_ppl": perplexity(val),
                          "time_s": time.perf_counter() - started, "final": True})
            self._say(f"final: exact val loss {val:.4f} (ppl {perplexity(val):.2f}) over the whole val split; "
                      f"best checkpoint in {self.out_dir}")
        result.step, result.best_val_loss, result.checkpoint = self.step, self.best_val_loss, last_saved
        result.seconds = time.perf_counter() - started
        return result

    def _eval_bar(self, total: int, desc: str):
        """A second progress bar, under the training bar, for an evaluation (gone when it ends)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, position=1, unit="batch", dynamic_ncols=True,
                    disable=not (self.progress and self.dist.is_main))

    def _exact_val_batches(self) -> int:
        windows = (len(self.data.val) - 1) // self.config.model.block_size
        return -(-windows // self.t.batch_size) + 1  # and the tail

    # -- the expected duration ----------------------------------------------------------------
    def _say_expected_time(self, bar) -> None:
        """Before the first evaluation, the run's expected wall time on this device, from a step
        of the plain model timed now and undone (gradients dropped, RNG states restored)."""
        bar.set_description("train (timing a step)")
        state = rng_state()
        try:
            step_s, evaluation_batch_s = time_a_step(self.model, self.data.train, self.config, self.device,
                                                     self.dtype)
        finally:
            set_rng_state(state)
            bar.set_description("train")
        for line in expected_time_lines(self.config, self.step, self.device, step_s, evaluation_batch_s,
                                        self._exact_val_batches()):
            self._say(line)

    def _evaluate(self, lr: float, bar) -> bool:
        """Estimate train/val loss, log them, and track the best; True if val loss improved."""
        bar.set_description("train (evaluating)")
        try:
            losses = self.estimate_loss(progress=self._eval_bar(2 * self.t.eval_iters, f"eval at step {self.step}"))
        finally:
            bar.set_description("train")
        improved = self.best_val_loss is None or losses["val"] < self.best_val_loss
        if improved and self.step > 0:
            self.best_val_loss = losses["val"]
        if self.dist.is_main and self.log is not None:
            bar.write(f"step {self.step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val ppl {perplexity(losses['val']):.2f}")
        self._record({"iter": self.step, "eval_train_loss": losses["train"], "val_loss": losses["val"],
                      "val_ppl": perplexity(losses["val"]), "lr": lr, "time_s": self.budget.elapsed()})
        return improved

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.dist.enabled:
            # Free DDP/FSDP (which hold the process group) while Python is fully alive: left to
            # interpreter exit, gloo's teardown aborts the process now and then after a good run.
            self.step_model = self.model = self.optimizer = None
            gc.collect()
        shutdown(self.dist)
        restore_tf32(self._tf32_before)
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None


def _refuse_to_overwrite(out_dir: Path) -> None:
    """A fresh run never mixes its checkpoints with an earlier run's."""
    if any(out_dir.glob(f"{ckpt.CHECKPOINT_PREFIX}*")):
        raise SettingError(f"{out_dir} already holds checkpoints of a run; set training.out_dir to a new "
                           "directory (or delete the old one), or resume the run", fixes=[{"resume": ""}])


# -- the base of a fine-tuning run: a checkpoint of ours, or a Hugging Face model directory read in
# memory by the same code as `mini-transformer import` (mini_transformer/interop/hf/importer.py).

def _resolve_base(init_from: str) -> Path:
    if is_hf_directory(init_from):
        return Path(init_from)
    directory = ckpt.resolve_checkpoint(init_from, prefer="best")
    ckpt.refuse_quantized_base(directory)
    return directory


def _base_model_config(directory: Path, block_size: int) -> ModelConfig:
    """The base's architecture. An HF directory's context is the run's ``block_size``, up to its
    ``max_position_embeddings`` (RoPE depends on the position only: a shorter context computes
    the same function), so fine-tuning does not train on windows of, say, 131072 tokens."""
    if not is_hf_directory(directory):
        return ckpt.read_config(directory).model
    config = hf_model_config(directory)
    return dataclasses.replace(config, block_size=min(block_size, config.block_size))


def _base_provenance(directory: Path) -> dict[str, Any]:
    """Where the base's weights came from (:data:`~mini_transformer.checkpoint.PROVENANCE_KEYS`),
    for the run's checkpoints: an HF directory's own context survives the shorter ``block_size``,
    and export writes it back."""
    return hf_provenance(directory) if is_hf_directory(directory) else ckpt.read_provenance(directory)


def _base_tokenizer(directory: Path, vocab_size: Optional[int]):
    if not is_hf_directory(directory):  # checked against the checkpoint's own model
        return ckpt.load_tokenizer_from(directory, ckpt.read_config(directory).model.vocab_size)
    return read_hf_tokenizer(directory, vocab_size)  # its ids must fit the model's embedding


def _base_weights(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    if not is_hf_directory(directory):
        return ckpt.read_weights(directory / ckpt.WEIGHTS_FILE)
    return read_hf_weights(directory, config)


def _shape(config: Config) -> str:
    m = config.model
    return f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}"


def train(config: Config, *, resume: bool = False, progress: bool = True, log: Any = print,
          force: bool = False, started: Optional[float] = None) -> TrainResult:
    """Train with ``config`` (left unchanged); returns the final step, losses, the best/final val
    loss and the config as resolved for the run. A run whose memory estimate exceeds what the
    device has is refused before the model is built, unless ``force``. ``started``: the
    ``time.perf_counter()`` that ``training.max_seconds`` counts from (default: now; the train
    command passes its process's start, so that the budget holds the whole command)."""
    trainer = Trainer(config, resume=resume, progress=progress, log=log, force=force, started=started)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
