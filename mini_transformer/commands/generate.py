"""``mini-transformer generate`` (and ``python generate.py``): sample text from a trained checkpoint.

Settings come, lowest first, from the checkpoint's saved config (its ``generation`` and
``advanced`` sections), a ``--config`` file, ``--generation.KEY VALUE`` overrides, and the flags.
This module reads the flags and the input and prints; turning text into text (settings, the
conversation, the ``/commands``) is :mod:`mini_transformer.session`'s job.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import check_can_be_directory
from ..config import AdvancedConfig, Config, merge_into, parse_overrides, read_yaml_file
from ..errors import UserError
from ..textfile import read_user_text
from .common import add_command, add_flag, add_setting_flags, list_config_keys, with_flags

# The session (and through it torch) and yaml are imported when the command runs, not when its
# parser is built: `mini-transformer --help` stays fast.
if TYPE_CHECKING:
    import torch

    from ..generation import SpeculativeStats
    from ..session import InvalidSetting, Prompt, Session, Settings, TextStream

EXAMPLES = """\
  python generate.py --prompt "Once upon a time" --max_tokens 200
  python generate.py --interactive
  python generate.py --prompt "Hello" --stream
  python generate.py --prompt "The" --temperature 0.9 --top_k 50 --top_p 0.95
  mini-transformer generate --checkpoint out-shakespeare-char-cpu --prompt "ROMEO:" --num_samples 3 --seed 1
  printf 'ROMEO:\\nJULIET:\\n' > out/prompts.txt
  mini-transformer generate --prompts_file out/prompts.txt --max_tokens 50 --temperature 0
  mini-transformer generate --prompt "ROMEO:" --stop "\\n\\n" --repetition_penalty 1.1 --min_p 0.05
  mini-transformer generate --checkpoint out-shakespeare-char-cpu --prompt "ROMEO:" --draft_checkpoint out-tiny \\
      --compare_plain                        # the draft: train's out-tiny example, same tokenizer
  mini-transformer generate --prompt "ROMEO:" --max_tokens 40 --log_attention   # maps in out/attention
  mini-transformer generate --prompt "ROMEO:" --max_tokens 20 --log_attention --attention_layer 2 --attention_head 5
  mini-transformer generate --prompt "ROMEO:" --device cuda --dtype bf16 --compile

interactive commands: /temp 0.8  /top_k 50  /top_p 0.9  /max_tokens 100  /reset  /help  /quit
  (Ctrl-C stops the current generation, Ctrl-D or /quit leaves)
"""


# Under the default out_dir, which .gitignore covers and `make clean` removes.
ATTENTION_DIR = "out/attention"


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
    # --max_new_tokens, the Python API's name for it, is accepted too.
    add_flag(what, "--max_tokens", "--max_new_tokens", type=int,
             help="new tokens per sample (default: generation.max_tokens)")
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
    model.add_argument("--force", action="store_true",
                       help="skip the check that refuses a generation whose weights and KV-caches exceed the "
                            "device's memory")
    extras = parser.add_argument_group("speculative decoding and attention maps")
    extras.add_argument("--draft_checkpoint", metavar="DIR",
                        help="a small draft model with the same tokenizer: speculative decoding")
    extras.add_argument("--gamma", type=int, help="draft tokens per round (default: advanced.speculative_gamma)")
    extras.add_argument("--compare_plain", action="store_true",
                        help="with --draft_checkpoint: also time plain decoding and print the speedup")
    extras.add_argument("--log_attention", action="store_true",
                        help="save every layer's and head's attention to .npz, and a PNG of each layer's heads")
    extras.add_argument("--attention_dir", default=ATTENTION_DIR, metavar="DIR",
                        help=f"where --log_attention writes (default: {ATTENTION_DIR})")
    extras.add_argument("--attention_layer", type=int, metavar="L",
                        help="with --log_attention: draw only layer L (0 is the first)")
    extras.add_argument("--attention_head", type=int, metavar="H",
                        help="with --log_attention: draw only head H (of each layer drawn), larger")
    parser.set_defaults(run=run, accepts_overrides=True)
    list_config_keys(parser, ("generation", "advanced"))
    add_setting_flags(parser, {**{name: f"--{name}" for name in SETTING_FLAGS},
                               "group_size": "--advanced.quantize_group_size", "device": "--device",
                               "attention_layer": "--attention_layer", "attention_head": "--attention_head",
                               "force": "--force", "attention_dir": "--attention_dir", "seed": "--seed"})


# -- flags and config ------------------------------------------------------------------------

SETTING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "num_samples")


def check_flags(args: argparse.Namespace) -> None:
    """Reject bad flag values before any checkpoint is loaded (a one-line error, exit 2)."""
    from ..session import check_settings

    chosen = [name for name, on in [("--prompt", args.prompt is not None), ("--prompts_file", bool(args.prompts_file)),
                                    ("--interactive", args.interactive)] if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} can't be combined; choose one")
    if args.gamma is not None and args.gamma <= 0:
        raise UserError(f"--gamma must be >= 1, got {args.gamma}; 4 is a good start")
    for flag, value in (("--attention_layer", args.attention_layer), ("--attention_head", args.attention_head)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0 (0 is the first), got {value}")
    if args.log_attention:
        check_can_be_directory(args.attention_dir)
    check_settings(flag_settings(args))


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The session settings given as flags (those left out come from the config)."""
    values = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    if args.stop:  # "\n" and "\t" typed in a shell arrive as two characters; they mean newline and tab.
        values["stop"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    if args.seed is not None:
        values["seed"] = args.seed
    if args.compile:
        values["compile"] = True
    return values


def with_flag(exc: InvalidSetting) -> UserError:
    """The session's message about a setting, naming the flag that sets it."""
    return UserError(with_flags(exc, {exc.setting: f"--{exc.setting}"}))


def read_config_sections(path: str | None, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw sections of ``--config`` and of the dotted overrides that generation may use."""
    file_raw = read_yaml_file(Path(path), "check the path") if path else {}
    override_raw = parse_overrides(overrides)
    for section in override_raw:
        if section not in ("generation", "advanced", "training"):
            raise UserError(f"generate takes --generation.KEY and --advanced.KEY overrides, not --{section}.*; "
                            "the model comes from the checkpoint")
    return file_raw, override_raw


def merged_config(base: Config, file_raw: dict[str, Any], override_raw: dict[str, Any], source: str) -> Config:
    """A copy of ``base`` (the checkpoint's config) with the generation-relevant parts of the file
    and overrides; ``base`` itself still describes the checkpoint."""
    merged = copy.deepcopy(base)
    keep = ("generation", "advanced")
    merge_into(merged, {k: v for k, v in file_raw.items() if k in keep}, source)
    merge_into(merged, {k: v for k, v in override_raw.items() if k in keep}, "command line")
    return merged


def default_checkpoint(args: argparse.Namespace, file_raw: dict[str, Any], override_raw: dict[str, Any]) -> str:
    if args.checkpoint:
        return args.checkpoint
    for raw in (override_raw, file_raw):
        out_dir = (raw.get("training") or {}).get("out_dir") if isinstance(raw.get("training"), dict) else None
        if out_dir:
            return str(out_dir)
    return Config().training.out_dir


def read_prompts(path: str) -> list[str]:
    text = read_user_text(path, "prompts file", "write one prompt per line")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path!r} has no prompts; write one prompt per line")
    return prompts


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# -- running --------------------------------------------------------------------------------

def run(args: argparse.Namespace, overrides: list[str]) -> int:
    check_flags(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None  # refused before the model loads
    session, advanced = open_session(args, overrides, prompts=len(prompts) if prompts else 1)
    log_attention = args.log_attention or advanced.log_attention
    if log_attention and (args.interactive or args.prompts_file):
        note("attention maps are logged for --prompt only")
    if not log_attention and (args.attention_layer is not None or args.attention_head is not None):
        note("--attention_layer and --attention_head choose what --log_attention draws; add --log_attention")
    if args.interactive:
        return interactive(session)
    if prompts is not None:
        return print_batch(session, prompts, args.stream)
    text = args.prompt or ""
    prompt = session.encode(text)
    for message in prompt.notices:
        note(message)
    generated = print_samples(session, text, prompt, args.stream, args.compare_plain)
    if log_attention:
        write_attention(session, generated, args.attention_dir, args.attention_layer, args.attention_head)
    return 0


def open_session(args: argparse.Namespace, overrides: list[str], prompts: int = 1) -> tuple[Session, AdvancedConfig]:
    """Load the checkpoint (and the draft, if any) with the settings of every source, for
    ``prompts`` prompts at a time; unless ``--force``, refuse first what cannot fit the device."""
    from ..checkpoint import load_for_inference, read_config, resolve_checkpoint
    from ..device import allow_tf32_on_cuda, inference_dtype, resolve_device
    from ..generation import resolve_context_keep
    from ..session import Session, Settings

    file_raw, override_raw = read_config_sections(args.config, overrides)
    device = resolve_device(args.device)
    allow_tf32_on_cuda(device)
    # The checkpoint's config is read once and merged with the file and the overrides first:
    # a bad --dtype is refused before the weights load, and the weights are cast before they move.
    directory = resolve_checkpoint(default_checkpoint(args, file_raw, override_raw), prefer="best")
    saved = read_config(directory)
    config = merged_config(saved, file_raw, override_raw, args.config or "config")
    settings = Settings.from_config(config.generation, **flag_settings(args))
    resolve_context_keep(settings.context_keep, saved.model.block_size)  # a bad one is refused before loading
    dtype = inference_dtype(args.dtype or config.generation.decode_dtype, device)
    # The model (and a LoRA run's adapters) is built from the checkpoint's own config; only how
    # to quantize it comes from the merged one.
    advanced = config.advanced
    if advanced.quantize and not args.quantize:
        say_config_quantization(directory, advanced.quantize, quantize_source(args.config, file_raw, override_raw))
    draft_dir = args.draft_checkpoint or (advanced.draft_checkpoint if advanced.speculative_sampling else None)
    if not args.force:
        check_memory(saved, directory, dtype, device, sequences_at_once(args, settings, prompts, bool(draft_dir)),
                     draft_dir)
    model, _, tokenizer = load_for_inference(directory, device, adapter=args.adapter, dtype=dtype, config=saved,
                                             quantize=args.quantize or advanced.quantize,
                                             group_size=advanced.quantize_group_size,
                                             quantize_embedding=advanced.quantize_embedding,
                                             compiled_decode=settings.compile and not draft_dir)
    session = Session(model, tokenizer, settings)
    if advanced.speculative_sampling and not draft_dir:
        raise UserError("advanced.speculative_sampling is on but no draft model is set; "
                        "pass --draft_checkpoint DIR or set advanced.draft_checkpoint")
    if draft_dir:
        draft_model, _, draft_tokenizer = load_for_inference(draft_dir, device, dtype=dtype)
        session.set_draft(draft_model, draft_tokenizer, gamma=args.gamma or advanced.speculative_gamma)
        if settings.compile:
            note("--compile applies to plain decoding; speculative decoding runs uncompiled "
                 "(and so does its --compare_plain baseline, to compare like with like)")
    return session, advanced


def quantize_source(config_path: str | None, file_raw: dict[str, Any], override_raw: dict[str, Any]) -> str:
    """Which source set advanced.quantize: the command line, the --config file, or the checkpoint's config."""
    for raw, name in ((override_raw, "the command line"), (file_raw, config_path)):
        section = raw.get("advanced")
        if isinstance(section, dict) and "quantize" in section:
            return str(name)
    return "the checkpoint's config"


def say_config_quantization(directory: Path, mode: str, source: str) -> None:
    """A quantization the user did not ask for on this command line is said, not done silently."""
    from ..quantize import read_quantization_meta

    if read_quantization_meta(directory) is None:  # a quantized checkpoint loads as it is
        note(f"quantizing the weights to {mode} on load (advanced.quantize in {source}); "
             "--advanced.quantize null loads them in full precision")


def sequences_at_once(args: argparse.Namespace, settings: Settings, prompts: int, speculative: bool) -> int:
    """How many sequences one batch generates, each with its KV-cache: speculative decoding and the
    interactive session run one; a prompts file all prompts x samples (print_batch), one prompt
    its samples unless streamed (print_samples)."""
    if speculative or args.interactive:
        return 1
    if args.prompts_file:
        return prompts * settings.num_samples
    return 1 if args.stream else settings.num_samples


def check_memory(saved: Config, directory: Path, dtype: torch.dtype | None, device: torch.device, sequences: int,
                 draft_dir: str | None) -> None:
    """Refuse, before any weight loads, a generation whose weights, RoPE tables and KV-cache
    (``sequences`` of the checkpoint's context each; the draft's too) exceed the device's memory."""
    from ..checkpoint import WEIGHTS_FILE, read_config, resolve_checkpoint
    from ..memory_check import generation_need, refuse_if_too_large

    nbytes = dtype.itemsize if dtype is not None else 4  # None: the checkpoint's own fp32
    need = generation_need(saved.model, sequences, nbytes, directory / WEIGHTS_FILE)
    if draft_dir:
        draft = resolve_checkpoint(draft_dir, prefer="best")
        draft_need = generation_need(read_config(draft).model, 1, nbytes, draft / WEIGHTS_FILE)
        need.update({f"draft {part}": n for part, n in draft_need.items()})

    def fix(available: int) -> str:
        if need["weights"] > available or need["KV-cache"] < need["weights"]:
            return "load the weights in less memory with --dtype bf16 or --quantize int8"
        if sequences > 1:
            return f"generate fewer sequences at once (--num_samples x prompts is {sequences:,})"
        return f"use a checkpoint with a shorter context (this one's block_size is {saved.model.block_size:,})"

    what = f"generating {sequences:,} sequence{'s' if sequences > 1 else ''} at once"
    refuse_if_too_large(what, need, device, fix)


def print_samples(session: Session, text: str, prompt: Prompt, stream: bool, compare_plain: bool) -> list[int]:
    """Print ``num_samples`` continuations of ``text``; return the first one's token ids, prompt included."""
    n = session.settings.num_samples
    if session.draft is None and not stream and n > 1:
        # All samples in one batch: one forward per step for all of them.
        completions = session.complete_batch([prompt.ids] * n, session.settings.seed_for(0))
        for i, completion in enumerate(completions):
            print(f"--- sample {i + 1} ---")
            print(text + completion.text, flush=True)
        return [*prompt.ids, *completions[0].token_ids]
    first: list[int] = []
    for i in range(n):
        if n > 1:
            print(f"--- sample {i + 1} ---")
        seed = session.settings.seed_for(i)
        start = time.perf_counter()
        pieces = session.stream(prompt.ids, seed)
        if stream:
            sys.stdout.write(text)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(text + "".join(pieces))
        sys.stdout.flush()
        elapsed = time.perf_counter() - start
        first = first or [*prompt.ids, *pieces.token_ids]
        if pieces.stats is not None:
            report_speculative(session, pieces.stats, len(pieces.token_ids), elapsed, prompt.ids, seed,
                               compare_plain)
    return first


def report_speculative(session: Session, stats: SpeculativeStats, n_tokens: int, elapsed: float, ids: list[int],
                       seed: int | None, compare_plain: bool) -> None:
    rate = n_tokens / elapsed if elapsed > 0 else float("inf")
    message = (f"speculative: acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted} drafts), "
               f"{stats.tokens_per_round:.2f} tokens per target forward, {rate:.0f} tokens/s")
    if compare_plain:
        plain_rate = session.plain_tokens_per_s(ids, n_tokens, seed)
        # No tokens (max_tokens 0, or a stop at once) leave no rate to compare.
        speedup = f"speedup {rate / plain_rate:.2f}x" if plain_rate > 0 else "no tokens to compare"
        message += f"; plain decoding {plain_rate:.0f} tokens/s, {speedup}"
    print(message, file=sys.stderr, flush=True)


def print_batch(session: Session, texts: list[str], stream: bool) -> int:
    """All prompts (x num_samples) in one batch; prints each result after its prompt."""
    if session.draft is not None:
        raise UserError("--prompts_file can't be combined with --draft_checkpoint (speculative decoding is batch 1); "
                        "use --prompt")
    if stream:
        note("--stream is ignored with --prompts_file: a batch is printed when it is complete")
    n = session.settings.num_samples
    prompts = [session.encode(text, name=f"prompt {i + 1}") for i, text in enumerate(texts)]
    for prompt in prompts:
        for message in prompt.notices:
            note(message)
    completions = session.complete_batch([p.ids for p in prompts for _ in range(n)], session.settings.seed_for(0))
    for i, text in enumerate(texts):
        for j in range(n):
            print(f"--- prompt {i + 1}" + (f", sample {j + 1}" if n > 1 else "") + " ---")
            print(text + completions[i * n + j].text, flush=True)
    return 0


def write_attention(session: Session, token_ids: list[int], out_dir: str, layer: int | None = None,
                    head: int | None = None) -> None:
    from ..plot import plot_attention_file

    npz = session.save_attention(token_ids, out_dir)
    pngs = plot_attention_file(npz, layer=layer, head=head)
    shown = str(pngs[0]) if len(pngs) == 1 else f"one PNG per layer, {pngs[0]} to {pngs[-1].name}"
    note(f"attention weights written to {npz}; drawn in {shown}")


# -- interactive ------------------------------------------------------------------------------

def interactive(session: Session) -> int:
    """Read a line, continue the text, print it as it streams; commands start with '/'."""
    from ..session import QUIT_COMMANDS, Conversation, InvalidSetting

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # Windows without pyreadline: plain input still works
        pass
    conversation = Conversation(session)
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 arrives as lone surrogates, which the session refuses in one
        # line, instead of a decoding error that would end the session (or lose buffered input).
        sys.stdin.reconfigure(errors="surrogateescape")
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
        except UnicodeDecodeError:  # a stdin that could not be reconfigured
            print("error: that line is not valid UTF-8 text; type it again", flush=True)
            continue
        stripped = line.strip()
        if stripped in QUIT_COMMANDS:
            return 0
        try:
            if stripped.startswith("/"):
                print(conversation.command(stripped), flush=True)
            else:
                print_reply(conversation.reply(line))
        except InvalidSetting as exc:
            print(f"error: {with_flag(exc)}", flush=True)
        except UserError as exc:
            print(f"error: {exc}", flush=True)


def print_reply(pieces: TextStream) -> None:
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print(flush=True)
    except KeyboardInterrupt:  # Ctrl-C: stop this generation, keep the session
        pieces.close()
        print("\n[interrupted]", flush=True)
