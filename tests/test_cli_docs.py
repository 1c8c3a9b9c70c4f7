"""The command line documents itself and refuses mistakes helpfully: every flag has help, every
config key is listed with its type and default, mistyped flags get the nearest one, and the
commands the README, the demo and the help examples print run as printed."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mini_transformer import demo
from mini_transformer.cli import COMMANDS, build_parser
from mini_transformer.commands.extras import check_extras, visible_flags
from mini_transformer.config import config_keys
from mini_transformer.config import SECTION_TYPES, SECTIONS, Config, load_config
from mini_transformer.config_docs import default_text, format_keys, key_docs
from mini_transformer.errors import UserError

from .test_cli_startup import run_python

REPO = Path(__file__).resolve().parent.parent


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


# -- help -------------------------------------------------------------------------------------

def test_every_flag_of_every_command_has_help_and_hidden_aliases_share_a_shown_flag():
    parsers = command_parsers()
    assert set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        shown = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
        for action in parser._actions:
            if action.help is argparse.SUPPRESS:  # a second spelling of a documented flag
                assert action.dest in shown, (name, action.option_strings)
            else:
                assert isinstance(action.help, str) and action.help.strip(), (name, action.option_strings)


def test_every_shown_flag_is_spelled_with_underscores():
    for name, parser in command_parsers().items():
        for action in parser._actions:
            if action.help is not argparse.SUPPRESS:
                for flag in action.option_strings:
                    assert "-" not in flag.lstrip("-"), (name, flag)


def test_every_config_field_is_listed_with_its_type_default_and_meaning():
    squeezed = "".join(format_keys().split())  # argparse wraps the meanings, at spaces and after hyphens
    for section, cls in SECTION_TYPES.items():
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        docs = {d.name: d for d in key_docs([section])}
        assert list(docs) == list(hints), section
        for field in dataclasses.fields(cls):
            doc = docs[field.name]
            assert doc.meaning, f"{section}.{field.name} has no docstring in config.py"
            line = f"--{section}.{field.name} {doc.type} {doc.meaning} (default: {doc.default})"
            assert "".join(line.split()) in squeezed, line


def test_the_listing_reads_types_and_defaults_from_the_dataclasses():
    docs = {f"{d.section}.{d.name}": d for d in key_docs()}
    assert (docs["model.vocab_size"].type, docs["model.vocab_size"].default) == ("int|null", "null")
    assert (docs["model.norm"].type, docs["model.norm"].default) == ("layernorm|rmsnorm", "layernorm")
    assert (docs["training.gradient_checkpointing"].type, docs["training.gradient_checkpointing"].default) == (
        "bool", "false")
    assert (docs["advanced.lora_targets"].type, docs["advanced.lora_targets"].default) == (
        "list of str", "[attention]")
    assert docs["training.learning_rate"].default == str(Config().training.learning_rate)
    assert default_text(None) == "null" and default_text(True) == "true" and default_text([]) == "[]"


def test_help_lists_the_config_keys_it_takes_before_its_examples(capsys):
    for command, sections in [("train", SECTIONS), ("finetune", SECTIONS), ("generate", ("generation", "advanced"))]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        for section in SECTIONS:
            listed = f"{section} keys (" in out
            assert listed == (section in sections), (command, section)
        for doc in key_docs(sections):
            assert doc.flag in out, (command, doc.flag)
        assert out.index("keys (") < out.index("examples:")


def test_config_list_prints_the_keys_of_the_sections_asked_for(run_cli):
    status, out, _ = run_cli("config", "--list", "data")
    assert status == 0
    assert "--data.tokenizer char|byte|bpe|gpt2" in out and "--model." not in out
    status, out, _ = run_cli("config", "--list")
    assert all(doc.flag in out for doc in key_docs())


def test_help_and_the_key_listing_import_no_torch_numpy_or_yaml():
    report = run_python("""
        import contextlib, io, json, sys
        from mini_transformer.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["config", "--list"])
            try:
                main(["train", "--help"])
            except SystemExit:
                pass
        print(json.dumps({"status": status, "length": len(out.getvalue()),
                          "loaded": [m for m in ("torch", "numpy", "yaml") if m in sys.modules]}))
    """)
    assert report["status"] == 0 and report["length"] > 5000
    assert report["loaded"] == []


# -- flags --------------------------------------------------------------------------------------

def _error(run_cli, *argv: str) -> str:
    status, _, err = run_cli(*argv)
    assert status == 2 and err.count("\n") == 1, err
    return err.strip()


def test_a_mistyped_config_key_names_the_right_one(run_cli):
    err = _error(run_cli, "train", "--trainng.max_iters", "5")
    assert err.endswith("did you mean --training.max_iters?")
    assert _error(run_cli, "train", "--training.max_iter", "5").endswith("did you mean --training.max_iters?")
    assert _error(run_cli, "train", "--max_iter", "5").endswith("did you mean --training.max_iters?")


def test_a_mistyped_flag_names_the_right_one(run_cli):
    assert _error(run_cli, "train", "--resum").endswith("did you mean --resume?")
    assert _error(run_cli, "profile", "--no-measur").endswith("did you mean --no_measure?")
    # A command without config overrides: no usage dump, one line.
    err = _error(run_cli, "quantize", "--checkpoint", "x", "--mode", "int8", "--out", "y", "--group_sise", "64")
    assert err == "error: unknown option --group_sise for mini-transformer quantize; did you mean --group_size?"
    assert _error(run_cli, "train", "config.yaml").endswith("did you mean --config config.yaml?")


def test_a_flat_key_on_the_command_line_works_as_in_yaml(run_cli):
    config = load_config(overrides=["--gradient_checkpointing", "true", "--max_iters=7"])
    assert config.training.gradient_checkpointing is True and config.training.max_iters == 7
    status, out, _ = run_cli("config", "--gradient_checkpointing", "true")
    assert status == 0 and "gradient_checkpointing: true" in out
    assert _error(run_cli, "config", "--compile").endswith("like --compile true or --compile=true")


@pytest.mark.parametrize("argv, dest, value", [
    (["profile", "--no_measure"], "measure", False), (["profile", "--no-measure"], "measure", False),
    (["profile"], "measure", True),
    (["bench", "--no_memory"], "memory", False), (["bench", "--no-memory"], "memory", False),
    (["generate", "--max_tokens", "5"], "max_tokens", 5), (["generate", "--max_new_tokens", "5"], "max_tokens", 5),
    (["generate"], "max_tokens", None),
    (["export", "--checkpoint", "c", "--out", "o", "--adapter-format", "peft"], "adapter_format", "peft"),
    (["export", "--checkpoint", "c", "--out", "o", "--adapter_format", "peft"], "adapter_format", "peft"),
    (["export", "--checkpoint", "c", "--out", "o"], "adapter_format", "merged"),
])
def test_both_spellings_of_a_flag_set_the_same_thing(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_profile_runs_with_either_spelling_of_no_measure(run_cli):
    outputs = [run_cli("profile", "--preset", "tiny", flag) for flag in ("--no_measure", "--no-measure")]
    assert outputs[0] == outputs[1]
    status, out, _ = outputs[0]
    assert status == 0 and "parameters, total" in out and "measured peak" not in out


# -- commands as printed -----------------------------------------------------------------------

def cli_argv(line: str) -> list[str] | None:
    """The CLI arguments of a shell line that runs this project's CLI, else None."""
    words = shlex.split(line, comments=True)
    for start, word in enumerate(words):
        if word.endswith("mini-transformer") or word == "-m" and words[start + 1:start + 2] == ["mini_transformer"]:
            return words[start + (1 if word.endswith("mini-transformer") else 2):]
        if word in ("train.py", "generate.py"):
            return [word[:-3], *words[start + 1:]]
    return None


@functools.lru_cache(maxsize=1)
def parser() -> argparse.ArgumentParser:
    return build_parser()


def assert_runs_as_printed(argv: list[str], where: str) -> argparse.Namespace:
    try:
        args, extras = parser().parse_known_args(argv)
        check_extras(args.command_parser, extras, getattr(args, "accepts_overrides", False))
    except (SystemExit, UserError) as exc:
        raise AssertionError(f"{where}: {shlex.join(argv)}: {exc}") from None
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), f"{where}: {args.config} does not exist"
    return args


def shell_lines(text: str) -> list[str]:
    """The commands of a text's ```bash blocks (continuation lines joined), split at && and |."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines += [part for part in re.split(r"&&|\|", line) if part.strip()]
    return lines


def test_every_cli_command_in_the_readme_parses_with_flags_that_exist():
    checked = 0
    for line in shell_lines((REPO / "README.md").read_text(encoding="utf-8")):
        argv = cli_argv(line)
        if argv is not None:
            assert_runs_as_printed(argv, "README.md")
            checked += 1
    assert checked > 30


def test_the_demos_next_commands_run_as_printed(monkeypatch, tmp_path):
    # As under `make demo`: the interpreter of a .venv in the current directory, with its script.
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "mini-transformer").write_text("#!/bin/sh\n")
    (venv_bin / "activate").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.executable", str(venv_bin / "python"))
    monkeypatch.setattr("sys.prefix", str(tmp_path / ".venv"))
    lines = demo.next_commands("out-demo", "ROMEO:")
    commands = [line for line in lines if not line.startswith("(")]
    assert commands[0] == ".venv/bin/mini-transformer generate --checkpoint out-demo --prompt ROMEO: --stream"
    for line in commands:
        program = shlex.split(line)[0]
        assert (tmp_path / program).is_file(), line
        assert_runs_as_printed(cli_argv(line), "demo")
    assert "source .venv/bin/activate" in lines[-1]


def test_without_the_script_the_demo_prints_python_dash_m(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.executable", "/usr/bin/python3")
    monkeypatch.setattr("sys.prefix", "/usr")
    line = demo.next_commands("out-demo", "def")[0]
    assert line.startswith("/usr/bin/python3 -m mini_transformer generate --checkpoint out-demo")


# Files an example may name without creating them: the user's own text, where config.yaml's
# data.path and the README's Quick start put it.
USERS_TEXT = {"data/input.txt", "data/input.jsonl", "data/", "data"}  # the user's own text
USED_FLAGS = ("--config", "--checkpoint", "--draft_checkpoint", "--adapter", "--prompts_file", "--data.path", "--hf")
MADE_FLAGS = ("--out", "--training.out_dir", "--attention_dir")


def test_help_examples_name_only_files_that_exist_or_that_an_example_makes():
    made = {Config().training.out_dir, "out-finetune"}  # the defaults of train and finetune
    used: list[tuple[str, str]] = []
    for name, parser in command_parsers().items():
        for line in shell_lines("```bash\n" + parser.epilog.split("examples:\n", 1)[1] + "```"):
            if ">" in line:
                made.add(line.rsplit(">", 1)[1].split()[0])
            argv = cli_argv(line)
            if argv is None:
                continue
            args = assert_runs_as_printed(argv, f"{name} --help")
            if getattr(args, "config", None):
                made.add(load_config(REPO / args.config).training.out_dir)
            for flag, value in zip(argv, argv[1:]):
                if flag in MADE_FLAGS:
                    made.add(value)
                elif flag in USED_FLAGS:
                    used.append((name, value))
            used += [(name, p) for p in getattr(args, "input", None) or [] if p != "-"]
            if argv[0] == "plot":
                used += [(name, out_dir) for out_dir in args.out_dirs]
    for name, path in used:
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not (REPO / path).exists()
        known = (path in USERS_TEXT or glob.glob(str(REPO / path), recursive=True) or hub_id
                 or any(path == m or path.startswith(m.rstrip("/") + "/") for m in made))
        assert known, f"{name} --help names {path!r}, which neither exists nor is made by an example"


def test_what_the_commands_write_by_default_is_ignored_by_git():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    outputs = {Config().training.out_dir, Config().data.cache_dir, "out-finetune", demo.OUT_DIR, "bench_out",
               build_parser().parse_args(["generate"]).attention_dir}
    outputs |= {load_config(path).training.out_dir for path in (REPO / "configs").glob("shakespeare*.yaml")}
    for line in shell_lines((REPO / "README.md").read_text(encoding="utf-8")):
        argv = cli_argv(line) or []
        outputs |= {value for flag, value in zip(argv, argv[1:]) if flag in MADE_FLAGS}
    probe = "\n".join(f"{path.rstrip('/')}/x" for path in sorted(outputs)) + "\n"
    result = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"], input=probe,
                            capture_output=True, text=True)
    ignored = set(result.stdout.split())
    assert ignored == set(probe.split()), f"not ignored: {sorted(set(probe.split()) - ignored)}"


def test_the_flags_a_command_names_in_its_hints_are_flags_it_takes():
    """A hint such as the offline GPT-2 one ("... (--data.tokenizer bpe --data.bpe_vocab_size
    50257)") is spelled with the command's setting_flags; each must be one the command accepts."""
    keys = {f"--{key}" for key in config_keys()}
    for name, parser in command_parsers().items():
        accepted = set(visible_flags(parser)) | (keys if parser.get_default("accepts_overrides") else set())
        for setting, flag in (parser.get_default("setting_flags") or {}).items():
            assert flag in accepted, (name, setting, flag)
