"""Weight-only int8/int4 quantization: error bounds, kernels vs reference, storage, refusals, perplexity."""

from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes

from mini_transformer.config import ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.model import KVCache, Transformer
from mini_transformer.quantize import (
    KERNEL_MAX_ROWS, QUANTIZATION_FILE, Int4Linear, Int8Linear, QuantizedEmbedding, build_quantized_model,
    dequantize_int4, dequantize_int8, load_quantized, pack_int4, quantization_meta, quantize_int4, quantize_int8,
    quantize_model, quantized_state_dict_to_model, read_quantization_meta, refuse_if_quantized, save_quantized,
    unpack_int4, valid_group_sizes,
)
from mini_transformer.weights import weights_state_dict


@contextlib.contextmanager
def threads(n: int):
    """One thread: tiny matmuls gain nothing from two, and a busy machine makes two much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield


def tiny_config(**overrides) -> ModelConfig:
    # hidden size 192: int4 group sizes 32 and 64 divide every width, 128 does not.
    fields = dict(vocab_size=64, d_model=64, n_heads=4, n_layers=2, block_size=32, dropout=0.0)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- the schemes --------------------------------------------------------------------------------

def test_int8_error_within_half_a_step_per_row():
    w = torch.randn(96, 80) * torch.logspace(-3, 0, 96)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    torch.testing.assert_close(scales, w.abs().amax(1) / 127)
    err = (w - dequantize_int8(q, scales)).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert q.abs().amax(1).eq(127).all()  # each row uses its full range


def test_int4_error_within_half_a_step_per_group():
    g = 32
    w = torch.randn(48, 128) + torch.linspace(-2, 2, 48)[:, None]  # skewed rows: asymmetric helps
    packed, scales, zeros = quantize_int4(w, g)
    assert packed.shape == (48, 64) and packed.dtype == torch.uint8
    assert scales.shape == zeros.shape == (48, 4) and scales.dtype == torch.bfloat16
    dq = dequantize_int4(packed, scales, zeros, g)
    step = scales.float().repeat_interleave(g, dim=1)  # (48, 128): each weight's group scale
    # Half a step, plus the bf16 rounding of the zero point (relative 2^-8 of |zero|).
    slack = zeros.float().abs().repeat_interleave(g, dim=1) * 2 ** -8
    assert ((w - dq).abs() <= step / 2 + slack + 1e-6).all()
    q = unpack_int4(packed).view(48, 4, g)
    assert q.amax(-1).ge(14).all() and q.amin(-1).le(1).all()  # min-max uses (nearly) all 16 levels


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 4)
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))  # even column in the low nibble
    assert torch.equal(unpack_int4(packed), q)


# -- the layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs", [(Int8Linear, {}), (Int4Linear, {"group_size": 32})])
@pytest.mark.parametrize("out_features", [96, 40])  # 40: not a multiple of 16, no int4 kernel
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_equals_matmul_with_dequantized_weight(cls, kwargs, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, out_features, bias=bias)
    layer = cls.from_weight(linear.weight, linear.bias, **kwargs)
    w = layer.dequantize(torch.float32)
    b = linear.bias.detach() if bias else None
    limit = KERNEL_MAX_ROWS[layer.mode]
    for rows in (1, limit, limit + 1):
        x = torch.randn(rows, 64)
        # fp32 activations: dequantize + matmul, so agreement is tight.
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-6)
        # bf16 activations: the CPU kernel (few rows) or a bf16 matmul (many): bf16 tolerance.
        xb = x.bfloat16()
        ref = F.linear(xb.float(), w, b)
        assert layer(xb).dtype == torch.bfloat16
        assert rel_error(layer(xb), ref) < 1e-2
    x3 = torch.randn(2, 3, 64)  # (B, T, C) inputs keep their leading dims
    assert layer(x3).shape == (2, 3, out_features)


def test_kernel_path_is_taken_for_bf16_decode(monkeypatch):
    """The CPU kernels serve bf16 decode-sized inputs (so the speed measured is the one used)."""
    layer8 = Int8Linear.from_weight(torch.randn(32, 64))
    layer4 = Int4Linear.from_weight(torch.randn(32, 64), group_size=32)
    calls = []
    for layer in (layer8, layer4):
        monkeypatch.setattr(layer, "dequantize", lambda *a, **k: calls.append(1) or pytest.fail("dequantized"))
        layer(torch.randn(1, 64).bfloat16())
    assert not calls


def test_gradient_flows_through_a_quantized_layer_to_its_input():
    layer = Int4Linear.from_weight(torch.randn(32, 64), group_size=32).bfloat16()
    x = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # the kernels have no backward: this must take the dequantize path
    expected = layer.dequantize(torch.float32).sum(0)
    assert rel_error(x.grad, expected) < 1e-2
    assert not list(layer.parameters())  # nothing of the base can train


# -- whole models -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size,bound", [("int8", 128, 0.02), ("int4", 32, 0.1), ("int4", 64, 0.1)])
def test_quantized_model_logits_stay_close(model, idx, mode, group_size, bound):
    expected = model(idx).logits
    q = quantize_model(copy.deepcopy(model), mode, group_size)
    assert not any(isinstance(m, nn.Linear) and m is not q.lm_head for m in q.modules())
    assert isinstance(q.lm_head, nn.Linear) and q.lm_head.weight is q.tok_emb.weight  # tied, full precision
    assert rel_error(q(idx).logits, expected) < bound
    # bf16 activations through the kernels agree with the fp32 activations of the same weights.
    qb = copy.deepcopy(q).to(torch.bfloat16)
    assert rel_error(qb(idx).logits, q(idx).logits) < 0.03


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tied_embedding_shares_one_quantized_table(model, idx, mode):
    q = quantize_model(copy.deepcopy(model), mode, 32, include_embedding=True)
    assert isinstance(q.tok_emb, QuantizedEmbedding) and q.tok_emb.quantized_table is q.lm_head
    assert not any(k.startswith("tok_emb") for k in q.state_dict())  # stored once, as lm_head
    rows = q.tok_emb(idx)  # (B, T, C)
    torch.testing.assert_close(rows, q.lm_head.dequantize()[idx])
    assert rel_error(q(idx).logits, model(idx).logits) < (0.03 if mode == "int8" else 0.15)
    cache = KVCache.for_model(q, 1)  # the model's dtype and device, read without dequantizing the table
    assert (cache.dtype, cache.device) == (q.dtype, q.device)


def test_untied_embedding_gets_its_own_table(idx):
    torch.manual_seed(0)
    untied = Transformer(tiny_config(tie_embeddings=False)).eval()
    q = quantize_model(copy.deepcopy(untied), "int8", include_embedding=True)
    assert isinstance(q.tok_emb, QuantizedEmbedding) and not q.tok_emb.tied
    assert isinstance(q.lm_head, Int8Linear)
    assert rel_error(q(idx).logits, untied(idx).logits) < 0.03
    plain = quantize_model(copy.deepcopy(untied), "int8")
    assert isinstance(plain.lm_head, Int8Linear) and isinstance(plain.tok_emb, nn.Embedding)


@pytest.mark.parametrize("mode,group_size,include_embedding",
                         [("int8", 128, False), ("int8", 128, True), ("int4", 32, False), ("int4", 64, True)])
def test_save_and_load_round_trip(model, idx, tmp_path, mode, group_size, include_embedding):
    q = quantize_model(copy.deepcopy(model), mode, group_size, include_embedding)
    save_quantized(tmp_path, q)
    meta = read_quantization_meta(tmp_path)
    assert (meta["mode"], meta["include_embedding"]) == (mode, include_embedding)
    assert meta["group_size"] == (group_size if mode == "int4" else None)
    assert read_quantization_meta(tmp_path / "model.safetensors")["mode"] == mode  # header alone says so
    loaded = load_quantized(tmp_path).eval()
    assert quantization_meta(loaded) == quantization_meta(q)
    assert torch.equal(loaded(idx).logits, q(idx).logits)
    state = weights_state_dict(q)
    if mode == "int4":
        assert state["blocks.0.attn.qkv.weight"].dtype == torch.uint8
        assert state["blocks.0.attn.qkv.scales"].dtype == torch.bfloat16
    rebuilt = quantized_state_dict_to_model(model.config, state, quantization_meta(q)).eval()
    assert torch.equal(rebuilt(idx).logits, q(idx).logits)


def test_loaded_int4_model_rebuilds_the_kernel_packing(model, tmp_path):
    """A kernel packing cached before load_state_dict must not survive it."""
    q = quantize_model(copy.deepcopy(model), "int4", 32).to(torch.bfloat16)
    other = build_quantized_model(model.config, quantization_meta(q)).to(torch.bfloat16).eval()
    x = torch.randint(0, 64, (1, 1))
    other(x)  # caches the kernel packing of the empty weights
    other.load_state_dict(q.state_dict())
    assert torch.equal(other(x).logits, q(x).logits)


def test_on_disk_size_of_the_small_preset(tmp_path):
    torch.manual_seed(0)
    small = Transformer(ModelConfig(vocab_size=65, d_model=256, n_heads=8, n_layers=6, block_size=64))
    fp32 = len(save_safetensors_bytes(weights_state_dict(small)))  # the tied head stored once

    def ratio(mode: str, group_size: int, include_embedding: bool = False) -> float:
        q = quantize_model(copy.deepcopy(small), mode, group_size, include_embedding)
        return fp32 / len(save_safetensors_bytes(weights_state_dict(q)))

    assert ratio("int8", 128) >= 3.5
    assert ratio("int4", 32) >= 6 and ratio("int4", 64) >= 6
    # The 65 x 256 embedding is 0.3% of the weights: quantizing it helps only a little here.
    assert ratio("int8", 128) < ratio("int8", 128, True) < 1.05 * ratio("int8", 128)
    # save_quantized writes those same bytes (plus a small header).
    q = quantize_model(copy.deepcopy(small), "int4", 64)
    save_quantized(tmp_path, q)
    on_disk = os.path.getsize(tmp_path / "model.safetensors")
    assert 0 <= on_disk - len(save_safetensors_bytes(weights_state_dict(q))) < 1024
    assert fp32 / on_disk >= 6


# -- refusals -----------------------------------------------------------------------------------

def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_group_size_that_does_not_divide_a_width(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="does not divide the input width 64 of blocks.0.attn.qkv") as info:
        quantize_model(model, "int4", 128)
    assert "use group size 64" in one_line(info)  # suggests the largest that fits
    assert quantization_meta(model) is None  # nothing was swapped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert valid_group_sizes(model) == [32, 64]
    with pytest.raises(UserError, match="not supported"):
        quantize_model(model, "int4", 48)


def test_quantizing_twice_is_refused(model, tmp_path):
    q = quantize_model(model, "int8")
    with pytest.raises(UserError, match="already quantized") as info:
        quantize_model(q, "int4", 32)
    one_line(info)
    save_quantized(tmp_path, q)
    with pytest.raises(UserError, match="already quantized"):
        refuse_if_quantized(tmp_path)
    (tmp_path / QUANTIZATION_FILE).unlink()  # the safetensors header alone is enough
    with pytest.raises(UserError, match="already quantized"):
        refuse_if_quantized(tmp_path)


def test_full_precision_checkpoint_has_no_meta(model, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(save_safetensors_bytes(weights_state_dict(model)))
    assert read_quantization_meta(tmp_path) is None
    refuse_if_quantized(tmp_path)
    with pytest.raises(UserError, match="not quantized"):
        save_quantized(tmp_path / "out", model)


@pytest.mark.parametrize("mode", ["int2", "fp8", None, "INT8"])
def test_unknown_mode(model, mode):
    with pytest.raises(UserError, match="unknown quantization mode") as info:
        quantize_model(model, mode)
    one_line(info)


# -- perplexity on a trained model --------------------------------------------------------------

def markov_corpus(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A second-order Markov chain: each pair of tokens has 3 successors, p = 0.6 / 0.3 / 0.1."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, vocab, 3), generator=g).tolist()
    choices = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=g).tolist()
    tokens = [0, 1]
    for c in choices:
        tokens.append(successors[tokens[-2]][tokens[-1]][c])
    return torch.tensor(tokens)


@pytest.fixture(scope="module")
def trained() -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    vocab, block = 24, 32
    data = markov_corpus(24_000, vocab, seed=0)
    train, val = data[:20_000], data[20_000:]
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=vocab, block_size=block))
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    with threads(1):  # a module-scoped fixture runs outside the autouse one
        for _ in range(250):
            starts = torch.randint(0, len(train) - block - 1, (16,), generator=g)
            x = torch.stack([train[s:s + block] for s in starts])
            y = torch.stack([train[s + 1:s + block + 1] for s in starts])
            loss = model(x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    n = (len(val) - 1) // block * block
    vx, vy = val[:n].view(-1, block), val[1:n + 1].view(-1, block)
    return model.eval(), vx, vy


@torch.no_grad()
def perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return math.exp(model(x, y).loss.item())


@pytest.mark.slow  # its fixture trains 250 steps
@pytest.mark.parametrize("mode,group_size,include_embedding,bound",
                         [("int8", 128, False, 0.01), ("int8", 128, True, 0.01),
                          ("int4", 32, False, 0.05), ("int4", 64, True, 0.05)])
def test_quantization_barely_moves_perplexity(trained, mode, group_size, include_embedding, bound):
    model, vx, vy = trained
    base = perplexity(model, vx, vy)
    assert base < 8  # trained: uniform guessing over 24 tokens would be 24
    q = quantize_model(copy.deepcopy(model), mode, group_size, include_embedding)
    change = perplexity(q, vx, vy) / base - 1
    assert abs(change) <= bound, f"{mode} g{group_size}: perplexity {base:.3f} changed by {change:+.2%}"
