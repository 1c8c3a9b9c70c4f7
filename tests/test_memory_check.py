"""Sizes that cannot fit are refused in one line before anything is allocated; --force skips the check."""

from __future__ import annotations

import time

import pytest
import torch

from mini_transformer import memory_check
from mini_transformer.config import load_config
from mini_transformer.errors import SettingError
from mini_transformer.memory_check import (
    available_ram, generation_need, kv_cache_bytes, refuse_if_too_large, training_fix, training_need,
)

from .test_generate_cli import make_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog\n" * 100  # a val split longer than 257 tokens
GiB = 1 << 30


def train_args(tmp_path, *extra: str) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "input.txt"
    data.write_text(TEXT)
    return ["train", "--quiet", "--training.device", "cpu", "--training.dtype", "fp32",
            "--training.tensorboard", "false", "--data.path", str(data),
            "--data.cache_dir", str(tmp_path / "cache"), "--training.out_dir", str(tmp_path / "out"), *extra]


def tiny_args(tmp_path, *extra: str) -> list[str]:
    return train_args(tmp_path, "--model.d_model", "32", "--model.n_heads", "4", "--model.n_layers", "1",
                      "--model.block_size", "16", "--training.batch_size", "2", "--training.max_iters", "1",
                      "--training.eval_iters", "1", *extra)


@pytest.fixture
def no_model_built(monkeypatch):
    """Building a model (or a KV-cache) fails the test: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("memory was allocated before the check")

    monkeypatch.setattr("mini_transformer.training.loop.Transformer", refuse)
    monkeypatch.setattr("mini_transformer.checkpoint.load_model", refuse)
    monkeypatch.setattr("mini_transformer.model.KVCache.for_model", refuse)


def fake_memory(monkeypatch, n_bytes: int) -> None:
    monkeypatch.setattr(memory_check, "available_memory", lambda device: n_bytes)


def test_a_model_of_trillions_of_parameters_is_refused_at_once(run_cli, tmp_path, no_model_built):
    import mini_transformer.training.loop  # noqa: F401 - imported first, so the timing is the run's

    start = time.perf_counter()
    status, _, err = run_cli(*train_args(tmp_path, "--model.d_model", "65536", "--model.n_layers", "64"))
    elapsed = time.perf_counter() - start
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: training needs at least ") and "TiB" in err
    assert "reduce model.d_model or model.n_layers" in err and err.rstrip().endswith("(--force)")
    assert elapsed < 1.0


def test_a_huge_batch_names_the_batch_size(run_cli, tmp_path, no_model_built):
    status, _, err = run_cli(*train_args(tmp_path, "--preset", "tiny", "--training.batch_size", "200000"))
    assert status == 2 and err.count("\n") == 1
    assert "activations" in err and "reduce training.batch_size" in err and "gradient_checkpointing" in err


def test_force_skips_the_check(run_cli, tmp_path, monkeypatch):
    fake_memory(monkeypatch, 1)  # nothing fits
    status, _, err = run_cli(*tiny_args(tmp_path / "a"))
    assert status == 2 and "of RAM is available" in err
    status, out, _ = run_cli(*tiny_args(tmp_path / "b"), "--force")
    assert status == 0 and "step 1" in out


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_presets_fit_a_small_machine(preset, monkeypatch):
    config = load_config(preset=preset, overrides=["--model.vocab_size", "65"])
    need = training_need(config, torch.float32)
    fake_memory(monkeypatch, 4 * GiB)  # a modest laptop's free RAM
    fix = lambda available: training_fix(config, need, available)  # noqa: E731
    refuse_if_too_large("training", need, torch.device("cpu"), fix)
    # ... and the check is live: the small preset's batch of 32 x 256 tokens does not fit 1 GiB.
    fake_memory(monkeypatch, 1 * GiB)
    if preset == "small":
        with pytest.raises(SettingError, match="reduce training.batch_size"):
            refuse_if_too_large("training", need, torch.device("cpu"), fix)


def test_lora_and_fsdp_need_less():
    config = load_config(preset="small", overrides=["--model.vocab_size", "65"])
    full = training_need(config, torch.float32)
    config.advanced.use_lora = True
    config.training.init_from = "base"
    lora = training_need(config, torch.float32)
    assert lora["gradients"] == lora["optimizer state"] == 0 and lora["weights"] == full["weights"]
    config.advanced.use_lora = False
    sharded = training_need(config, torch.float32, shards=4)
    assert sharded["optimizer state"] == full["optimizer state"] // 4 and sharded["activations"] == full["activations"]
    assert "LoRA" in training_fix(config, {**full, "activations": 0}, available=GiB)
    # Activations dominate, but the parameters' parts alone do not fit: the model is what to reduce.
    config.training.init_from = None
    assert training_fix(config, full, available=GiB).startswith("reduce training.batch_size")
    assert training_fix(config, full, available=full["weights"]) == "reduce model.d_model or model.n_layers"


def test_kv_cache_estimate_equals_the_allocated_cache():
    from mini_transformer.model import KVCache, Transformer

    config = load_config(overrides=["--model.vocab_size", "20", "--model.d_model", "32", "--model.n_heads", "4",
                                    "--model.n_kv_heads", "2", "--model.n_layers", "2",
                                    "--model.block_size", "24"]).model
    cache = KVCache.for_model(Transformer(config), batch_size=3)
    allocated = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert kv_cache_bytes(config, 3, 4) == allocated
    assert generation_need(config, 3, 4)["KV-cache"] == allocated


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("run"), temperature=0.0, max_tokens=4)


def test_generating_millions_of_samples_is_refused_before_loading(run_cli, ckpt, no_model_built):
    status, _, err = run_cli("generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "hello",
                             "--num_samples", "2000000")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: generating 2,000,000 sequences at once needs at least ")
    assert "KV-cache" in err and "generate fewer sequences at once" in err and "(--force)" in err


def test_a_checkpoint_with_a_huge_context_is_refused_before_loading(run_cli, ckpt, tmp_path, no_model_built):
    import shutil

    big = tmp_path / "big"
    shutil.copytree(ckpt, big)
    config = (big / "config.yaml").read_text()
    (big / "config.yaml").write_text(config.replace("block_size: 32", "block_size: 1000000000"))
    status, _, err = run_cli("generate", "--checkpoint", str(big), "--device", "cpu", "--prompt", "hello")
    assert status == 2 and err.count("\n") == 1
    assert "RoPE tables" in err and "shorter context" in err and "1,000,000,000" in err


def test_generate_force_skips_the_check(run_cli, ckpt, monkeypatch):
    fake_memory(monkeypatch, 1)
    args = ["generate", "--checkpoint", ckpt, "--device", "cpu", "--prompt", "hello", "--num_samples", "2"]
    status, _, err = run_cli(*args)
    assert status == 2 and "generating 2 sequences at once" in err
    status, out, _ = run_cli(*args, "--force")
    assert status == 0 and out.count("hello") == 2


def test_available_ram_respects_a_container_limit(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{2 * GiB}\n")
    usage.write_text(f"{GiB // 2}\n")
    monkeypatch.setattr(memory_check, "_CGROUP_FILES", [(str(limit), str(usage))])
    monkeypatch.setattr(memory_check, "_meminfo_available", lambda: 64 * GiB)
    assert available_ram() == GiB + GiB // 2
    limit.write_text("max\n")  # no limit: the kernel's figure
    assert available_ram() == 64 * GiB


@pytest.mark.parametrize("optimizer, overrides", [
    ("adamw", []),
    ("muon", []),
    ("muon", ["--model.n_kv_heads", "2", "--model.activation", "relu2", "--model.bias", "true",
              "--model.tie_embeddings", "false"]),
])
def test_the_optimizer_state_estimate_is_what_one_step_allocates(optimizer, overrides):
    """The estimate of the optimizer's state against the state a real step creates (AdamW's two
    moments, or Muon's momentum for the blocks' matrices and AdamW's for the rest)."""
    from mini_transformer.model import Transformer
    from mini_transformer.training.optim import build_optimizer, muon_available

    if optimizer == "muon" and not muon_available():
        pytest.skip("torch.optim.Muon needs PyTorch >= 2.9")
    config = load_config(preset="tiny", overrides=["--model.vocab_size", "65", "--training.optimizer", optimizer,
                                                   *overrides])
    torch.manual_seed(0)
    model = Transformer(config.model)
    opt = build_optimizer(model, config.training, torch.device("cpu"))
    idx = torch.randint(0, 65, (2, 8))
    model(idx, idx).loss.backward()
    opt.step()
    parts = [opt] if optimizer == "adamw" else [opt.adamw, opt.muon]
    allocated = sum(t.numel() * t.element_size() for part in parts for state in part.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert training_need(config, torch.float32)["optimizer state"] == allocated
