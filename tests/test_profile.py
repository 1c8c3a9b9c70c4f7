import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mini_transformer.config import ModelConfig, load_config
from mini_transformer.model import Transformer
from mini_transformer.profile import count_parameters, estimate_memory, flops_per_token

from .conftest import REPO_ROOT


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_kv_heads=1, vocab_size=512),
    dict(d_model=256, n_heads=8, n_layers=3, block_size=128, vocab_size=2048),
])
def test_analytic_flops_match_flop_counter_within_10_percent(overrides):
    # The math path makes every matmul visible to FlopCounterMode.
    base = dict(vocab_size=65, d_model=128, n_heads=4, n_layers=4, block_size=64, dropout=0.0, attention="math")
    base.update(overrides)
    assert_analytic_flops_match_flop_counter(ModelConfig(**base))


def assert_analytic_flops_match_flop_counter(config: ModelConfig) -> None:
    """flops_per_token within 10% of what FlopCounterMode counts, forward and training step
    (the config should use the math attention path, which makes every matmul visible)."""
    model = Transformer(config)
    B, T = 2, config.block_size
    idx = torch.randint(0, config.vocab_size, (B, T))
    forward_expected, train_expected = flops_per_token(config)
    with FlopCounterMode(display=False) as counter:
        model(idx)
    forward_measured = counter.get_total_flops() / (B * T)
    assert abs(forward_measured - forward_expected) / forward_measured < 0.10
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).loss.backward()
    train_measured = counter.get_total_flops() / (B * T)
    assert abs(train_measured - train_expected) / train_measured < 0.10


def test_memory_estimate_components():
    config = load_config(preset="small").model
    config.vocab_size = 65
    params = count_parameters(config).total
    estimate = estimate_memory(config, batch_size=32)
    assert estimate.weights == 4 * params and estimate.optimizer == 8 * params
    checkpointed = estimate_memory(config, batch_size=32, gradient_checkpointing=True)
    assert checkpointed.activations < estimate.activations / 2


@pytest.mark.slow  # measures a training step in a fresh process
def test_profile_command_prints_table(run_cli):
    status, out, _ = run_cli("profile", "--preset", "tiny", "--training.batch_size", "2")
    assert status == 0
    assert "| parameters, total" in out and "FLOPs per token, training step" in out
    assert "measured peak of one training step" in out
    total = count_parameters(ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, block_size=128)).total
    assert f"{total:,}" in out


def test_matmul_ceiling_is_measured_without_touching_the_global_rng():
    """The MFU ceiling uses a private generator: a resumed run's random stream stays exact."""
    from mini_transformer.profile import measure_matmul_flops

    torch.manual_seed(123)
    state = torch.get_rng_state()
    flops = measure_matmul_flops(torch.device("cpu"), torch.float32, size=256, min_seconds=0.05)
    assert torch.equal(torch.get_rng_state(), state)
    # Random inputs, not constants or zeros (which some GPUs multiply faster than real data).
    seen = []
    real_mm = torch.mm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "mm", lambda a, b: seen.append(a[:4, :4].clone()) or real_mm(a, b))
        measure_matmul_flops(torch.device("cpu"), torch.float32, size=64, min_seconds=0.01)
    assert seen and seen[0].unique().numel() == 16
    # At least a (very slow) 100 MFLOP/s, and below 1 PFLOP/s: a real rate, not a unit slip.
    assert 1e8 < flops < 1e15


def test_tf32_is_allowed_on_cuda_only_and_restored():
    from mini_transformer.device import allow_tf32_on_cuda, restore_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert allow_tf32_on_cuda(torch.device("cpu")) == (False, False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        previous = allow_tf32_on_cuda(torch.device("cuda"))  # only flips backend flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        restore_tf32(previous)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_training_does_not_import_the_profile_module():
    """profile.py (tables, memory estimates) builds on training.flops, never the other way round."""
    code = ("import sys, mini_transformer.training.loop; "
            "assert 'mini_transformer.profile' not in sys.modules, 'training imports profile'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
