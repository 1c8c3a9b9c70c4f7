"""``mini-transformer generate`` (and ``python generate.py``): sample text from a trained checkpoint.

Settings come, lowest first, from the checkpoint's saved config (its ``generation`` and
``advanced`` sections), a ``--config`` file, ``--generation.KEY VALUE`` overrides, and the flags.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..config import Config, GenerationConfig, merge_into, parse_overrides
from ..errors import UserError
from .common import add_command

EXAMPLES = """\
  python generate.py --prompt "Once upon a time" --max_tokens 200
  python generate.py --interactive
  python generate.py --prompt "Hello" --stream
  python generate.py --prompt "The" --temperature 0.9 --top_k 50 --top_p 0.95
  mini-transformer generate --checkpoint out/ckpt-00005000 --prompt "ROMEO:" --num_samples 3 --seed 1
  mini-transformer generate --prompts_file prompts.txt --max_tokens 50 --temperature 0
  mini-transformer generate --prompt "def " --stop "\\n\\n" --repetition_penalty 1.1 --min_p 0.05
  mini-transformer generate --prompt "ROMEO:" --draft_checkpoint out_draft --compare_plain
  mini-transformer generate --prompt "ROMEO:" --max_tokens 40 --log_attention --attention_dir att
  mini-transformer generate --prompt "ROMEO:" --device cuda --dtype bf16 --compile

interactive commands: /temp 0.8  /top_k 50  /top_p 0.9  /max_tokens 100  /reset  /help  /quit
  (Ctrl-C stops the current generation, Ctrl-D or /quit leaves)
"""

REPL_HELP = """\
commands:
  /temp T          sampling temperature (0 = greedy)
  /top_k K         keep the K most likely tokens (/top_k off to disable)
  /top_p P         nucleus sampling, 0 < P <= 1 (/top_p off to disable)
  /max_tokens N    tokens to generate per turn
  /reset           forget the conversation so far (settings stay)
  /settings        show the current settings
  /help            this help
  /quit            leave (or Ctrl-D)
Each line you type continues the text so far; an empty line continues without new input.
Ctrl-C stops the current generation."""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "generate", help="generate text from a trained checkpoint",
        description="Generate text from a trained checkpoint: one prompt, a file of prompts as one batch, "
                    "or an interactive session. Sampling defaults come from the checkpoint's saved config; "
                    "any --generation.KEY or --advanced.KEY can also be overridden.",
        examples=EXAMPLES)
    what = parser.add_argument_group("what to generate")
    what.add_argument("--prompt", help="the text to continue (empty: start from a newline or end-of-text)")
    what.add_argument("--prompts_file", metavar="FILE", help="one prompt per line, generated together as one batch")
    what.add_argument("--interactive", action="store_true", help="an interactive session (type /help inside)")
    what.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    what.add_argument("--num_samples", type=int, help="samples per prompt (default: generation.num_samples)")
    what.add_argument("--max_tokens", type=int, help="new tokens per sample (default: generation.max_tokens)")
    what.add_argument("--stop", action="append", metavar="TEXT",
                      help="stop when this text appears (not printed); repeatable; \\n means newline")
    sampling = parser.add_argument_group("sampling (applied in this order)")
    sampling.add_argument("--repetition_penalty", type=float, help="> 1 discourages repeating tokens (1.0: off)")
    sampling.add_argument("--temperature", type=float, help="0 = greedy; 0.1-0.5 focused, 0.8-1.0 balanced, >1 wild")
    sampling.add_argument("--top_k", type=int, help="keep the K most likely tokens (20-50 works well)")
    sampling.add_argument("--top_p", type=float,
                          help="keep the most likely tokens up to total probability P (0.9-0.95)")
    sampling.add_argument("--min_p", type=float, help="drop tokens less likely than MIN_P x the top token")
    sampling.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="a checkpoint directory or a run's out_dir (default: training.out_dir, 'out')")
    model.add_argument("--config", metavar="FILE", help="a YAML config whose generation/advanced sections apply")
    model.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    model.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                       help="the weights' precision while generating (default: generation.decode_dtype, auto: "
                            "bf16 on CUDA, the checkpoint's fp32 elsewhere)")
    model.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile (a few seconds up front, faster "
                            "tokens after; for long or repeated generations)")
    model.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (from finetune) to apply to the checkpoint")
    model.add_argument("--quantize", choices=["int8", "int4"],
                       help="quantize the weights on load (same as --advanced.quantize)")
    extras = parser.add_argument_group("speculative decoding and attention maps")
    extras.add_argument("--draft_checkpoint", metavar="DIR",
                        help="a small draft model with the same tokenizer: speculative decoding")
    extras.add_argument("--gamma", type=int, help="draft tokens per round (default: advanced.speculative_gamma)")
    extras.add_argument("--compare_plain", action="store_true",
                        help="with --draft_checkpoint: also time plain decoding and print the speedup")
    extras.add_argument("--log_attention", action="store_true",
                        help="save every layer's and head's attention to .npz and a PNG grid")
    extras.add_argument("--attention_dir", default="attention", metavar="DIR",
                        help="where --log_attention writes (default: attention)")
    parser.set_defaults(run=run, accepts_overrides=True)


# -- settings -------------------------------------------------------------------------------

@dataclass
class Settings:
    """Everything that shapes one generation, after all sources are merged."""

    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    min_p: Optional[float]
    repetition_penalty: float
    num_samples: int
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    context_keep: Optional[int] = None
    compile: bool = False

    def sampling(self) -> dict[str, Any]:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty)

    def validate(self) -> None:
        from ..generation import SamplingParams

        SamplingParams(**self.sampling())  # raises UserError naming the flag
        if self.max_tokens < 0:
            raise UserError(f"--max_tokens must be >= 0, got {self.max_tokens}")
        if self.num_samples <= 0:
            raise UserError(f"--num_samples must be >= 1, got {self.num_samples}")


def check_flags(args: argparse.Namespace) -> None:
    """Reject bad flag values before any checkpoint is loaded (a one-line error, exit 2)."""
    from ..generation import SamplingParams

    SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty)
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0, got {args.max_tokens}")
    if args.num_samples is not None and args.num_samples <= 0:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.gamma is not None and args.gamma <= 0:
        raise UserError(f"--gamma must be >= 1, got {args.gamma}; 4 is a good start")
    chosen = [name for name, on in [("--prompt", args.prompt is not None), ("--prompts_file", bool(args.prompts_file)),
                                    ("--interactive", args.interactive)] if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} can't be combined; choose one")


def read_config_sections(path: Optional[str], overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw sections of ``--config`` and of the dotted overrides that generation may use."""
    file_raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path!r} not found; check the path")
        try:
            file_raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise UserError(f"config file {path!r} is not valid YAML; fix its syntax") from None
        if not isinstance(file_raw, dict):
            raise UserError(f"config file {path!r} must hold a mapping of sections")
    override_raw = parse_overrides(overrides)
    for section in override_raw:
        if section not in ("generation", "advanced", "training"):
            raise UserError(f"generate takes --generation.KEY and --advanced.KEY overrides, not --{section}.*; "
                            "the model comes from the checkpoint")
    return file_raw, override_raw


def merged_config(base: Config, file_raw: dict[str, Any], override_raw: dict[str, Any], source: str) -> Config:
    """``base`` (the checkpoint's config) with the generation-relevant parts of the file and overrides."""
    keep = ("generation", "advanced")
    merge_into(base, {k: v for k, v in file_raw.items() if k in keep}, source)
    merge_into(base, {k: v for k, v in override_raw.items() if k in keep}, "command line")
    return base


def settings_from(gen: GenerationConfig, args: argparse.Namespace) -> Settings:
    def pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    # "\n" and "\t" typed in a shell arrive as two characters; they mean newline and tab.
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop] if args.stop else list(gen.stop)
    settings = Settings(
        max_tokens=pick(args.max_tokens, gen.max_tokens), temperature=pick(args.temperature, gen.temperature),
        top_k=pick(args.top_k, gen.top_k), top_p=pick(args.top_p, gen.top_p), min_p=pick(args.min_p, gen.min_p),
        repetition_penalty=pick(args.repetition_penalty, gen.repetition_penalty),
        num_samples=pick(args.num_samples, gen.num_samples), stop=stop, seed=args.seed,
        context_keep=gen.context_keep, compile=args.compile or gen.compile_decode)
    settings.validate()
    return settings


def default_checkpoint(args: argparse.Namespace, file_raw: dict[str, Any], override_raw: dict[str, Any]) -> str:
    if args.checkpoint:
        return args.checkpoint
    for raw in (override_raw, file_raw):
        out_dir = (raw.get("training") or {}).get("out_dir") if isinstance(raw.get("training"), dict) else None
        if out_dir:
            return str(out_dir)
    return Config().training.out_dir


# -- running --------------------------------------------------------------------------------

def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..checkpoint import load_for_inference, read_config, resolve_checkpoint
    from ..device import allow_tf32_on_cuda, inference_dtype, resolve_device

    check_flags(args)
    file_raw, override_raw = read_config_sections(args.config, overrides)
    device = resolve_device(args.device)
    allow_tf32_on_cuda(device)
    checkpoint = default_checkpoint(args, file_raw, override_raw)
    # The settings first (the checkpoint's config, the file, the overrides): a bad --dtype is
    # refused before the weights load, and the weights are cast before they move to the device.
    config = merged_config(read_config(resolve_checkpoint(checkpoint, prefer="best")), file_raw, override_raw,
                           args.config or "config")
    dtype = inference_dtype(args.dtype or config.generation.decode_dtype, device)
    model, _, tokenizer = load_for_inference(checkpoint, device, adapter=args.adapter, dtype=dtype)
    model = quantize_on_load(model, args.quantize or config.advanced.quantize, config)
    settings = settings_from(config.generation, args)
    session = Session(model, tokenizer, settings, device)
    draft_dir = args.draft_checkpoint or (config.advanced.draft_checkpoint if config.advanced.speculative_sampling
                                          else None)
    if config.advanced.speculative_sampling and not draft_dir:
        raise UserError("advanced.speculative_sampling is on but no draft model is set; "
                        "pass --draft_checkpoint DIR or set advanced.draft_checkpoint")
    if draft_dir:
        draft_model, _, draft_tokenizer = load_for_inference(draft_dir, device, dtype=dtype)
        session.set_draft(draft_model, draft_tokenizer, gamma=args.gamma or config.advanced.speculative_gamma)
        if settings.compile:
            note("--compile applies to plain decoding; speculative decoding runs uncompiled "
                 "(and so does its --compare_plain baseline, to compare like with like)")
    log_attention = args.log_attention or config.advanced.log_attention
    if log_attention and (args.interactive or args.prompts_file):
        note("attention maps are logged for --prompt only")
    if args.interactive:
        return Repl(session).loop()
    if args.prompts_file:
        return run_batch(session, read_prompts(args.prompts_file), args.stream)
    generated = session.run_prompt(args.prompt or "", stream=args.stream, compare_plain=args.compare_plain)
    if log_attention:
        session.log_attention(generated, args.attention_dir)
    return 0


def quantize_on_load(model, mode: Optional[str], config: Config):
    """The seed's ``advanced.quantize``: weight-only int8/int4 for a smaller, faster model."""
    from ..quantize import is_quantized, quantize_model

    if mode is None or is_quantized(model):
        return model
    device = next(model.buffers()).device
    return quantize_model(model.cpu(), mode, config.advanced.quantize_group_size,
                          include_embedding=config.advanced.quantize_embedding).to(device).eval()


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path!r} not found; write one prompt per line")
    prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path!r} has no prompts; write one prompt per line")
    return prompts


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class Session:
    """A loaded model and tokenizer with the current settings; turns text into text."""

    def __init__(self, model, tokenizer, settings: Settings, device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.draft = None
        self.gamma = 4
        self.stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def set_draft(self, draft, draft_tokenizer, gamma: int) -> None:
        if draft_tokenizer.vocab_size != self.tokenizer.vocab_size or draft_tokenizer.kind != self.tokenizer.kind:
            raise UserError(f"the draft's tokenizer ({draft_tokenizer.kind}, {draft_tokenizer.vocab_size} tokens) "
                            f"differs from the target's ({self.tokenizer.kind}, {self.tokenizer.vocab_size}); "
                            "train the draft on the same prepared data")
        self.draft, self.gamma = draft, gamma

    # -- text -> ids ---------------------------------------------------------------------
    def encode_prompt(self, text: str, quiet: bool = False) -> list[int]:
        if text:
            ids = self.tokenizer.encode(text)
        else:
            ids = self._empty_prompt(quiet)
        block = self.model.config.block_size
        if len(ids) > block and not quiet:
            note(f"the prompt has {len(ids)} tokens, more than the context of {block}; "
                 f"only its last {block} tokens are used")
        return ids

    def _empty_prompt(self, quiet: bool) -> list[int]:
        try:
            ids = self.tokenizer.encode("\n")
            start = "a newline"
        except UserError:
            ids = []
        if not ids:
            if self.tokenizer.eos_id is None:
                raise UserError("the prompt is empty and this tokenizer has neither a newline nor an end-of-text "
                                "token; pass --prompt TEXT")
            ids, start = [self.tokenizer.eos_id], "the end-of-text token"
        if not quiet:
            note(f"empty prompt: starting from {start}")
        return ids

    # -- generation ----------------------------------------------------------------------
    def token_stream(self, ids: list[int], seed: Optional[int], stats=None):
        from ..generation import generate_stream, speculative_generate_stream

        s = self.settings
        common = dict(max_new_tokens=s.max_tokens, seed=seed, stop_ids=self.stop_ids, context_keep=s.context_keep,
                      **s.sampling())
        with warnings.catch_warnings():  # the crop notice is printed by encode_prompt
            warnings.simplefilter("ignore")
            if self.draft is not None:
                return speculative_generate_stream(self.model, self.draft, ids, gamma=self.gamma, stats=stats,
                                                   **common)
            return generate_stream(self.model, ids, compile=s.compile, **common)

    def seed_for(self, sample: int) -> Optional[int]:
        return None if self.settings.seed is None else self.settings.seed + sample

    def run_prompt(self, prompt: str, stream: bool, compare_plain: bool = False) -> list[int]:
        """Print ``num_samples`` continuations of ``prompt``; return the first sample's token ids."""
        from ..generation import SpeculativeStats, truncate_at_stop

        ids = self.encode_prompt(prompt)
        n = self.settings.num_samples
        if self.draft is None and not stream and n > 1:
            # All samples in one batch: one forward per step for all of them.
            rows = self._batch([ids] * n, [self.seed_for(0)])
            for i, row in enumerate(rows):
                print(f"--- sample {i + 1} ---")
                print(prompt + truncate_at_stop(self.tokenizer.decode(row), self.settings.stop)[0], flush=True)
            return [*ids, *rows[0]]
        first: list[int] = []
        for i in range(n):
            if n > 1:
                print(f"--- sample {i + 1} ---")
            stats = SpeculativeStats() if self.draft is not None else None
            start = time.perf_counter()
            tokens = self._print_one(prompt, ids, self.seed_for(i), stream, stats)
            elapsed = time.perf_counter() - start
            first = first or [*ids, *tokens]
            if stats is not None:
                self._report_speculative(stats, len(tokens), elapsed, ids, self.seed_for(i), compare_plain)
        return first

    def pieces(self, ids: list[int], seed: Optional[int], produced: list[int], stats=None):
        """Text pieces of one generation; the token ids are appended to ``produced`` as they come."""
        from ..generation import stream_text

        def record(tokens):
            for token in tokens:
                produced.append(token)
                yield token

        return stream_text(record(self.token_stream(ids, seed, stats)), self.tokenizer.decode, self.settings.stop)

    def _print_one(self, prompt: str, ids: list[int], seed: Optional[int], stream: bool, stats) -> list[int]:
        tokens: list[int] = []
        pieces = self.pieces(ids, seed, tokens, stats)
        if stream:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(prompt + "".join(pieces))
        sys.stdout.flush()
        return tokens

    def _batch(self, prompts: list[list[int]], seeds: list[Optional[int]]) -> list[list[int]]:
        from ..generation import generate_batch

        s = self.settings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return generate_batch(self.model, prompts, max_new_tokens=s.max_tokens, seed=seeds[0],
                                  stop_ids=self.stop_ids, context_keep=s.context_keep, compile=s.compile,
                                  **s.sampling())

    def _report_speculative(self, stats, n_tokens: int, elapsed: float, ids: list[int], seed: Optional[int],
                            compare_plain: bool) -> None:
        rate = n_tokens / elapsed if elapsed > 0 else float("inf")
        message = (f"speculative: acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted} drafts), "
                   f"{stats.tokens_per_round:.2f} tokens per target forward, {rate:.0f} tokens/s")
        if compare_plain:
            from ..generation import generate

            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plain = generate(self.model, ids, max_new_tokens=n_tokens, seed=seed, stop_ids=self.stop_ids,
                                 **self.settings.sampling())
            plain_rate = len(plain) / max(time.perf_counter() - start, 1e-9)
            message += f"; plain decoding {plain_rate:.0f} tokens/s, speedup {rate / plain_rate:.2f}x"
        print(message, file=sys.stderr, flush=True)

    def log_attention(self, token_ids: list[int], out_dir: str) -> None:
        from ..generation import save_attention
        from ..plot import plot_attention_file

        labels = [self.tokenizer.decode([t]) for t in token_ids]
        npz = save_attention(self.model, token_ids, out_dir, labels=labels)
        png = plot_attention_file(npz)
        note(f"attention maps written to {npz} and {png}")


def run_batch(session: Session, prompts: list[str], stream: bool) -> int:
    """All prompts (x num_samples) in one batch; prints each result after its prompt."""
    from ..generation import truncate_at_stop

    if session.draft is not None:
        raise UserError("--prompts_file can't be combined with --draft_checkpoint (speculative decoding is batch 1); "
                        "use --prompt")
    if stream:
        note("--stream is ignored with --prompts_file: a batch is printed when it is complete")
    n = session.settings.num_samples
    ids = [session.encode_prompt(p, quiet=True) for p in prompts]
    for i, row in enumerate(ids):
        if len(row) > session.model.config.block_size:
            note(f"prompt {i + 1} has {len(row)} tokens; only its last {session.model.config.block_size} are used")
    rows = session._batch([r for r in ids for _ in range(n)], [session.seed_for(0)])
    for i, prompt in enumerate(prompts):
        for j in range(n):
            label = f"--- prompt {i + 1}" + (f", sample {j + 1}" if n > 1 else "") + " ---"
            text = truncate_at_stop(session.tokenizer.decode(rows[i * n + j]), session.settings.stop)[0]
            print(label)
            print(prompt + text, flush=True)
    return 0


# -- interactive ------------------------------------------------------------------------------

class Repl:
    """Read a line, continue the text, print it as it streams; commands start with '/'."""

    def __init__(self, session: Session):
        self.session = session
        self.context: list[int] = []  # token ids of the conversation so far
        self.turn = 0
        self.commands: dict[str, Callable[[str], None]] = {
            "/temp": self._set("temperature", float), "/temperature": self._set("temperature", float),
            "/top_k": self._set("top_k", int, optional=True), "/top_p": self._set("top_p", float, optional=True),
            "/max_tokens": self._set("max_tokens", int), "/reset": self._reset, "/help": self._help,
            "/settings": self._show,
        }

    def loop(self) -> int:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # Windows without pyreadline: plain input still works
            pass
        print("interactive mode: type text to continue it; /help for commands, Ctrl-D to leave", flush=True)
        while True:
            try:
                line = input(">>> ")
            except EOFError:  # Ctrl-D
                print()
                return 0
            except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, stay
                print()
                continue
            stripped = line.strip()
            if stripped in ("/quit", "/exit"):
                return 0
            if stripped.startswith("/"):
                self._command(stripped)
                continue
            self._generate(line)

    def _command(self, line: str) -> None:
        name, _, value = line.partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            print(f"error: unknown command {name}; type /help for the list", flush=True)
            return
        try:
            handler(value.strip())
        except UserError as exc:
            print(f"error: {exc}", flush=True)

    def _set(self, key: str, kind: type, optional: bool = False) -> Callable[[str], None]:
        def handler(value: str) -> None:
            if optional and value.lower() in ("off", "none", "0" if kind is int else "1"):
                new = replace(self.session.settings, **{key: None})
            else:
                try:
                    parsed = kind(value)
                except ValueError:
                    raise UserError(f"/{key.replace('temperature', 'temp')} needs a number, got {value!r}") from None
                new = replace(self.session.settings, **{key: parsed})
            new.validate()
            self.session.settings = new
            print(f"{key} = {getattr(new, key)}", flush=True)

        return handler

    def _reset(self, _: str) -> None:
        self.context = []
        print("conversation cleared", flush=True)

    def _help(self, _: str) -> None:
        print(REPL_HELP, flush=True)

    def _show(self, _: str) -> None:
        s = self.session.settings
        print(f"temperature={s.temperature} top_k={s.top_k} top_p={s.top_p} min_p={s.min_p} "
              f"repetition_penalty={s.repetition_penalty} max_tokens={s.max_tokens}", flush=True)

    def _generate(self, line: str) -> None:
        session = self.session
        try:
            new_ids = session.tokenizer.encode(line + "\n") if line else []
        except UserError as exc:
            print(f"error: {exc}", flush=True)
            return
        ids = self.context + new_ids
        if not ids:
            ids = session.encode_prompt("", quiet=True)
        self.turn += 1
        produced: list[int] = []
        seed = None if session.settings.seed is None else session.settings.seed + self.turn
        pieces = session.pieces(ids, seed, produced)
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            print(flush=True)
        except KeyboardInterrupt:  # Ctrl-C: stop this generation, keep the session
            pieces.close()
            print("\n[interrupted]", flush=True)
        # Keep the conversation within a few windows: older text is cropped by the engine anyway.
        self.context = (ids + produced)[-4 * session.model.config.block_size:]
