"""Every input a user can get wrong ends in one line on stderr that says what is wrong and what to
do, with exit status 2, never a traceback: files that are not UTF-8, numbers that are not finite
or overflow, paths where a file stands in the way, damaged checkpoints, a full disk, a closed pipe."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mini_transformer import checkpoint as ckpt
from mini_transformer.checkpoint import save_checkpoint
from mini_transformer.config import load_config
from mini_transformer.model import Transformer
from mini_transformer.tokenizer import CharTokenizer

from .conftest import REPO_ROOT

TEXT = "hello world\nthe quick brown fox jumps over the lazy dog\n" * 40
NOT_UTF8 = b"model:\n  d_model: 32 \xff\xfe\n"


def one_line_error(status: int, err: str, *fix_words: str) -> str:
    """The error line, after checking it is the only output on stderr, with status 2."""
    assert status == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for word in fix_words:
        assert word in err, err
    return err.rstrip("\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny run: its config, its text, a checkpoint with a training state, and bad files."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "input.txt").write_text(TEXT, encoding="utf-8")
    (root / "config.yaml").write_text(
        "model: {d_model: 16, n_heads: 2, n_layers: 1, block_size: 8, dropout: 0.0}\n"
        f"training: {{batch_size: 2, max_iters: 2, eval_interval: 1, eval_iters: 1, log_interval: 1, "
        f"warmup_iters: 0, device: cpu, tensorboard: false, always_save_checkpoint: true, "
        f"out_dir: {root / 'run'}}}\n"
        f"data: {{path: {root / 'input.txt'}, cache_dir: {root / 'cache'}}}\n", encoding="utf-8")
    config = load_config(root / "config.yaml")
    tokenizer = CharTokenizer.from_text(TEXT)
    config.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(config.model)
    save_checkpoint(root / "run", 1, model, config, tokenizer, train_state={"step": 1})
    (root / "not_utf8.yaml").write_bytes(NOT_UTF8)
    (root / "prompts.txt").write_bytes(b"hello\n\xff\xfe world\n")
    (root / "a_file").write_text("not a directory")
    return root


def gen(run_cli, files, *args):
    return run_cli("generate", "--checkpoint", str(files / "run"), "--device", "cpu", "--max_tokens", "3", *args)


# -- text that is not UTF-8 ---------------------------------------------------------------------------

def test_a_config_file_that_is_not_utf8(run_cli, files):
    for command in (["train"], ["generate", "--checkpoint", str(files / "run"), "--prompt", "a"]):
        err = one_line_error(*run_cli(*command, "--config", str(files / "not_utf8.yaml"))[::2], "save it as UTF-8")
        assert "is not UTF-8 text (byte 0xff at line 2, column 15)" in err


def test_a_prompts_file_that_is_not_utf8(run_cli, files):
    err = one_line_error(*gen(run_cli, files, "--prompts_file", str(files / "prompts.txt"))[::2], "save it as UTF-8")
    assert "(byte 0xff at line 2, column 1)" in err


def test_a_prompt_that_is_not_utf8(run_cli, files):
    # Bytes that are not UTF-8 in argv reach Python as lone surrogates ("surrogateescape").
    err = one_line_error(*gen(run_cli, files, "--prompt", "a\udcff")[::2], "UTF-8")
    assert err == "error: the prompt is not valid UTF-8 text (byte 0xff at character 2); type or save it as UTF-8"


def test_an_interactive_line_that_is_not_utf8_is_refused_and_the_session_goes_on(run_cli, files, monkeypatch):
    typed = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe bad\n/max_tokens 2\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", typed)
    status, out, err = gen(run_cli, files, "--interactive")
    assert status == 0 and err == ""
    assert "error: the line is not valid UTF-8 text (byte 0xff at character 1); type or save it as UTF-8" in out
    assert "max_tokens = 2" in out  # the line after it was still read


# -- numbers: not finite, overflowing, out of range ----------------------------------------------------

@pytest.mark.parametrize("flag", ["--temperature", "--repetition_penalty", "--top_p", "--min_p"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sampling_settings_must_be_finite(run_cli, files, flag, value):
    err = one_line_error(*gen(run_cli, files, "--prompt", "a", flag, value)[::2])
    typical = {"--temperature": "use 0 for greedy, 0.8 for balanced", "--repetition_penalty": "1.0 disables it, try 1.1",
               "--top_p": "try 0.9", "--min_p": "try 0.05"}[flag]
    assert err == f"error: {flag} must be a finite number, got {value}; {typical}"


@pytest.mark.parametrize("override, message", [
    (["--model.d_model", "1.0e+30"], "model.d_model = 1e+30 is too large (at most 2,147,483,647)"),
    (["--training.max_iters", "1.0e+30"], "training.max_iters = 1e+30 is too large (at most 9,223,372,036,854,775,807)"),
    (["--training.batch_size", "1000000000"], "lower training.batch_size (gradient_accumulation_steps makes up"),
    (["--training.lr_decay_iters", "-5"], "training.lr_decay_iters must be >= 0, got -5; leave it unset (null) "
                                          "to decay until max_iters"),
    (["--training.max_seconds", "-1"], "training.max_seconds must be >= 0, got -1.0; leave it unset (null) "
                                       "for no time limit"),
    (["--training.dist_timeout_s", "-3"], "training.dist_timeout_s must be positive, got -3.0; 300 is the default"),
    (["--generation.context_keep", "-2"], "generation.context_keep must be in [1, model.block_size) = [1, 8), "
                                          "got -2; leave it unset for block_size // 2"),
])
def test_config_values_are_refused_before_a_run_starts(run_cli, files, tmp_path, override, message):
    status, _, err = run_cli("train", "--config", str(files / "config.yaml"), "--training.out_dir",
                             str(tmp_path / "run"), "--quiet", *override)
    assert message in one_line_error(status, err)
    assert not (tmp_path / "run").exists()


def test_a_bpe_vocabulary_too_small_is_refused_before_any_text_is_read(run_cli, files, tmp_path):
    status, _, err = run_cli("train", "--config", str(files / "config.yaml"), "--data.tokenizer", "bpe",
                             "--data.bpe_vocab_size", "100", "--data.cache_dir", str(tmp_path / "cache"),
                             "--training.out_dir", str(tmp_path / "run"))
    one_line_error(status, err, "--data.bpe_vocab_size for bpe must be at least 258", "2048 is a good start")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--block_size", "-4"), ("--batch_size", "0"),
                                         ("--gen_tokens", "0")])
def test_bench_counts_must_be_at_least_one(run_cli, tmp_path, flag, value):
    status, out, err = run_cli("bench", flag, value, "--out", str(tmp_path / "bench"))
    assert one_line_error(status, err) == f"error: {flag} must be at least 1, got {value}; leave it out for the default"
    assert out == "" and not (tmp_path / "bench").exists()


# -- a file where a directory goes ------------------------------------------------------------------------

def test_a_file_where_an_output_directory_goes(run_cli, files, tmp_path):
    a_file = str(files / "a_file")
    cases = [
        ["train", "--config", str(files / "config.yaml"), "--training.out_dir", a_file],
        ["train", "--config", str(files / "config.yaml"), "--training.out_dir", os.path.join(a_file, "run")],
        ["prepare", "--input", str(files / "input.txt"), "--out", a_file, "--quiet"],
        ["quantize", "--checkpoint", str(files / "run"), "--mode", "int8", "--out", a_file],
        ["bench", "--out", a_file],
        ["generate", "--checkpoint", str(files / "run"), "--prompt", "a", "--log_attention", "--attention_dir", a_file],
    ]
    for argv in cases:
        status, out, err = run_cli(*argv)
        one_line_error(status, err, a_file, "choose a")
        assert out == ""


def test_a_directory_given_as_the_config_file_names_the_config_inside(run_cli, files, tmp_path):
    directory = files / "run" / "ckpt-00000001"
    err = one_line_error(*run_cli("train", "--config", str(directory))[::2])
    assert err == f"error: config file {str(directory)!r} is a directory; pass a file such as " \
                  f"{str(directory / 'config.yaml')!r}"
    err = one_line_error(*run_cli("train", "--config", str(tmp_path))[::2])
    assert err == f"error: config file {str(tmp_path)!r} is a directory; pass a file"


# -- damaged or mismatched checkpoints ---------------------------------------------------------------------

def test_a_training_state_without_the_expected_keys(run_cli, files):
    state = files / "run" / "ckpt-00000001" / "train_state.pt"
    status, _, err = run_cli("train", "--config", str(files / "config.yaml"), "--resume", "--quiet")
    assert one_line_error(status, err) == (
        f"error: {state} is not a training state this version can resume from (it lacks optimizer, scaler, sampler, "
        f"rng); resume from another checkpoint, or start a new run (in another training.out_dir) from these weights "
        f"with training.init_from {state.parent}")


def test_a_tokenizer_that_disagrees_with_the_models_vocabulary(run_cli, files, tmp_path):
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for path in (files / "run" / "ckpt-00000001").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    CharTokenizer.from_text(TEXT + "XYZ").save(copy)  # three characters more than the model has rows for
    status, _, err = run_cli("generate", "--checkpoint", str(copy), "--prompt", "a", "--device", "cpu")
    assert one_line_error(status, err) == (
        f"error: {copy / 'tokenizer.json'} has 31 tokens but the model's vocabulary is 28: the tokenizer belongs to "
        "another model; put back the tokenizer.json saved with these weights (or retrain)")


def test_finetuning_a_quantized_checkpoint_names_the_one_it_came_from(run_cli, files, tmp_path):
    quantized = tmp_path / "int8"
    assert run_cli("quantize", "--checkpoint", str(files / "run"), "--mode", "int8", "--out", str(quantized))[0] == 0
    status, _, err = run_cli("finetune", "--checkpoint", str(quantized), "--config", str(files / "config.yaml"),
                             "--training.out_dir", str(tmp_path / "ft"), "--quiet")
    assert one_line_error(status, err) == (
        f"error: --checkpoint {quantized} is quantized (int8) and training needs full-precision weights; start "
        f"from the checkpoint it was quantized from ({files / 'run' / 'ckpt-00000001'})")


# -- what the machine refuses --------------------------------------------------------------------------------

def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(run_cli, files, tmp_path, monkeypatch):
    saves = []
    real_save = ckpt.atomic_torch_save

    def disk_fills_up_on_the_second_save(path, obj):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(path, obj)

    monkeypatch.setattr(ckpt, "atomic_torch_save", disk_fills_up_on_the_second_save)
    run = tmp_path / "run"
    status, _, err = run_cli("train", "--config", str(files / "config.yaml"), "--training.out_dir", str(run),
                             "--quiet")
    assert one_line_error(status, err) == (
        f"error: can't save checkpoint {run / 'ckpt-00000002'}: no space left on the device; the previous checkpoint "
        f"{run / 'ckpt-00000001'} is intact: free some space (or lower training.keep_last), then resume the run "
        "(--resume)")
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "ckpt-00000001"
    assert not any(p.name.startswith(".tmp-") for p in run.iterdir())
    assert ckpt.read_train_state(run / "ckpt-00000001")["step"] == 1  # whole and loadable


def test_running_out_of_memory_is_one_line(run_cli, monkeypatch):
    import mini_transformer.training

    def allocate_too_much(*args, **kwargs):
        return np.zeros((10**12, 10**3))

    monkeypatch.setattr(mini_transformer.training, "train", allocate_too_much)
    err = one_line_error(*run_cli("train", "--training.device", "cpu")[::2], "smaller model, batch_size")
    assert err.startswith("error: out of memory (Unable to allocate")


def test_a_reader_that_closes_the_pipe_ends_the_program_quietly(run_cli, monkeypatch):
    import mini_transformer.commands.prepare as prepare

    def reader_gone(args, overrides):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(prepare, "run", reader_gone)
    assert run_cli("prepare", "--input", "x") == (141, "", "")


@pytest.mark.slow  # a real pipe needs a real process: several seconds of imports on a busy machine
def test_generate_piped_into_head_ends_quietly(files):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    process = subprocess.Popen(
        [sys.executable, "-m", "mini_transformer.cli", "generate", "--checkpoint", str(files / "run"), "--device",
         "cpu", "--prompt", "hello", "--max_tokens", "100000", "--stream", "--seed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()  # what head -c 10 does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == b""
