"""Inputs the fuzz test (test_fuzz.py) found failing with a traceback, kept as plain tests: each is
now a one-line error with exit status 2."""

from __future__ import annotations

import pytest
import torch

from mini_transformer.device import resolve_device
from mini_transformer.errors import UserError
from mini_transformer.tokenizer import BPETokenizer

from .test_generate_cli import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("run"), temperature=0.0, max_tokens=4)


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("spec", ["meta", "xla", "tpu", "", "mps"])
def test_devices_torch_knows_but_the_project_does_not_run_on(spec):
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    with pytest.raises(UserError, match="unknown device|not available"):
        resolve_device(spec)


def test_a_seed_outside_32_bits_is_refused(run_cli, ckpt, tmp_path):
    status, _, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "he",
                             "--seed", str(2**70))
    assert status == 2 and one_error_line(err).startswith("error: --seed must be in [0, 2**32)")
    status, _, err = run_cli("train", "--training.seed", "-1", "--data.path", str(tmp_path / "none.txt"))
    assert status == 2 and one_error_line(err).startswith("error: training.seed must be in [0, 2**32), got -1")


def test_a_prompts_file_that_is_not_utf8(run_cli, ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")
    status, _, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompts_file", str(prompts))
    assert status == 2 and "is not UTF-8 text (byte 0xe9 at line 1, column 4)" in one_error_line(err)


def test_a_bad_context_keep_is_refused_before_generating(run_cli, ckpt):
    status, out, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "",
                               "--generation.context_keep", "0")
    assert status == 2 and out == "" and "context_keep must be in [1, 32)" in one_error_line(err)


def test_output_directories_that_are_files(run_cli, ckpt, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("hello world\n" * 20)
    status, _, err = run_cli("prepare", "--quiet", "--input", str(text), "--out", str(text))
    assert status == 2 and one_error_line(err).startswith(f"error: can't create the directory {text}: {text} is a file")
    status, _, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "he", "--max_tokens",
                             "1", "--log_attention", "--attention_dir", str(text))
    assert status == 2 and one_error_line(err).startswith(f"error: can't create the directory {text}: {text} is a file")


def test_a_huge_bpe_vocabulary_is_refused_before_the_trainer_reserves_it():
    pytest.importorskip("tokenizers")
    with pytest.raises(UserError, match="at most 1,048,576"):
        BPETokenizer.train(["hello world"], vocab_size=2**31)  # the trainer would abort the process


def test_a_cache_dir_that_is_a_file(run_cli, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("hello world\n" * 20)
    status, _, err = run_cli("train", "--quiet", "--data.path", str(text), "--data.cache_dir", str(text / "cache"),
                             "--training.out_dir", str(tmp_path / "out"))
    assert status == 2 and one_error_line(err).startswith(f"error: can't create the directory {text / 'cache'}: {text} is a file")


def test_a_huge_read_block_is_refused(run_cli, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("hello world\n" * 20)
    status, _, err = run_cli("prepare", "--quiet", "--input", str(text), "--out", str(tmp_path / "p"),
                             "--chunk_size", str(10**12))
    assert status == 2 and one_error_line(err).startswith("error: --chunk_size must be in [1, 2**30]")


def test_compare_plain_with_no_tokens(run_cli, ckpt):
    status, _, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "he", "--max_tokens", "0",
                             "--draft_checkpoint", ckpt, "--compare_plain")
    assert status == 0 and "no tokens to compare" in err


def test_a_tiny_temperature_samples_near_greedy():
    from mini_transformer.generation import SamplingParams, sample_next_token

    logits = torch.tensor([[1.0, 3.0, 2.0], [100.0, -5.0, 99.0]])
    tokens = sample_next_token(logits, SamplingParams(temperature=1e-296), generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 0]  # logits / 1e-296 overflowed to inf: NaN probabilities


def test_an_unknown_key_with_a_line_break_is_named_on_one_line(tmp_path):
    from mini_transformer.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("model:\n ? '\n\n'\n0:", encoding="utf-8")  # a YAML key that is a line break
    with pytest.raises(UserError) as info:
        load_config(path)
    assert "\n" not in str(info.value) and "unknown config key 'model.\\n'" in str(info.value)


def test_the_perplexity_of_a_diverged_run_is_inf_not_an_overflow():
    from mini_transformer.training.loop import perplexity

    assert perplexity(0.0) == 1.0 and perplexity(2.0) == pytest.approx(7.389056)
    assert perplexity(1e4) == float("inf")  # math.exp raises OverflowError past ~709.78
