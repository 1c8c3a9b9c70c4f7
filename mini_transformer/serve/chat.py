"""Chat messages to prompt ids: the checkpoint's own chat template, or a plain one.

A checkpoint imported from Hugging Face keeps its ``tokenizer_config.json`` ``chat_template``
(a Jinja template; :class:`~mini_transformer.tokenizer.HFTokenizer` ``hf_config``). It is
rendered as ``transformers`` renders it: in a sandboxed, immutable Jinja environment (a template
can't reach Python objects' internals or change its inputs), with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter, ``raise_exception`` and
``strftime_now``, and the variables ``messages``, ``add_generation_prompt=True`` and the special
tokens (``bos_token``, ``eos_token``, ...). The rendered text is tokenized with special-token text
read as those tokens (what the template writes as ``<|im_start|>`` is that token), like
``transformers``' ``apply_chat_template``.

Without one, :data:`PLAIN_TEMPLATE` lays the conversation out as lines of ``role: content``
and ends with ``assistant:``; generation then also stops at a new ``user:`` line
(:data:`PLAIN_STOPS`), since a model trained on plain text would otherwise go on writing the
user's next turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional

from ..errors import UserError
from ..tokenizer import Tokenizer

PLAIN_TEMPLATE = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
PLAIN_STOPS = ("\nuser:",)


def checkpoint_chat_template(tokenizer: Tokenizer) -> Optional[str]:
    """The tokenizer's own chat template (the ``default`` one of a named list), or None."""
    template = getattr(tokenizer, "hf_config", {}).get("chat_template")
    if isinstance(template, list):  # older tokenizer_config.json: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


class ChatFormatter:
    """Renders a conversation with the checkpoint's template (or the plain one) and tokenizes it."""

    def __init__(self, tokenizer: Tokenizer, bos_prefix: Sequence[int] = ()):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        own = checkpoint_chat_template(tokenizer)
        self.uses_checkpoint_template = own is not None
        # The plain template has no BOS of its own, so the prompt gets the one the model expects.
        self.bos_prefix = [] if own else list(bos_prefix)
        self.extra_stops: tuple[str, ...] = () if own else PLAIN_STOPS
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(own or PLAIN_TEMPLATE)
        except TemplateError as exc:
            raise UserError(f"the checkpoint's chat template does not compile ({exc}); fix chat_template "
                            "in its tokenizer") from None
        self._specials = tokenizer.special_tokens
        # Longest first, so that a special token that contains another is matched whole.
        names = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        named = getattr(tokenizer, "named_tokens", {})
        self.variables = {role: text for role, text in named.items() if text is not None}

    def render(self, messages: list[dict[str, Any]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.variables)
        except TemplateError as exc:
            raise UserError(f"the chat template refused the messages: {exc}") from None

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids for ``messages`` ({"role", "content"} dicts), ready for the assistant's reply."""
        text = self.render(messages)
        ids = list(self.bos_prefix)
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if piece in self._specials:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(self.tokenizer.encode(piece))
        return ids


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, indent: Optional[int] = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)
