"""The speedrun options of the model (qk_norm, activation relu2, logit_softcap, zero_init_projections):
their math against explicit formulas, and that each flows through the KV-cache, causality, the
analytic parameter and FLOP counts, fingerprints, LoRA, export (refused where the target can't
hold it) and a training run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mini_transformer.checkpoint import load_for_inference, save_inference_checkpoint
from mini_transformer.config import Config, ModelConfig, default_ffn_hidden_size, load_config
from mini_transformer.errors import UserError
from mini_transformer.interop.gguf.layout import check_gguf_exportable
from mini_transformer.interop.hf.layout import check_exportable
from mini_transformer.lora import apply_lora, lora_layers
from mini_transformer.memory_check import estimate_memory
from mini_transformer.model import KVCache, Transformer, apply_rope
from mini_transformer.profile import profile_rows
from mini_transformer.tokenizer import CharTokenizer
from mini_transformer.training.flops import count_parameters, flops_per_token
from mini_transformer.weights import architecture, model_fingerprint

from .test_profile import assert_analytic_flops_match_flop_counter

OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "qk_norm-gqa": dict(qk_norm=True, n_kv_heads=2),
    "relu2": dict(activation="relu2"),
    "softcap": dict(logit_softcap=2.0),
    "zero_init": dict(zero_init_projections=True),
    "all": dict(qk_norm=True, activation="relu2", logit_softcap=2.0, zero_init_projections=True,
                norm="rmsnorm", bias=True, tie_embeddings=False),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=64, n_heads=4, n_layers=2, block_size=32, dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def perturbed(model: Transformer, seed: int = 0) -> Transformer:
    """Every weight random (norms away from 1, zero-initialised projections no longer zero), so
    that a norm, a projection or a cache slot used wrongly shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.dim() == 1:
                param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- each option through the cache, causality and the counts -----------------------------------------

@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_kv_cache_decoding_equals_the_full_forward(options, attention):
    model = perturbed(Transformer(tiny_config(attention=attention, **options))).double().eval()
    idx = torch.randint(0, 61, (2, 20))
    full = model(idx).logits
    cache = KVCache.for_model(model, batch_size=2)
    pieces = [model(idx[:, :7], kv_cache=cache, input_pos=torch.arange(7)).logits]
    for t in range(7, idx.shape[1]):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache, input_pos=torch.tensor([t])).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_later_token_does_not_change_earlier_logits(options):
    model = perturbed(Transformer(tiny_config(**options))).double().eval()
    idx = torch.randint(0, 61, (2, 20))
    logits = model(idx).logits
    for t in (0, 9):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 61
        other = model(changed).logits
        torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_parameter_count_is_exact(options):
    config = tiny_config(**options)
    model = Transformer(config)
    assert model.num_parameters() == count_parameters(config).total
    assert model.num_parameters(non_embedding=True) == count_parameters(config).non_embedding
    # The weights of every matmul, the LM head included (tied or not, its product is computed).
    assert count_parameters(config).matmul == sum(m.weight.numel() for m in model.modules()
                                                  if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_analytic_flops_within_10_percent_of_flop_counter(options):
    # The math path makes every matmul visible to FlopCounterMode.
    assert_analytic_flops_match_flop_counter(tiny_config(block_size=64, attention="math", **options))


def _kept_bytes(config: ModelConfig) -> int:
    """The bytes of the tensors autograd keeps for the backward pass of a batch of 4 (weights not counted)."""
    model = Transformer(config)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.zeros(4, config.block_size, dtype=torch.long), torch.zeros(4, config.block_size, dtype=torch.long))
    return sum(kept.values())


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_memory_estimate_grows_by_what_each_option_keeps_for_backward(options):
    config = tiny_config(attention="sdpa", **options)
    without = dataclasses.replace(config, activation="swiglu", qk_norm=False, logit_softcap=None,
                                  ffn_hidden_size=config.hidden_size, zero_init_projections=False)
    kept = _kept_bytes(config) - _kept_bytes(without)
    estimated = estimate_memory(config, 4).activations - estimate_memory(without, 4).activations
    assert abs(estimated - kept) <= 0.01 * _kept_bytes(without)


def test_relu2_flops_differ_from_swiglu_by_its_matrices():
    swiglu, relu2 = tiny_config(ffn_hidden_size=128), tiny_config(ffn_hidden_size=128, activation="relu2")
    # One d x h matrix less per layer: 2 FLOPs per weight per token, forward.
    difference = flops_per_token(swiglu)[0] - flops_per_token(relu2)[0]
    assert difference == 2 * swiglu.n_layers * swiglu.d_model * 128


def test_profile_names_the_options():
    config = Config(model=tiny_config(qk_norm=True, activation="relu2", logit_softcap=15.0))
    row = dict(profile_rows(config))["architecture"]
    assert "relu2 MLP 256" in row and "qk-norm" in row and "logit softcap 15" in row
    assert "SwiGLU 192" in dict(profile_rows(Config(model=tiny_config())))["architecture"]


# -- the math of each option ------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_qk_norm_is_rms_norm_of_each_head_before_rope():
    config = tiny_config(qk_norm=True, n_kv_heads=2, norm="rmsnorm", norm_eps=1e-3)
    model = perturbed(Transformer(config)).double().eval()
    idx = torch.randint(0, 61, (2, 12))
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (config.head_dim,)
    H, K, D, T = config.n_heads, config.kv_heads, config.head_dim, idx.shape[1]
    x = model.blocks[0].attn_norm(model.tok_emb(idx))
    q, k, _ = (x @ attn.qkv.weight.T).split([H * D, K * D, K * D], dim=-1)
    q = _rms_norm(q.view(2, T, H, D), attn.q_norm.weight, config.norm_eps)
    k = _rms_norm(k.view(2, T, K, D), attn.k_norm.weight, config.norm_eps)
    cos, sin = model.rope_cos[:T, None], model.rope_sin[:T, None]
    q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
    k = k.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    expected = torch.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), dim=-1)
    torch.testing.assert_close(model.attention_maps(idx)[0], expected, rtol=0, atol=1e-12)


def test_qk_norm_keys_go_into_the_cache_normalised_and_rotated():
    config = tiny_config(qk_norm=True)
    model = perturbed(Transformer(config)).double().eval()
    idx = torch.randint(0, 61, (1, 5))
    cache = KVCache.for_model(model, batch_size=1)
    model(idx, kv_cache=cache, input_pos=torch.arange(5))
    attn, H, D = model.blocks[0].attn, config.n_heads, config.head_dim
    x = model.blocks[0].attn_norm(model.tok_emb(idx))
    k = (x @ attn.qkv.weight.T)[..., H * D: 2 * H * D].view(1, 5, H, D)  # MHA: as many k heads as q heads
    k = apply_rope(_rms_norm(k, attn.k_norm.weight, config.norm_eps), model.rope_cos[:5, None], model.rope_sin[:5, None])
    torch.testing.assert_close(cache.layers[0].k[:, :, :5], k.transpose(1, 2), rtol=0, atol=1e-12)


def test_relu2_mlp_is_down_of_squared_relu_of_up():
    assert default_ffn_hidden_size(256, "relu2") == 1024 and default_ffn_hidden_size(256) == 704
    assert tiny_config(activation="relu2").hidden_size == 4 * 64
    assert tiny_config(activation="relu2", ffn_hidden_size=96).hidden_size == 96
    ffn = perturbed(Transformer(tiny_config(activation="relu2", bias=True))).double().blocks[0].ffn
    assert {name for name, _ in ffn.named_parameters()} == {"up.weight", "up.bias", "down.weight", "down.bias"}
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    hidden = (x @ ffn.up.weight.T + ffn.up.bias).clamp(min=0) ** 2
    torch.testing.assert_close(ffn(x), hidden @ ffn.down.weight.T + ffn.down.bias, rtol=0, atol=1e-12)


def test_softcap_bounds_the_logits_and_is_the_tanh_formula():
    cap = 2.0
    model = perturbed(Transformer(tiny_config(logit_softcap=cap))).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # raw logits far past the cap
    idx = torch.randint(0, 61, (2, 10))
    out = model(idx, idx)
    raw = model.lm_head(out.hidden_states)
    assert raw.abs().max() > 5 * cap and out.logits.abs().max() <= cap
    torch.testing.assert_close(out.logits, cap * torch.tanh(raw / cap), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.float().reshape(-1, 61), idx.reshape(-1)))
    # logits_to_keep (generation's prefill) is capped too.
    torch.testing.assert_close(model(idx, logits_to_keep=1).logits, out.logits[:, -1:], rtol=0, atol=1e-12)


def test_zero_init_makes_every_block_start_as_the_identity():
    model = Transformer(tiny_config(zero_init_projections=True)).eval()
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.ffn.down.weight.any()
        assert block.ffn.gate_up.weight.std() > 0  # the other matrices keep their init
    idx = torch.randint(0, 61, (2, 10))
    # Blocks add nothing: each position's logits are the embedding of its own token, normed, read out.
    expected = model.lm_head(model.norm(model.tok_emb(idx)))
    torch.testing.assert_close(model(idx).logits, expected, rtol=0, atol=1e-6)
    default = Transformer(tiny_config()).eval()
    assert default.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.2)


def test_bf16_autocast_runs_every_option_in_half_precision():
    import warnings

    model = perturbed(Transformer(tiny_config(**OPTIONS["all"])))
    idx = torch.randint(0, 61, (2, 16))
    reference = model(idx, idx).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an fp32 norm weight on bf16 q/k: the unfused path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, idx)
        out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_bad_softcap_is_one_line():
    with pytest.raises(UserError, match=r"^model.logit_softcap must be positive, got 0.0; 30 is usual"):
        load_config(overrides=["--model.logit_softcap", "0"])
    assert load_config(overrides=["--model.activation", "relu2"]).model.activation == "relu2"
    with pytest.raises(UserError, match="model.activation must be one of 'swiglu', 'relu2'"):
        load_config(overrides=["--model.activation", "gelu"])


# -- fingerprints, LoRA, checkpoints, export -------------------------------------------------------------

def test_fingerprint_of_a_model_without_the_options_is_unchanged():
    plain = architecture(tiny_config())
    assert not {"activation", "qk_norm", "logit_softcap", "zero_init_projections"} & set(plain)
    for options in (dict(qk_norm=True), dict(activation="relu2"), dict(logit_softcap=30.0)):
        assert model_fingerprint(tiny_config(**options)) != model_fingerprint(tiny_config())
    # An initialisation is not part of the architecture: the same weights load either way.
    assert model_fingerprint(tiny_config(zero_init_projections=True)) == model_fingerprint(tiny_config())


def test_lora_ffn_target_reaches_the_relu2_up_projection():
    model = apply_lora(Transformer(tiny_config(activation="relu2")), rank=2, targets=["ffn"])
    assert set(lora_layers(model)) == {f"blocks.{i}.ffn.{name}" for i in range(2) for name in ("up", "down")}
    swiglu = apply_lora(Transformer(tiny_config()), rank=2, targets=["ffn"])
    assert set(lora_layers(swiglu)) == {f"blocks.{i}.ffn.{name}" for i in range(2) for name in ("gate_up", "down")}


def test_checkpoint_keeps_the_options_and_an_older_one_loads_with_defaults(tmp_path):
    tokenizer = CharTokenizer.from_text("abcdefgh ")
    options = dict(qk_norm=True, activation="relu2", logit_softcap=3.0)
    config = Config(model=tiny_config(vocab_size=tokenizer.vocab_size, **options))
    model = perturbed(Transformer(config.model)).eval()
    save_inference_checkpoint(tmp_path / "new", model, config, tokenizer)
    loaded, loaded_config, _ = load_for_inference(tmp_path / "new")
    assert {k: getattr(loaded_config.model, k) for k in options} == options
    idx = torch.randint(0, tokenizer.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=1e-6)

    old = Config(model=tiny_config(vocab_size=tokenizer.vocab_size))
    save_inference_checkpoint(tmp_path / "old", Transformer(old.model), old, tokenizer)
    config_file = tmp_path / "old" / "config.yaml"
    text = "\n".join(line for line in config_file.read_text().splitlines()
                     if not line.strip().startswith(tuple(f"{k}:" for k in ("activation", "qk_norm", "logit_softcap",
                                                                             "zero_init_projections"))))
    config_file.write_text(text)
    _, old_config, _ = load_for_inference(tmp_path / "old")
    assert (old_config.model.activation, old_config.model.qk_norm, old_config.model.logit_softcap) == \
        ("swiglu", False, None)


@pytest.mark.parametrize("options, named", [
    (dict(qk_norm=True), "model.qk_norm true"),
    (dict(activation="relu2"), "model.activation relu2"),
    (dict(logit_softcap=30.0), "model.logit_softcap 30"),
    (dict(norm="layernorm", qk_norm=True), "model.qk_norm true"),
])
def test_export_refuses_what_llama_and_stablelm_cannot_hold(options, named):
    config = tiny_config(norm="rmsnorm", **{k: v for k, v in options.items() if k != "norm"})
    config.norm = options.get("norm", config.norm)
    for check, target in ((check_exportable, "Hugging Face"), (check_gguf_exportable, "llama.cpp")):
        with pytest.raises(UserError) as info:
            check(config)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{named} has no {target}")
        assert "export a model trained without it" in message
    check_exportable(tiny_config(norm="rmsnorm", zero_init_projections=True))  # only an init: exportable
    check_gguf_exportable(tiny_config(norm="rmsnorm", zero_init_projections=True))


# -- a training run with every option ----------------------------------------------------------------------

def test_training_with_every_option_learns_generates_and_refuses_export(run_cli, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "out"
    status, _, err = run_cli(
        "train", "--quiet", "--data.path", str(text), "--data.cache_dir", str(tmp_path / "cache"),
        "--training.out_dir", str(out), "--training.device", "cpu", "--training.dtype", "fp32",
        "--model.d_model", "32", "--model.n_heads", "4", "--model.n_layers", "2", "--model.block_size", "16",
        "--model.dropout", "0", "--model.qk_norm", "true", "--model.activation", "relu2",
        "--model.logit_softcap", "15", "--model.zero_init_projections", "true",
        "--training.batch_size", "8", "--training.max_iters", "40", "--training.warmup_iters", "4",
        "--training.learning_rate", "1e-2", "--training.eval_interval", "40", "--training.eval_iters", "2",
        "--training.log_interval", "1", "--training.tensorboard", "false")
    assert status == 0, err
    losses = [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    status, generated, err = run_cli("generate", "--checkpoint", str(out), "--device", "cpu", "--prompt", "To be",
                                     "--max_tokens", "20", "--temperature", "0")
    assert status == 0 and generated.startswith("To be"), err
    formats = [("hf", tmp_path / "hf")] + ([("gguf", tmp_path / "m.gguf")] if _has("gguf") else [])
    for fmt, target in formats:
        status, _, err = run_cli("export", "--checkpoint", str(out), "--format", fmt, "--out", str(target))
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and "model.qk_norm true has no" in lines[0], err
        assert not target.exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
