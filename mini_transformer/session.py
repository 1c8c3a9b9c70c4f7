"""A generation session: text in, text out, for the command line (and any other front end).

A :class:`Session` holds a loaded model, its tokenizer, the current :class:`Settings` and,
optionally, a draft model for speculative decoding. It turns text into token ids (the public
API's job: :mod:`.generation` works on ids only), runs the engine, and gives text back, either
as pieces while they are decoded (:class:`TextStream`) or as whole :class:`Completion` s. A
:class:`Conversation` adds the interactive state: the text so far, and the ``/commands`` that
change the settings between turns.

Nothing here prints. What a user should hear about (an empty prompt, a prompt cropped to the
context) comes back as :attr:`Prompt.notices`; mistakes raise :class:`~.errors.UserError` in
this module's terms. A setting out of range raises :class:`InvalidSetting`, which names the
setting, so that a front end can name its own spelling of it (the CLI's ``--top_p``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import SEED_LIMIT, GenerationConfig
from .errors import SettingError, UserError
from .generation import (
    KVCachePool, SamplingParams, SpeculativeStats, generate, generate_batch, generate_stream,
    save_attention, speculative_generate_stream, stream_text, truncate_at_stop,
)
from .model import Transformer
from .tokenizer import Tokenizer

SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class InvalidSetting(SettingError):
    """A setting out of its range. ``setting`` is its name (a field of :class:`Settings`)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message, setting=setting)


def check_settings(values: Mapping[str, Any]) -> None:
    """Check the given settings (any subset of :class:`Settings`' fields); raises :class:`InvalidSetting`.

    The sampling rules are :class:`~.generation.SamplingParams`' own; each setting is checked
    alone so that the error can say which one is wrong.
    """
    for name, value in values.items():
        if name in SAMPLING_SETTINGS:
            try:
                SamplingParams(**{name: value})
            except UserError as exc:
                raise InvalidSetting(name, str(exc)) from None
        elif name == "max_tokens" and value < 0:
            raise InvalidSetting(name, f"max_tokens must be >= 0, got {value}; "
                                       f"{GenerationConfig.max_tokens} is the default")
        elif name == "num_samples" and value <= 0:
            raise InvalidSetting(name, f"num_samples must be >= 1, got {value}; 1 is the default")
        elif name == "seed" and value is not None and not 0 <= value < SEED_LIMIT:
            raise InvalidSetting(name, f"seed must be in [0, 2**32), got {value}; any such integer, like 1")


def check_text(text: str, name: str) -> None:
    """Refuse text that is not Unicode: bytes that were not UTF-8 where they were read (a command
    line, a terminal) arrive as lone surrogates ("surrogateescape"), which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise UserError(f"{name} is not valid UTF-8 text ({byte} at character {exc.start + 1}); "
                        "type or save it as UTF-8") from None


@dataclass(frozen=True)
class Settings:
    """Everything that shapes one generation; checked when made (so :func:`dataclasses.replace`
    checks a changed value too)."""

    # The defaults are the config's (GenerationConfig), so Settings() == from_config(GenerationConfig()).
    max_tokens: int = GenerationConfig.max_tokens
    temperature: float = GenerationConfig.temperature
    top_k: Optional[int] = GenerationConfig.top_k
    top_p: Optional[float] = GenerationConfig.top_p
    min_p: Optional[float] = GenerationConfig.min_p
    repetition_penalty: float = GenerationConfig.repetition_penalty
    num_samples: int = GenerationConfig.num_samples
    stop: tuple[str, ...] = ()  # stop strings: text ends before the first one
    seed: Optional[int] = None  # sample i (or turn i) uses seed + i; None: random
    context_keep: Optional[int] = GenerationConfig.context_keep
    compile: bool = GenerationConfig.compile_decode  # compile the decode step

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        check_settings({name: getattr(self, name) for name in (*SAMPLING_SETTINGS, "max_tokens", "num_samples", "seed")})

    @classmethod
    def from_config(cls, generation: GenerationConfig, **chosen: Any) -> Settings:
        """A config's ``generation`` section, with the values of ``chosen`` that are not None on top."""
        g = generation
        values: dict[str, Any] = dict(
            max_tokens=g.max_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
            repetition_penalty=g.repetition_penalty, num_samples=g.num_samples, stop=tuple(g.stop),
            context_keep=g.context_keep, compile=g.compile_decode)
        values.update({name: value for name, value in chosen.items() if value is not None})
        return cls(**values)

    def sampling(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_SETTINGS}

    def seed_for(self, index: int) -> Optional[int]:
        """The RNG seed for sample (or turn) ``index``: different samples, each reproducible."""
        return None if self.seed is None else self.seed + index

    def describe(self) -> str:
        return (f"temperature={self.temperature} top_k={self.top_k} top_p={self.top_p} min_p={self.min_p} "
                f"repetition_penalty={self.repetition_penalty} max_tokens={self.max_tokens}")


@dataclass
class Prompt:
    """A prompt as token ids, with what the user should be told about it."""

    ids: list[int]
    notices: list[str] = field(default_factory=list)


@dataclass
class Completion:
    """One finished sample: its text (cut before the first stop string) and its new token ids."""

    text: str
    token_ids: list[int]


class TextStream:
    """The text pieces of one generation as they are decoded (an iterator of ``str``).

    ``token_ids`` collects the new token ids as they are produced; ``stats`` holds the counters
    of speculative decoding (None without a draft). Closing the stream, or stopping at a stop
    string, ends the generation and frees the engine's state.
    """

    def __init__(self, tokens: Iterator[int], decode: Callable[[list[int]], str], stop: Sequence[str],
                 stats: Optional[SpeculativeStats] = None) -> None:
        self.token_ids: list[int] = []
        self.stats = stats
        self._pieces = stream_text(self._record(tokens), decode, stop)

    def _record(self, tokens: Iterator[int]) -> Iterator[int]:
        try:
            for token in tokens:
                self.token_ids.append(token)
                yield token
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class Session:
    """A loaded model and tokenizer with the current settings; turns text into text."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, settings: Settings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.draft: Optional[Transformer] = None
        self.gamma = 4
        # Plain decoding's KV-caches, kept between generations: a decode step compiled as a CUDA
        # graph reads its cache at the addresses it was recorded with.
        self.cache_pool = KVCachePool()
        self.stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def set_draft(self, draft: Transformer, draft_tokenizer: Tokenizer, gamma: int) -> None:
        """Decode speculatively from now on: ``draft`` proposes ``gamma`` tokens per round."""
        mine = self.tokenizer
        if draft_tokenizer.vocab_size != mine.vocab_size or draft_tokenizer.kind != mine.kind:
            raise UserError(f"the draft's tokenizer ({draft_tokenizer.kind}, {draft_tokenizer.vocab_size} tokens) "
                            f"differs from the target's ({mine.kind}, {mine.vocab_size}); "
                            "train the draft on the same prepared data")
        self.draft, self.gamma = draft, gamma

    # -- text -> ids ---------------------------------------------------------------------
    def encode(self, text: str, name: str = "the prompt") -> Prompt:
        """``text`` as token ids, after the BOS when the model expects one; an empty text starts
        from the BOS, else a newline (or the end-of-text token)."""
        check_text(text, name)
        prompt = Prompt(self.bos_prefix() + self.tokenizer.encode(text)) if text else self._empty_prompt()
        if len(prompt.ids) > self.block_size:
            prompt.notices.append(f"{name} has {len(prompt.ids)} tokens, more than the context of "
                                  f"{self.block_size}; only its last {self.block_size} tokens are used")
        return prompt

    def bos_prefix(self) -> list[int]:
        """``[bos_id]`` for a tokenizer whose model expects every text to start with it, else ``[]``."""
        return [self.tokenizer.bos_id] if self.tokenizer.starts_with_bos else []

    def _empty_prompt(self) -> Prompt:
        if self.bos_prefix():
            return Prompt(self.bos_prefix(), ["empty prompt: starting from the beginning-of-text token"])
        try:
            ids, start = self.tokenizer.encode("\n"), "a newline"
        except UserError:  # a character tokenizer whose text had no newline
            ids = []
        if not ids:
            if self.tokenizer.eos_id is None:
                raise UserError("the prompt is empty and this tokenizer has neither a newline nor an end-of-text "
                                "token to start from; give a prompt")
            ids, start = [self.tokenizer.eos_id], "the end-of-text token"
        return Prompt(ids, [f"empty prompt: starting from {start}"])

    # -- generation ----------------------------------------------------------------------
    def stream(self, ids: list[int], seed: Optional[int] = None) -> TextStream:
        """One continuation of ``ids``, as text pieces while they are decoded."""
        s = self.settings
        common = dict(max_new_tokens=s.max_tokens, seed=seed, stop_ids=self.stop_ids, context_keep=s.context_keep,
                      **s.sampling())
        stats = SpeculativeStats() if self.draft is not None else None
        ids = self._window(ids)
        if self.draft is not None:
            tokens = speculative_generate_stream(self.model, self.draft, ids, gamma=self.gamma, stats=stats, **common)
        else:
            tokens = generate_stream(self.model, ids, compile=s.compile, cache_pool=self.cache_pool, **common)
        return TextStream(tokens, self.tokenizer.decode, s.stop, stats)

    def complete_batch(self, prompts: list[list[int]], seed: Optional[int] = None) -> list[Completion]:
        """One continuation of each prompt, all in one batch (one forward per step for all rows)."""
        s = self.settings
        rows = generate_batch(self.model, [self._window(p) for p in prompts], max_new_tokens=s.max_tokens, seed=seed,
                              stop_ids=self.stop_ids, context_keep=s.context_keep, compile=s.compile,
                              cache_pool=self.cache_pool, **s.sampling())
        return [Completion(truncate_at_stop(self.tokenizer.decode(row), s.stop)[0], row) for row in rows]

    def plain_tokens_per_s(self, ids: list[int], n_tokens: int, seed: Optional[int] = None) -> float:
        """Plain decoding's speed on the same prompt, to compare speculative decoding with."""
        start = time.perf_counter()
        plain = generate(self.model, self._window(ids), max_new_tokens=n_tokens, seed=seed, stop_ids=self.stop_ids,
                         cache_pool=self.cache_pool, **self.settings.sampling())
        return len(plain) / max(time.perf_counter() - start, 1e-9)

    def _window(self, ids: list[int]) -> list[int]:
        """The last ``block_size`` ids: what the engine would use of a longer prompt. Cropping here
        (a crop is already reported, by :meth:`encode`, or is a conversation's normal course)
        keeps the engine from warning about it, without silencing warnings process-wide."""
        return ids[-self.block_size:]

    def save_attention(self, token_ids: list[int], out_dir: str | Path) -> Path:
        """Every layer's and head's attention over ``token_ids`` to ``out_dir/attention.npz``."""
        labels = [self.tokenizer.decode([t]) for t in token_ids]
        return save_attention(self.model, token_ids, out_dir, labels=labels)


# -- interactive ------------------------------------------------------------------------------

COMMANDS_HELP = """\
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

QUIT_COMMANDS = ("/quit", "/exit")

# command -> (setting, type); a setting that can be switched off takes "off" (or "none").
_SETTING_COMMANDS: dict[str, tuple[str, type]] = {
    "/temp": ("temperature", float), "/temperature": ("temperature", float), "/top_k": ("top_k", int),
    "/top_p": ("top_p", float), "/max_tokens": ("max_tokens", int),
}
_OPTIONAL = {"top_k": "0", "top_p": "1"}  # besides off/none, the value that means "no filter"


class Conversation:
    """Each line continues the text so far; a line starting with ``/`` is a command.

    The conversation keeps the token ids of everything said, the last reply included as far as
    it got (a stream stopped early keeps what it produced). Only the last few windows are kept:
    the engine sees the last ``block_size`` tokens anyway.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.turn = 0
        self._last: Optional[tuple[list[int], TextStream]] = None  # the reply in progress

    @property
    def context(self) -> list[int]:
        if self._last is not None:
            ids, reply = self._last
            return (ids + reply.token_ids)[-4 * self.session.block_size:]
        return []

    def reply(self, line: str) -> TextStream:
        """Continue the conversation with ``line`` (and a newline); an empty line just continues."""
        check_text(line, "the line")
        new_ids = self.session.tokenizer.encode(line + "\n") if line else []
        context = self.context or self.session.bos_prefix()  # a conversation starts with the BOS
        ids = context + new_ids
        if not ids:
            ids = self.session.encode("").ids
        self.turn += 1
        reply = self.session.stream(ids, self.session.settings.seed_for(self.turn))
        self._last = (ids, reply)
        return reply

    def command(self, line: str) -> str:
        """Apply a ``/command`` and return what to show; raises :class:`UserError` for a bad one."""
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if name in _SETTING_COMMANDS:
            setting, kind = _SETTING_COMMANDS[name]
            return self._set(name, setting, kind, value)
        if name == "/reset":
            self._last = None
            return "conversation cleared"
        if name == "/settings":
            return self.session.settings.describe()
        if name == "/help":
            return COMMANDS_HELP
        raise UserError(f"unknown command {name}; type /help for the list")

    def _set(self, command: str, setting: str, kind: type, value: str) -> str:
        parsed: Any
        if setting in _OPTIONAL and value.lower() in ("off", "none", _OPTIONAL[setting]):
            parsed = None
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise UserError(f"{command} needs a number, got {value!r}; for example {command} 50") from None
        self.session.settings = dataclasses.replace(self.session.settings, **{setting: parsed})
        return f"{setting} = {parsed}"
