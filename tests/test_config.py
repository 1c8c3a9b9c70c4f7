import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mini_transformer.config import (
    SECTION_TYPES, Config, _flat_key_homes, _type_hints, load_config, preset_names, preset_path,
)
from mini_transformer.errors import UserError

from .conftest import REPO_ROOT

SEED_SNIPPETS = {
    "configure": """
model:
  d_model: 256        # Model dimension
  n_heads: 8          # Number of attention heads
  n_layers: 6         # Number of transformer blocks
  block_size: 256     # Context length
  dropout: 0.1        # Dropout rate

training:
  batch_size: 32
  learning_rate: 3.0e-4
  max_iters: 10000
""",
    "tiny": "d_model: 128\nn_heads: 4\nn_layers: 4\nblock_size: 128\n",
    "gpt2": """
model:
  d_model: 768
  n_heads: 12
  n_layers: 12
  block_size: 1024
  vocab_size: 50257  # GPT-2 BPE vocab

training:
  batch_size: 12  # Adjust for your GPU
  learning_rate: 2.5e-4
  max_iters: 600000
  warmup_iters: 2000
""",
    "lora": "advanced:\n  use_lora: true\n  lora_rank: 8\n  lora_alpha: 16\n",
    "int8": 'advanced:\n  quantize: "int8"\n',
    "int4": 'advanced:\n  quantize: "int4"\n',
    "attention": "advanced:\n  log_attention: true\n",
    "speculative": "advanced:\n  speculative_sampling: true\n",
    "compile": "compile: true\n",
}


@pytest.mark.parametrize("name", sorted(SEED_SNIPPETS))
def test_every_seed_snippet_loads(tmp_path, name):
    path = tmp_path / "c.yaml"
    path.write_text(SEED_SNIPPETS[name])
    config = load_config(path)
    raw = yaml.safe_load(SEED_SNIPPETS[name])
    for key, value in raw.items():
        if isinstance(value, dict):
            for k, v in value.items():
                assert getattr(getattr(config, key), k) == v
        else:
            assert getattr(getattr(config, _flat_key_homes()[key]), key) == value


def test_flat_keys_are_unique_across_sections():
    seen = {}
    for section, cls in SECTION_TYPES.items():
        for key in _type_hints(cls):
            assert key not in seen, f"{key} is in both {seen.get(key)} and {section}"
            seen[key] = section


def test_root_config_yaml_loads_and_roundtrips(tmp_path):
    config = load_config(f"{REPO_ROOT}/config.yaml")
    assert config.model.d_model == 256 and config.data.path == "data/input.txt"
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_presets_exist_with_seed_sizes():
    assert {"tiny", "small", "medium", "large", "gpt2"} <= set(preset_names())
    sizes = {name: load_config(preset=name).model for name in ("tiny", "small", "medium", "large")}
    assert (sizes["tiny"].d_model, sizes["tiny"].n_heads, sizes["tiny"].n_layers, sizes["tiny"].block_size) == (128, 4, 4, 128)
    assert (sizes["small"].d_model, sizes["small"].n_layers, sizes["small"].block_size) == (256, 6, 256)
    assert (sizes["medium"].d_model, sizes["medium"].n_layers, sizes["medium"].block_size) == (512, 12, 512)
    assert (sizes["large"].d_model, sizes["large"].n_heads, sizes["large"].n_layers) == (768, 12, 24)


def test_overrides_both_forms_and_types():
    config = load_config(preset="tiny", overrides=[
        "--model.d_model", "64", "--training.max_iters=100", "--data.path", "data/input.txt",
        "--training.learning_rate", "1e-3", "--model.n_kv_heads", "2", "--training.compile", "true",
        "--generation.top_k", "null", "--advanced.lora_targets", "attention,ffn",
    ])
    assert config.model.d_model == 64 and config.training.max_iters == 100
    assert config.data.path == "data/input.txt"
    assert config.training.learning_rate == pytest.approx(1e-3)
    assert config.model.n_kv_heads == 2 and config.training.compile is True
    assert config.generation.top_k is None
    assert config.advanced.lora_targets == ["attention", "ffn"]


def test_string_keys_keep_numeric_looking_values():
    config = load_config(overrides=["--training.out_dir", "123"])
    assert config.training.out_dir == "123"


@pytest.mark.parametrize("overrides, pattern", [
    (["--model.d_modle", "3"], r"unknown config key 'model.d_modle'; did you mean 'model.d_model'"),
    (["--modle.d_model", "3"], r"did you mean 'model.d_model'"),
    (["--model.d_model", "abc"], r"model.d_model must be an integer, got 'abc'"),
    (["--model.dropout", "yes"], r"model.dropout must be a number"),
    (["--training.compile", "3"], r"training.compile must be true or false"),
    (["--model.norm", "batchnorm"], r"model.norm must be one of 'layernorm', 'rmsnorm'"),
    (["--model.d_model", "100"], r"model.d_model \(100\) must be divisible by model.n_heads \(8\)"),
    (["--model.n_kv_heads", "3"], r"model.n_heads \(8\) must be divisible by model.n_kv_heads \(3\)"),
    (["--model.n_layers", "0"], r"model.n_layers must be positive"),
    (["--training.batch_size", "-4"], r"training.batch_size must be positive"),
    (["--model.dropout", "1.0"], r"model.dropout must be in \[0, 1\)"),
    (["--model.dropout", "-0.1"], r"model.dropout must be in \[0, 1\)"),
])
def test_config_errors_are_one_clear_line(overrides, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_unknown_yaml_key_and_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_head: 4\n")
    with pytest.raises(UserError, match=r"did you mean 'model.n_heads'"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="unknown preset 'tinny'; did you mean 'tiny'"):
        load_config(preset="tinny")


@pytest.mark.slow  # runs the CLI as a process
@pytest.mark.parametrize("argv, pattern", [
    (["--model.d_modle", "3"], r"did you mean --model\.d_model\?"),
    (["--model.d_model", "abc"], "must be an integer"),
    (["--model.d_model", "130"], "must be divisible by model.n_heads"),
    (["--model.n_kv_heads", "3"], "must be divisible by model.n_kv_heads"),
    (["--model.block_size", "0"], "must be positive"),
    (["--model.dropout", "1.5"], r"must be in \[0, 1\)"),
])
def test_cli_config_errors_exit_2_without_traceback(argv, pattern):
    proc = subprocess.run(
        [sys.executable, "-m", "mini_transformer", "profile", "--preset", "tiny", "--no_measure", *argv],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(pattern, lines[0])
    assert "Traceback" not in proc.stderr


def test_config_equality_after_dict_roundtrip():
    config = load_config(preset="gpt2")
    assert Config.from_dict(config.to_dict()) == config


def test_the_modern_cpu_recipe_is_the_cpu_recipe_with_the_ablations_levers():
    # BENCHMARKS.md's ablation runs the modern recipe as the CPU recipe plus every lever of
    # benchmarks/ablate.py ("all"): the two must not drift apart.
    benchmarks = str(Path(REPO_ROOT) / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from ablate import variant_overrides
    finally:
        sys.path.remove(benchmarks)
    ablated = load_config(Path(REPO_ROOT) / "configs/shakespeare_char_cpu.yaml", overrides=variant_overrides("all"))
    modern = load_config(Path(REPO_ROOT) / "configs/shakespeare_char_cpu_modern.yaml")
    ablated.training.out_dir = modern.training.out_dir
    assert (ablated.model, ablated.training, ablated.data) == (modern.model, modern.training, modern.data)
    # The packaged presets are the same files.
    for name in ("shakespeare_char_cpu_modern", "shakespeare_char_cpu_30min"):
        assert (Path(REPO_ROOT) / "configs" / f"{name}.yaml").read_text() == preset_path(name).read_text()
