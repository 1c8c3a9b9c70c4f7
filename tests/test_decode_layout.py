"""How decoding multiplies on the CPU: the same model with its Linear weights stored column-major
(eager) or row-major (compiled), and the compiled step's one-row products against ``F.linear``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mini_transformer.config import ModelConfig
from mini_transformer.decode_layout import OneRowProducts, is_column_major, to_decode_layout
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


def test_the_compiled_layout_stores_the_weights_back_row_major():
    model = tiny()
    converted = to_decode_layout(to_decode_layout(copy.deepcopy(model)), compiled=True)
    linears = [m for m in converted.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.is_contiguous() for m in linears)
    assert converted.lm_head.weight is converted.tok_emb.weight
    for (name, a), b in zip(model.named_parameters(), converted.parameters()):
        assert torch.equal(a, b), name


def _linear_in_mode(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    with OneRowProducts():
        return F.linear(x, weight, bias)


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_row_products_under_compile_equal_float64_linear(dtype, tolerance):
    """The reduction Inductor writes for one row (bias or not, 2-D or 3-D input) against the
    product in float64; several rows and a column-major weight take F.linear's own path."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(_linear_in_mode, dynamic=False)
    weight = torch.randn(67, 45)
    column_major = weight.t().contiguous().t()
    bias = torch.randn(67)
    cases = [(torch.randn(1, 1, 45), weight, bias), (torch.randn(1, 45), weight, None),
             (torch.randn(3, 2, 45), weight, bias), (torch.randn(1, 45), column_major, None)]
    for x, w, b in cases:
        expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
        got = compiled(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
        assert got.shape == expected.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * 10)


def _traced_ops(fn, *args) -> set[str]:
    """The names of the functions in the graph Dynamo traces from ``fn(*args)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False)(*args)
    return {getattr(node.target, "__name__", str(node.target)) for gm in graphs for node in gm.graph.nodes
            if node.op in ("call_function", "call_method")}


def test_a_traced_decode_step_has_no_blas_product_and_no_sdpa_at_one_row():
    """What Dynamo records for the CPU decode step: one row of a model, reductions and explicit
    attention (which Inductor fuses); two rows, BLAS products again."""
    from mini_transformer.generation.engine import _next_logits_cpu
    from mini_transformer.model import KVCache

    model = tiny(n_kv_heads=2, bias=True)
    with torch.no_grad():
        for batch in (1, 2):
            ops = _traced_ops(_next_logits_cpu, model, KVCache.for_model(model, batch), torch.full((batch, 1), 5),
                              torch.tensor([0]), None, None)
            assert ("linear" in ops) == (batch > 1), ops
            assert "sum" in ops or batch > 1
            assert "scaled_dot_product_attention" not in ops and "softmax" in ops


class _Recorder(TorchFunctionMode):
    """Names the torch functions called under it (by the modes above it too)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_one_row_products_reduce_only_while_dynamo_traces(monkeypatch):
    """Run eagerly (as Dynamo does past its recompile limit) the mode changes nothing, since BLAS
    is the faster product there; while tracing, one row becomes a multiply and a sum."""
    x, weight = torch.randn(1, 1, 16), torch.randn(8, 16)
    with _Recorder() as recorder, OneRowProducts():
        out = F.linear(x, weight)
    assert torch.equal(out, F.linear(x, weight)) and "sum" not in recorder.names
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with _Recorder() as recorder, OneRowProducts():
        out = F.linear(x, weight)
    assert "sum" in recorder.names
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-6)
    with _Recorder() as recorder, OneRowProducts():
        F.linear(torch.randn(2, 1, 16), weight)  # two rows: BLAS
    assert "sum" not in recorder.names
