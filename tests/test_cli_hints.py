"""Library errors speak the library's terms; the command line adds the flag a user should change."""

from __future__ import annotations

import pytest

from mini_transformer.checkpoint import save_inference_checkpoint
from mini_transformer.cli import build_parser
from mini_transformer.commands.common import with_flags
from mini_transformer.config import Config, ModelConfig
from mini_transformer.data import prepare_inputs
from mini_transformer.errors import SettingError, UserError
from mini_transformer.model import Transformer
from mini_transformer.tokenizer import BPETokenizer, CharTokenizer
from mini_transformer.training import train


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_prepare_names_the_val_fraction_flag(run_cli, tmp_path, value):
    path = tmp_path / "text.txt"
    path.write_text("some text to prepare\n" * 20, encoding="utf-8")
    status, _, err = run_cli("prepare", "--input", str(path), "--out", str(tmp_path / "o"), "--val_fraction", value,
                             "--quiet")
    assert status == 2
    assert err.startswith("error: --val_fraction must be in (0, 1)") and err.count("\n") == 1


@pytest.mark.parametrize("flags, flag", [
    (["--temperature", "-1"], "--temperature"), (["--top_p", "2"], "--top_p"), (["--top_k", "0"], "--top_k"),
    (["--min_p", "1.5"], "--min_p"), (["--repetition_penalty", "0"], "--repetition_penalty"),
    (["--max_tokens", "-1"], "--max_tokens"), (["--num_samples", "0"], "--num_samples"),
])
def test_generate_names_the_sampling_flag(run_cli, flags, flag):
    status, _, err = run_cli("generate", "--checkpoint", "/nonexistent", "--prompt", "x", *flags)
    assert status == 2
    assert err.startswith(f"error: {flag} ") and err.count("\n") == 1


# -- the library's settings, spelled by each command ------------------------------------------------

def _library_error(call) -> SettingError:
    with pytest.raises(SettingError) as info:
        call()
    assert "--" not in str(info.value), str(info.value)
    return info.value


def _flags(*argv: str) -> dict[str, str]:
    return build_parser().parse_args(list(argv)).setting_flags


def test_prepare_without_input_names_input_and_dataset(tmp_path):
    exc = _library_error(lambda: prepare_inputs([], tmp_path / "o"))
    assert str(exc).startswith("no input given; give text files")
    spelled = with_flags(exc, _flags("prepare", "--input", "x"))
    assert spelled == f"{exc} (--input FILE or --dataset NAME)"


def test_a_missing_input_names_each_commands_dataset_flag(run_cli, tmp_path):
    missing = str(tmp_path / "nope.txt")
    exc = _library_error(lambda: prepare_inputs([missing], tmp_path / "o"))
    status, _, err = run_cli("prepare", "--input", missing, "--out", str(tmp_path / "o"), "--quiet")
    assert status == 2 and err == f"error: {exc} (--dataset NAME)\n"
    status, _, err = run_cli("train", "--data.path", missing, "--training.out_dir", str(tmp_path / "run"), "--quiet")
    assert status == 2 and err == f"error: {exc} (--data.dataset NAME)\n"


def test_a_bpe_vocabulary_too_small_names_each_commands_flag(run_cli, tmp_path):
    exc = _library_error(lambda: BPETokenizer.train(["some text"], vocab_size=100))
    assert str(exc).startswith("vocab_size for bpe must be at least 258") and exc.setting == "vocab_size"
    text = tmp_path / "text.txt"
    text.write_text("some text to prepare\n" * 20, encoding="utf-8")
    status, _, err = run_cli("prepare", "--input", str(text), "--tokenizer", "bpe", "--vocab_size", "100",
                             "--out", str(tmp_path / "o"), "--quiet")
    assert status == 2 and err == ("error: --vocab_size for bpe must be at least 258 (256 bytes + 1 special), got 100; "
                                   "2048 is a good start\n")
    status, _, err = run_cli("train", "--data.path", str(text), "--data.tokenizer", "bpe", "--data.bpe_vocab_size",
                             "100", "--data.cache_dir", str(tmp_path / "c"), "--training.out_dir",
                             str(tmp_path / "run"), "--quiet")
    assert status == 2 and err.startswith("error: --data.bpe_vocab_size for bpe must be at least 258")


def test_quantize_out_over_its_source_names_the_out_flag(run_cli, tmp_path):
    tokenizer = CharTokenizer.from_text("abcdefgh ")
    config = Config()
    config.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=1, block_size=16)
    model = Transformer(config.model)
    source = save_inference_checkpoint(tmp_path / "ckpt", model, config, tokenizer)
    exc = _library_error(lambda: save_inference_checkpoint(source, model, config, tokenizer, source=source))
    assert str(exc) == f"directory {source} would overwrite the checkpoint it is made from; choose a new one"
    status, _, err = run_cli("quantize", "--checkpoint", str(source), "--mode", "int8", "--out", str(source))
    assert status == 2
    assert err == f"error: --out {source} would overwrite the checkpoint it is made from; choose a new one\n"


def test_a_fresh_run_over_an_old_one_names_the_resume_flag(run_cli, tmp_path):
    (tmp_path / "ckpt-00000001").mkdir()  # refused before anything is read
    config = Config()
    config.training.out_dir = str(tmp_path)
    exc = _library_error(lambda: train(config, progress=False, log=None))
    assert str(exc).endswith("or resume the run")
    status, _, err = run_cli("train", "--training.out_dir", str(tmp_path), "--quiet")
    assert status == 2 and err == f"error: {exc} (--resume)\n"
    assert with_flags(exc, _flags("finetune", "--checkpoint", "x")) == f"{exc} (--resume)"
    assert with_flags(exc, _flags("quantize", "--checkpoint", "x", "--mode", "int8", "--out", "y")) == str(exc)


def test_with_flags_spells_settings_and_leaves_other_errors_alone():
    flags = {"input": "--input", "dataset": "--dataset", "vocab_size": "--vocab_size"}
    assert with_flags(UserError("plain"), flags) == "plain"
    assert with_flags(SettingError("vocab_size is 3", setting="vocab_size"), flags) == "--vocab_size is 3"
    assert with_flags(SettingError("too small", setting="vocab_size"), flags) == "--vocab_size: too small"
    assert with_flags(SettingError("too small", setting="group_size"), flags) == "too small"  # no such flag here
    both = SettingError("no text", fixes=[{"input": "FILE"}, {"tokenizer": "byte"}, {"dataset": "NAME"}])
    assert with_flags(both, flags) == "no text (--input FILE or --dataset NAME)"  # an unspellable fix is left out
    together = SettingError("use bpe", fixes=[{"input": "F", "vocab_size": "300"}, {"resume": ""}])
    assert with_flags(together, {**flags, "resume": "--resume"}) == "use bpe (--input F --vocab_size 300 or --resume)"


def test_a_missing_cuda_device_is_named_by_each_commands_flag(monkeypatch):
    import torch

    from mini_transformer.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as caught:
        resolve_device("cuda")
    assert "--" not in str(caught.value)
    assert with_flags(caught.value, {"device": "--training.device"}).endswith("(--training.device cpu)")
    assert with_flags(caught.value, {"device": "--device"}).endswith("(--device cpu)")
