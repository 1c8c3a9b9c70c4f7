"""The model against independent references: explicit attention math, float64, RoPE algebra."""

import math

import pytest
import torch
import torch.nn.functional as F

from mini_transformer.config import ModelConfig, default_ffn_hidden_size, load_config, preset_names
from mini_transformer.model import KVCache, Transformer, apply_rope, rope_cache
from mini_transformer.profile import count_parameters


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=64, n_heads=4, n_layers=2, block_size=32, dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_causality(n_kv_heads, norm):
    model = Transformer(tiny_config(n_kv_heads=n_kv_heads, norm=norm)).eval()
    idx = torch.randint(0, 61, (2, 24))
    logits = model(idx).logits
    for t in (0, 7, 22):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 61
        other = model(changed).logits
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads, attention):
    model = Transformer(tiny_config(n_kv_heads=n_kv_heads, attention=attention)).eval()
    idx = torch.randint(0, 61, (3, 30))
    full = model(idx).logits
    cache = KVCache.for_model(model, batch_size=3)
    prompt = 11
    pieces = [model(idx[:, :prompt], kv_cache=cache, input_pos=torch.arange(prompt)).logits]
    for t in range(prompt, idx.shape[1]):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache, input_pos=torch.tensor([t])).logits)
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_rows_at_different_lengths_decode_together_as_each_alone(attention):
    # Continuous batching: each row of one cache has its own slots ((B, T) input_pos), rows are
    # at different lengths, and a batched decode step gives each row what it gets alone.
    model = Transformer(tiny_config(n_kv_heads=2, attention=attention)).eval()
    lengths = [5, 12, 1]
    seqs = [torch.randint(0, 61, (n + 6,)) for n in lengths]
    cache = KVCache.for_model(model, batch_size=3)
    # The prompts in one call, each row padded on the right with junk tokens: slots past a
    # row's own length hold stale keys, which its later queries must never see.
    width = max(lengths)
    prompts = torch.randint(0, 61, (3, width))
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        prompts[row, :n] = seq[:n]
    model(prompts, kv_cache=cache, input_pos=torch.arange(width).expand(3, width))
    for step in range(6):
        pos = torch.tensor([[n + step] for n in lengths])  # (B, 1): each row's next slot
        tokens = torch.stack([seq[n + step] for seq, n in zip(seqs, lengths)])[:, None]
        logits = model(tokens, kv_cache=cache, input_pos=pos).logits[:, 0]
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            alone = model(seq[None, : n + step + 1]).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, rtol=0, atol=1e-5)


def test_math_and_sdpa_paths_agree_and_match_float64_reference():
    config = tiny_config(n_kv_heads=2)
    sdpa = Transformer(config).eval()
    math_model = Transformer(tiny_config(n_kv_heads=2, attention="math")).eval()
    math_model.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(math_model(idx).logits, sdpa(idx).logits, rtol=0, atol=1e-5)

    # One attention layer against attention written out by hand in float64.
    attn = sdpa.blocks[0].attn.double()
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    cos, sin = rope_cache(32, 16, 10000.0, dtype=torch.float64)
    out, _ = attn(x, cos[:20, None], sin[:20, None])
    q, k, v = attn.qkv(x).split([64, 32, 32], dim=-1)
    q = q.view(2, 20, 4, 16).transpose(1, 2)
    k = k.view(2, 20, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(2, 20, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    q, k = apply_rope(q, cos[:20], sin[:20]), apply_rope(k, cos[:20], sin[:20])
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 20, 64)
    torch.testing.assert_close(out, attn.proj(ref), rtol=0, atol=1e-10)


def test_math_path_in_float64_matches_sdpa_in_float64():
    sdpa = Transformer(tiny_config(n_kv_heads=2)).double().eval()
    math_model = Transformer(tiny_config(n_kv_heads=2, attention="math")).double().eval()
    math_model.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(math_model(idx).logits, sdpa(idx).logits, rtol=0, atol=1e-12)


def test_auto_trains_short_bf16_sequences_on_cpu_with_the_explicit_path(monkeypatch):
    """``auto`` switches to the explicit path for bf16 training on CPU; loss and gradients must
    match sdpa's to bf16 precision, and sdpa must not be called."""
    auto = Transformer(tiny_config())
    sdpa = Transformer(tiny_config(attention="sdpa"))
    sdpa.load_state_dict(auto.state_dict())
    idx, targets = torch.randint(0, 61, (4, 32)), torch.randint(0, 61, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = sdpa(idx, targets).loss
    ref_loss.backward()

    def no_sdpa(*args, **kwargs):
        raise AssertionError("auto used sdpa for a short bf16 training sequence on CPU")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = auto(idx, targets).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-2)
    for (name, p), p_ref in zip(auto.named_parameters(), sdpa.parameters()):
        scale = p_ref.grad.abs().max().item()
        assert (p.grad - p_ref.grad).abs().max().item() <= 0.05 * scale + 1e-6, name


@pytest.mark.slow  # compiles
def test_auto_under_compile_uses_the_explicit_path_up_to_256_bf16_tokens_on_cpu():
    """Under torch.compile the explicit path's threshold is 256 tokens, 128 in eager mode. The
    traced graph (Dynamo only, no Inductor) shows which attention was taken."""
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    model = Transformer(tiny_config(block_size=192, n_layers=1))
    idx, targets = torch.randint(0, 61, (1, 192)), torch.randint(0, 61, (1, 192))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.compile(model, backend=record)(idx, targets).loss
    assert torch.isfinite(loss)
    assert not any("scaled_dot_product_attention" in target for target in seen)
    assert any("softmax" in target for target in seen)
    # Eager at 192 tokens keeps SDPA.
    assert not model.blocks[0].attn._explicit_is_faster(torch.zeros(1, 4, 192, 16, dtype=torch.bfloat16))
    torch._dynamo.reset()


def test_attention_maps_are_causal_distributions():
    model = Transformer(tiny_config()).eval()
    maps = model.attention_maps(torch.randint(0, 61, (1, 12)))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 12, 12)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 4, 12))
    assert torch.all(maps[1][..., torch.ones(12, 12, dtype=torch.bool).triu(1)] == 0)


def test_rope_dot_product_depends_only_on_relative_position():
    cos, sin = rope_cache(64, 16, 10000.0, dtype=torch.float64)
    q = torch.randn(16, dtype=torch.float64)
    k = torch.randn(16, dtype=torch.float64)

    def dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    for offset in (0, 3, 17):
        values = [dot(m + offset, m) for m in (0, 5, 20, 40)]
        assert max(values) - min(values) < 1e-9
    assert abs(dot(10, 3) - dot(10, 4)) > 1e-6  # and it does depend on the distance
    # Rotation keeps the norm.
    rotated = apply_rope(q.view(1, 1, 1, 16), cos[9:10], sin[9:10])
    assert abs(rotated.norm().item() - q.norm().item()) < 1e-12


def test_weight_tying_shares_storage_and_can_be_untied():
    tied = Transformer(tiny_config())
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 61 * 64


def test_gqa_and_mqa_shrink_kv_parameters_by_expected_factor():
    def kv_params(n_kv):
        attn = Transformer(tiny_config(n_heads=8, n_kv_heads=n_kv)).blocks[0].attn
        return attn.qkv.weight.numel() - 64 * 64  # minus the query part

    mha = kv_params(None)
    assert mha == 2 * 64 * 64
    assert kv_params(4) * 2 == mha
    assert kv_params(2) * 4 == mha
    assert kv_params(1) * 8 == mha


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "large", "gpt2"])
def test_every_preset_builds_with_analytic_parameter_count(preset):
    config = load_config(preset=preset).model
    if config.vocab_size is None:
        config.vocab_size = 65
    with torch.device("meta"):
        model = Transformer(config)
    assert model.num_parameters() == count_parameters(config).total
    assert model.num_parameters(non_embedding=True) == count_parameters(config).non_embedding


@pytest.mark.parametrize("overrides", [dict(bias=True), dict(tie_embeddings=False, norm="rmsnorm"),
                                       dict(n_kv_heads=1, ffn_hidden_size=100)])
def test_analytic_count_for_variants(overrides):
    config = tiny_config(**overrides)
    assert Transformer(config).num_parameters() == count_parameters(config).total


def test_swiglu_hidden_size_default_and_formula():
    assert default_ffn_hidden_size(256) == 704  # 8/3 * 256 = 682.7, up to a multiple of 64
    assert default_ffn_hidden_size(768) == 2048
    model = Transformer(tiny_config(ffn_hidden_size=96)).eval()
    ffn = model.blocks[0].ffn
    x = torch.randn(2, 5, 64)
    w_gate, w_up = ffn.gate_up.weight.split(96, dim=0)
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    model = Transformer(tiny_config(d_model=256, n_layers=8, n_heads=4))
    expected = 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.blocks[0].ffn.down.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


def test_hidden_states_and_classification_head_example():
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 61, (2, 9))
    logits, loss, hidden = model(idx)
    assert loss is None and hidden.shape == (2, 9, 64) and logits.shape == (2, 9, 61)
    torch.testing.assert_close(model.lm_head(hidden), logits)

    class ClassificationModel(torch.nn.Module):
        def __init__(self, transformer, num_classes):
            super().__init__()
            self.transformer = transformer
            self.classifier = torch.nn.Linear(transformer.config.d_model, num_classes)

        def forward(self, idx):
            _, _, hidden = self.transformer(idx)
            return self.classifier(hidden[:, -1, :])

    clf = ClassificationModel(model, 3)
    assert clf(idx).shape == (2, 3)


def test_loss_matches_cross_entropy_and_ignores_minus_one():
    model = Transformer(tiny_config()).eval()
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    targets[0, :3] = -1
    out = model(idx, targets)
    mask = targets != -1
    ref = F.cross_entropy(out.logits[mask], targets[mask])
    torch.testing.assert_close(out.loss, ref)


def test_left_padded_rows_with_position_ids_match_unpadded():
    model = Transformer(tiny_config()).eval()
    short = torch.randint(0, 61, (1, 6))
    alone = model(short).logits[:, -1]
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    positions = (torch.arange(10) - pad).clamp(min=0)[None]
    key_mask = torch.arange(10)[None] >= pad
    batched = model(padded, position_ids=positions, attn_mask=key_mask).logits[:, -1]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_dropout_is_applied_in_training_and_settable():
    model = Transformer(tiny_config(dropout=0.5))
    idx = torch.randint(0, 61, (1, 8))
    model.train()
    assert not torch.allclose(model(idx).logits, model(idx).logits)
    model.set_dropout(0.0)
    assert all(m.p == 0.0 for m in model.dropout_modules())
    torch.testing.assert_close(model(idx).logits, model(idx).logits)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    idx = torch.randint(0, 61, (2, 16))
    model(idx, idx).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(idx, idx).loss.backward()
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_presets_listed():
    assert {"tiny", "small", "medium", "large", "gpt2"} <= set(preset_names())
