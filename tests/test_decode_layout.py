"""The decode layout: the same model, its Linear weights stored column-major."""

from __future__ import annotations

import copy

import torch

from mini_transformer.config import ModelConfig
from mini_transformer.decode_layout import is_column_major, to_decode_layout
from mini_transformer.generation import generate
from mini_transformer.model import Transformer
from mini_transformer.quantize import QuantizedLinear, quantize_model
from mini_transformer.weights import weights_state_dict


def tiny(**overrides) -> Transformer:
    base = dict(vocab_size=61, d_model=32, n_heads=4, n_layers=2, block_size=32, dropout=0.0, init_std=0.3)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


def test_the_converted_model_computes_and_saves_what_the_original_does():
    model = tiny()
    converted = to_decode_layout(copy.deepcopy(model))
    linears = [m for m in converted.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_column_major(m.weight) for m in linears)
    assert converted.lm_head.weight is converted.tok_emb.weight  # still tied, one tensor
    idx = torch.randint(0, 61, (3, 20))
    torch.testing.assert_close(converted(idx).logits, model(idx).logits, rtol=0, atol=1e-5)
    prompt = [3, 14, 15, 9, 26]
    assert generate(converted, prompt, max_new_tokens=40, temperature=0) == \
        generate(model, prompt, max_new_tokens=40, temperature=0)
    saved, original = weights_state_dict(converted), weights_state_dict(model)
    assert saved.keys() == original.keys()
    assert all(t.is_contiguous() and torch.equal(t, original[k]) for k, t in saved.items())
    assert to_decode_layout(converted) is converted  # idempotent


def test_it_still_trains_with_the_same_gradients():
    model = tiny(tie_embeddings=False)
    converted = to_decode_layout(copy.deepcopy(model))
    idx = torch.randint(0, 61, (2, 16))
    for m in (model, converted):
        m.train()
        m(idx, idx).loss.backward()
    for (name, a), b in zip(model.named_parameters(), converted.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_other_dtypes_and_quantized_layers_are_left_alone():
    bf16 = to_decode_layout(tiny().to(torch.bfloat16))
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, torch.nn.Linear))
    quantized = quantize_model(tiny(), "int8", 32)  # the tied head stays a float Linear
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    to_decode_layout(quantized)
    for module in quantized.modules():
        if isinstance(module, QuantizedLinear):
            assert all(t.is_contiguous() for t in module.state_dict().values())
    assert is_column_major(quantized.lm_head.weight)
    assert all(torch.equal(v, before[k]) for k, v in quantized.state_dict().items())
