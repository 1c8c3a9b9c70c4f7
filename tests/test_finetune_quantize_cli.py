"""End to end: train a base, LoRA fine-tune on a second corpus, merge, quantize; and the bad inputs."""

import json
import subprocess
import sys

import pytest
import torch

from mini_transformer import checkpoint as ckpt
from mini_transformer.lora import load_adapter, lora_state_dict, read_adapter_config

from .conftest import REPO_ROOT
from .test_train import CORPUS, quiet, small_config

# A second corpus in the same characters (the char vocabulary is the base's): each line reversed
# word by word, so the base has not seen these sequences.
SECOND_CORPUS = "".join(" ".join(reversed(line.split(" "))) + "\n" for line in CORPUS.splitlines())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    config = small_config(tmp, max_iters=40, eval_interval=40, learning_rate=1e-2)
    config.model.dropout = 0.0
    quiet(config)
    return tmp / "out"


def lora_config(tmp, base, **training):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "second.txt").write_text(SECOND_CORPUS)
    config = small_config(tmp, **training)
    config.data.path = str(tmp / "second.txt")
    config.training.init_from = str(base)
    config.training.out_dir = str(tmp / "lora")
    config.advanced.use_lora = True
    config.advanced.lora_rank = 4
    config.advanced.lora_targets = ["attention", "ffn"]
    return config


def weights_bytes(directory):
    return {k: v.numpy().tobytes() for k, v in ckpt.read_weights(directory / "model.safetensors").items()}


@pytest.mark.slow  # runs the CLI as a process
def test_lora_finetune_merge_and_generate(base_run, tmp_path):
    base_dir = ckpt.resolve_checkpoint(base_run)
    before = weights_bytes(base_dir)
    config = lora_config(tmp_path, base_run, max_iters=30, eval_interval=10, learning_rate=1e-2)
    result = quiet(config)
    records = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["iter"] == 0 and "val_loss" in records[0]  # the base model on the new corpus
    assert val[-1] < val[0] - 0.05
    assert weights_bytes(base_dir) == before  # the base checkpoint is untouched

    # The fine-tuned model's frozen base weights are byte-identical to the base checkpoint's.
    model, _, _ = ckpt.load_for_inference(tmp_path / "lora")
    for name, tensor in model.state_dict().items():
        plain = name.replace(".base.", ".")
        if "lora_" not in name and plain in before:
            assert tensor.numpy().tobytes() == before[plain], name
    assert (tmp_path / "lora" / "adapter" / "adapter.safetensors").is_file()

    # merge: merged and unmerged logits agree.
    status = subprocess.run([sys.executable, "-m", "mini_transformer", "merge", "--checkpoint", str(base_run),
                             "--adapter", str(tmp_path / "lora" / "adapter"), "--out", str(tmp_path / "merged")],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    base_model, _, _ = ckpt.load_for_inference(base_run, adapter=tmp_path / "lora" / "adapter")
    merged, _, tokenizer = ckpt.load_for_inference(tmp_path / "merged")
    idx = torch.tensor([tokenizer.encode("question the is")])
    assert (merged(idx).logits - base_model(idx).logits).abs().max().item() <= 1e-5
    assert lora_state_dict(base_model)  # the unmerged model does carry adapters
    assert result.final_val_loss is not None


def test_lora_resume_continues_exactly(base_run, tmp_path):
    full = quiet(lora_config(tmp_path / "a", base_run, max_iters=6, lr_decay_iters=6, eval_interval=3))
    first = quiet(lora_config(tmp_path / "b", base_run, max_iters=3, lr_decay_iters=6, eval_interval=3))
    second = quiet(lora_config(tmp_path / "b", base_run, max_iters=6, lr_decay_iters=6, eval_interval=3),
                   resume=True)
    for a, b in zip(full.losses, first.losses + second.losses):
        assert abs(a - b) <= 1e-6
    # The resumed run's adapter names the base it was trained on, so it loads onto that base.
    adapter = tmp_path / "b" / "lora" / "adapter"
    assert read_adapter_config(adapter)["base_weights_hash"] == \
        read_adapter_config(tmp_path / "a" / "lora" / "adapter")["base_weights_hash"]
    load_adapter(adapter, ckpt.load_model(ckpt.resolve_checkpoint(base_run)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mini_transformer", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow  # runs the CLI as a process
def test_quantize_cli_sizes_and_loading(base_run, tmp_path):
    for mode, group in (("int8", None), ("int4", "32")):
        args = ["quantize", "--checkpoint", str(base_run), "--mode", mode, "--out", str(tmp_path / mode)]
        if group:
            args += ["--group_size", group]
        status = run_cli(*args)
        assert status.returncode == 0, status.stderr
        model, config, tokenizer = ckpt.load_for_inference(tmp_path / mode)
        assert config.advanced.quantize == mode
        full, _, _ = ckpt.load_for_inference(base_run)
        idx = torch.tensor([tokenizer.encode("To be, or not")])
        error = (model(idx).logits - full(idx).logits).abs().max().item()
        assert error < 0.5
    # The tiny test model is dominated by norms and embedding; the size ratios on the small preset
    # are measured in BENCHMARKS.md and tested in test_quantize.py.


@pytest.mark.slow  # runs the CLI as a process
@pytest.mark.parametrize("args, pattern", [
    (["--mode", "int3"], "int8 or int4"),
    (["--mode", "int4", "--group_size", "48"], "group"),
])
def test_quantize_bad_input(base_run, tmp_path, args, pattern):
    status = run_cli("quantize", "--checkpoint", str(base_run), "--out", str(tmp_path / "q"), *args)
    assert status.returncode == 2
    lines = status.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0] and "Traceback" not in status.stderr


@pytest.mark.slow  # runs the CLI as a process
def test_quantizing_twice_and_mismatched_adapter_are_refused(base_run, tmp_path):
    assert run_cli("quantize", "--checkpoint", str(base_run), "--mode", "int8", "--out",
                   str(tmp_path / "q8")).returncode == 0
    again = run_cli("quantize", "--checkpoint", str(tmp_path / "q8"), "--mode", "int4", "--out", str(tmp_path / "q4"))
    assert again.returncode == 2 and "already quantized" in again.stderr

    # An adapter trained on another architecture.
    other_tmp = tmp_path / "other"
    other = small_config(other_tmp, max_iters=2, eval_interval=2)
    other.model.n_layers = 1
    quiet(other)
    tuned = lora_config(other_tmp, other_tmp / "out", max_iters=2, eval_interval=2)
    quiet(tuned)
    status = run_cli("merge", "--checkpoint", str(base_run), "--adapter", str(other_tmp / "lora" / "adapter"),
                     "--out", str(tmp_path / "m"))
    assert status.returncode == 2 and "different base" in status.stderr


@pytest.mark.slow  # runs the CLI as a process
def test_quantize_never_overwrites_its_source_or_other_files(base_run, tmp_path):
    status = run_cli("quantize", "--checkpoint", str(base_run), "--mode", "int8", "--out", str(base_run))
    assert status.returncode == 2 and "overwrite" in status.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    status = run_cli("quantize", "--checkpoint", str(base_run), "--mode", "int8", "--out", str(tmp_path / "notes"))
    assert status.returncode == 2 and "not a checkpoint" in status.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_lora_resume_takes_the_base_architecture_not_the_run_config(tmp_path):
    base_tmp = tmp_path / "base"
    base = small_config(base_tmp, max_iters=2, eval_interval=2)
    base.model.n_layers = 1  # a shape the fine-tuning config below does not state
    quiet(base)
    first = lora_config(tmp_path / "ft", base_tmp / "out", max_iters=2, lr_decay_iters=4, eval_interval=2)
    assert first.model.n_layers != 1
    quiet(first)
    resumed = quiet(lora_config(tmp_path / "ft", base_tmp / "out", max_iters=4, lr_decay_iters=4, eval_interval=2),
                    resume=True)
    assert resumed.step == 4


def test_generate_builds_a_lora_run_from_its_own_config(base_run, tmp_path, capsys):
    """Overrides of the LoRA settings change how generate samples, never how the run's model is
    rebuilt: the adapters keep the rank, alpha and targets they were trained with."""
    from mini_transformer.cli import main

    quiet(lora_config(tmp_path, base_run, max_iters=4, eval_interval=4, learning_rate=5e-2))
    outputs = []
    for extra in ([], ["--advanced.lora_alpha", "200", "--advanced.lora_rank", "2"]):
        assert main(["generate", "--checkpoint", str(tmp_path / "lora"), "--prompt", "the", "--max_tokens", "40",
                     "--temperature", "0", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
