"""LoRA adapters: exactness at init, what trains, merging, saving, and refusing a foreign base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from mini_transformer.config import ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.lora import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoRALinear, LoRASettings, apply_lora, base_fingerprint,
    load_adapter, load_lora_state_dict, lora_layers, lora_parameter_counts, lora_settings, lora_state_dict,
    merge_lora, save_adapter,
)
from mini_transformer.model import Transformer
from mini_transformer.quantize import quantize_model
from mini_transformer.weights import model_fingerprint


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine lose a lot."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=48, d_model=64, n_heads=4, n_layers=2, block_size=32, dropout=0.0)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(1))


def base_bytes(model: nn.Module) -> dict[str, bytes]:
    # Raw bytes (a uint8 view, since numpy has no bf16): equal only if bit-for-bit identical.
    return {k: v.detach().contiguous().flatten().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items() if "lora_" not in k}


def train_adapters(model: nn.Module, idx: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on next-token prediction of ``idx``; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("targets", [("attention",), ("attention", "ffn")])
def test_initial_output_equals_base(base, idx, targets):
    expected = base(idx).logits
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets)
    assert torch.equal(model(idx).logits, expected)  # B = 0: exactly the base
    wrapped = set(lora_layers(model))
    per_block = {"attention": {"attn.qkv", "attn.proj"}, "ffn": {"ffn.gate_up", "ffn.down"}}
    assert wrapped == {f"blocks.{i}.{p}" for i in range(2) for t in targets for p in per_block[t]}


def test_only_adapters_require_grad_and_head_stays_tied(base):
    model = apply_lora(copy.deepcopy(base), rank=8, alpha=16, targets=("attention", "ffn"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not model.tok_emb.weight.requires_grad and not model.norm.weight.requires_grad
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight
    layer = model.blocks[0].attn.qkv
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (192, 8) and layer.scaling == 2.0
    assert not layer.lora_B.any()


def test_trainable_fraction_small_preset_below_two_percent():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=65, d_model=256, n_heads=8, n_layers=6, block_size=64))
    total_before = model.num_parameters()
    apply_lora(model, rank=8, alpha=16)
    trainable, total, fraction = lora_parameter_counts(model)
    # rank 8 on qkv (256 -> 768) and proj (256 -> 256) in 6 blocks: 8 * (1024 + 512) * 6
    assert trainable == 8 * (256 + 768 + 256 + 256) * 6
    assert total == total_before + trainable
    assert fraction < 0.02


def test_training_changes_adapters_only(base, idx):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.1, targets=("attention", "ffn"))
    before = base_bytes(model)
    adapters_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    losses = train_adapters(model, idx, steps=6)
    assert losses[-1] < losses[0]
    assert base_bytes(model) == before  # byte-identical base, embedding and norms included
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    after = lora_state_dict(model)
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after if k.endswith("lora_B"))


def test_merge_matches_unmerged(base, idx):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=("attention", "ffn"))
    train_adapters(model, idx, steps=3)
    model.eval()
    with torch.no_grad():
        unmerged = model(idx).logits
        merge_lora(model)
        merged = model(idx).logits
    assert not lora_layers(model)
    layers = [m for n, m in model.named_modules() if n.endswith(("qkv", "proj", "gate_up", "down"))]
    assert layers and all(type(m) is nn.Linear for m in layers)
    assert model.lm_head.weight is model.tok_emb.weight  # tying survives the merge
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())  # plain checkpoint names again


def test_state_dict_round_trip(base, idx):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    train_adapters(model, idx, steps=2)
    state = lora_state_dict(model)
    assert set(state) == {f"blocks.{i}.attn.{l}.lora_{m}" for i in range(2) for l in ("qkv", "proj") for m in "AB"}
    other = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    load_lora_state_dict(other, state)
    model.eval(), other.eval()
    assert torch.equal(other(idx).logits, model(idx).logits)
    with pytest.raises(UserError, match="rank"):
        load_lora_state_dict(apply_lora(copy.deepcopy(base), rank=2, alpha=8), state)


def test_save_and_load_adapter(base, idx, tmp_path):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.05, targets=("attention", "ffn"))
    train_adapters(model, idx, steps=2)
    model.eval()
    save_adapter(tmp_path, model)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.05, "targets": ["attention", "ffn"]}
    assert meta["base"]["config_hash"] == model_fingerprint(base.config)
    assert (tmp_path / ADAPTER_WEIGHTS_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    fresh = load_adapter(tmp_path, copy.deepcopy(base)).eval()  # applies LoRA from adapter.json
    assert lora_settings(fresh) == LoRASettings(4, 8.0, 0.05, ["attention", "ffn"])
    assert torch.equal(fresh(idx).logits, model(idx).logits)


@pytest.mark.parametrize("change", [{"d_model": 32}, {"n_layers": 3}, {"vocab_size": 50}])
def test_adapter_on_a_different_base_is_refused(base, tmp_path, change):
    save_adapter(tmp_path, apply_lora(copy.deepcopy(base), rank=4, alpha=8))
    torch.manual_seed(0)
    other = Transformer(tiny_config(**change))
    with pytest.raises(UserError, match="adapter was trained on a different base") as info:
        load_adapter(tmp_path, other)
    assert "\n" not in str(info.value)
    assert next(iter(change)) in str(info.value)  # names the difference
    assert not lora_layers(other)  # refused before touching the model


def test_adapter_on_other_weights_of_the_same_shape_is_refused(base, idx, tmp_path):
    """Same architecture, other weights: refused; the same weights in a fresh model: accepted;
    a quantized base (QLoRA) is checked by shape only."""
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    train_adapters(model, idx, steps=1)
    save_adapter(tmp_path, model)
    torch.manual_seed(1)
    other = Transformer(tiny_config()).eval()
    with pytest.raises(UserError, match="other weights of this architecture") as info:
        load_adapter(tmp_path, other)
    assert "\n" not in str(info.value) and not lora_layers(other)
    same = Transformer(tiny_config()).eval()
    same.load_state_dict(base.state_dict())
    assert torch.equal(load_adapter(tmp_path, same).eval()(idx).logits, model.eval()(idx).logits)
    load_adapter(tmp_path, copy.deepcopy(base).to(torch.bfloat16))  # the same weights in bf16
    load_adapter(tmp_path, quantize_model(copy.deepcopy(other), "int8"))  # QLoRA: shapes only
    # An adapter written before weights were hashed is checked by architecture and shapes.
    meta = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    del meta["base_weights_hash"]
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta))
    load_adapter(tmp_path, copy.deepcopy(other))


def test_adapters_of_earlier_versions_still_fit(base, idx, tmp_path):
    """adapter.json files written earlier record these very values under these keys: the
    fingerprint (the checkpoint's model_fingerprint) and the shapes hash must not drift."""
    assert base_fingerprint(base) == {"config_hash": "56d5e5008af711d9", "shapes_hash": "db64a6ce56fbd1fd"}
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    train_adapters(model, idx, steps=1)
    save_adapter(tmp_path, model)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert set(meta) == {"format_version", "lora", "base", "base_architecture", "base_shapes", "base_weights_hash"}
    meta["base"] = {"config_hash": "56d5e5008af711d9", "shapes_hash": "db64a6ce56fbd1fd"}
    del meta["base_weights_hash"]  # as written before the base's weights were hashed
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_adapter(tmp_path, copy.deepcopy(base)).eval()
    assert torch.equal(loaded(idx).logits, model.eval()(idx).logits)


def test_user_errors(base, tmp_path):
    with pytest.raises(UserError, match="unknown LoRA target"):
        apply_lora(copy.deepcopy(base), targets=("mlp",))
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(UserError, match="not found"):
        load_adapter(tmp_path / "nowhere", copy.deepcopy(base))
    with pytest.raises(UserError, match="no LoRA adapters"):
        save_adapter(tmp_path, base)


def test_dropout_only_in_training(base, idx):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.5)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    model.eval()
    assert torch.equal(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)


@pytest.mark.parametrize("mode,group_size", [("int8", 128), ("int4", 32)])
def test_qlora_trains_adapters_on_a_frozen_quantized_base(base, idx, tmp_path, mode, group_size):
    model = quantize_model(copy.deepcopy(base), mode, group_size)
    apply_lora(model, rank=4, alpha=8, targets=("attention", "ffn"))
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    before = base_bytes(model)
    losses = train_adapters(model, idx, steps=6)
    assert losses[-1] < losses[0]
    assert base_bytes(model) == before
    # The fingerprint ignores quantization: a QLoRA adapter loads onto the full-precision base.
    assert base_fingerprint(model) == base_fingerprint(base)
    save_adapter(tmp_path, model)
    fp = load_adapter(tmp_path, copy.deepcopy(base)).eval()
    with torch.no_grad():
        rel = (fp(idx).logits - model.eval()(idx).logits).norm() / fp(idx).logits.norm()
    assert rel < (0.02 if mode == "int8" else 0.15)
    with pytest.raises(UserError, match="merge"):
        merge_lora(model)
