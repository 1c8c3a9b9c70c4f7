"""Every config key with its type, default and meaning: ``mini-transformer config --list`` and the
config-key part of ``train --help`` (and ``finetune``, ``generate``).

The listing is generated from config.py's dataclasses: the fields give the names, types and
defaults, and each field's meaning is the one-line docstring written under it, read from
config.py's source with :mod:`ast` (docstrings of attributes are not kept at run time). So a
new key shows up here by itself, and tests/test_cli_docs.py fails if it has no docstring.
Nothing here imports yaml or torch: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from . import config as config_module
from .config import SECTION_TYPES, SECTIONS


@dataclass(frozen=True)
class KeyDoc:
    section: str
    name: str
    type: str  # "int", "int|null", "layernorm|rmsnorm", "list of str"
    default: str  # as YAML writes it: null, true, [attention]
    meaning: str  # the field's docstring; "" if it has none

    @property
    def flag(self) -> str:
        return f"--{self.section}.{self.name}"


def key_docs(sections: typing.Iterable[str] = SECTIONS) -> list[KeyDoc]:
    """The keys of ``sections``, in the order config.py declares them."""
    meanings = _field_docstrings()
    docs = []
    for section in sections:
        cls = SECTION_TYPES[section]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            docs.append(KeyDoc(section, f.name, type_text(hints[f.name]), default_text(getattr(defaults, f.name)),
                               meanings.get((cls.__name__, f.name), "")))
    return docs


def section_meaning(section: str) -> str:
    """The first sentence of the section class's docstring, as a phrase: "the architecture"."""
    doc = (inspect.getdoc(SECTION_TYPES[section]) or "").replace("``", "")
    sentence = doc.split(". ")[0].strip().rstrip(".")
    return sentence[:1].lower() + sentence[1:]


def format_keys(sections: typing.Iterable[str] = SECTIONS, prog: str = "mini-transformer") -> str:
    """The keys as argparse lays out options: ``--section.key TYPE`` and, wrapped beside it, the
    meaning and the default. The flag is how the key is set on the command line; in YAML it is
    ``key: value`` under ``section:``."""
    formatter = argparse.HelpFormatter(prog, max_help_position=40)
    docs = key_docs(sections)
    for section in dict.fromkeys(doc.section for doc in docs):
        formatter.start_section(f"{section} keys ({section_meaning(section)})")
        formatter.add_arguments([_as_action(doc) for doc in docs if doc.section == section])
        formatter.end_section()
    return formatter.format_help()


def _as_action(doc: KeyDoc) -> argparse.Action:
    """An action for the help formatter only; it is never added to a parser."""
    meaning = doc.meaning.replace("%", "%%")  # argparse %-formats help text
    return argparse.Action([doc.flag], dest=doc.flag, metavar=doc.type, help=f"{meaning} (default: {doc.default})")


def type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [type_text(a) for a in typing.get_args(tp) if a is not type(None)]
        return "|".join(inner + ["null"])
    if origin is list:
        return f"list of {type_text(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any) -> str:
    """``value`` as YAML writes it, without importing yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    return str(value)


def _field_docstrings() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the string literal right under the field in config.py."""
    try:
        tree = ast.parse(inspect.getsource(config_module))
    except (OSError, TypeError):  # no source shipped (a bytecode-only install): types and defaults still list
        return {}
    found: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for field, after in zip(node.body, node.body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                found[(node.name, field.target.id)] = " ".join(after.value.value.split())
    return found
