"""The generation engine with tiny random models: sampling filters against plain-Python references,
cached == uncached, batch == single, streaming text, speculative decoding, attention maps."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

from mini_transformer.config import ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.generation import (
    CachedDecoder, KVCachePool, PromptTruncatedWarning, SamplingParams, SpeculativeStats, StopStrings, TextStreamer,
    apply_repetition_penalty, generate, generate_batch, generate_batch_stream, generate_stream,
    min_p_filter, next_token_probs, sample_next_token, save_attention, speculative_accept,
    speculative_generate, stream_text, top_k_filter, top_p_filter, truncate_at_stop,
)
from mini_transformer.model import KVCache, Transformer

VOCAB = 61


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    # init_std 0.3: a default-init random model repeats one token forever, which would make
    # equality tests pass trivially; a larger init gives varied greedy output.
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, block_size=32, dropout=0.0, init_std=0.3)
    base.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**base)).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are fastest on one thread; with two threads on a shared, busy 2-core machine,
    # each small matmul waits for a descheduled worker and the tests get 10-40x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def model_state(model: nn.Module) -> tuple:
    """What generation must leave alone: mode, modules, tensors (by identity and version),
    and no method replaced on an instance."""
    tensors = [(name, id(t), t._version) for name, t in [*model.named_parameters(), *model.named_buffers()]]
    patched = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    return model.training, [name for name, _ in model.named_modules()], tensors, patched


# -- sampling filters against plain-Python references -------------------------------------

def ref_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def ref_top_k(row: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-row, kind="stable")[:k].tolist())


def ref_top_p(row: np.ndarray, p: float) -> set[int]:
    probs = ref_softmax(row)
    kept, total = set(), 0.0
    for i in np.argsort(-probs, kind="stable"):
        kept.add(int(i))
        total += probs[i]
        if total >= p:
            break
    return kept


def ref_min_p(row: np.ndarray, min_p: float) -> set[int]:
    probs = ref_softmax(row)
    return {i for i in range(len(row)) if probs[i] >= min_p * probs.max()}


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in filtered]


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_matches_reference(k):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(k)) * 3
    for row, got in zip(logits.double().numpy(), kept(top_k_filter(logits, k))):
        assert got == ref_top_k(row, k)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_reference(p):
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(int(p * 100))) * 2
    for row, got in zip(logits.double().numpy(), kept(top_p_filter(logits, p))):
        assert got == ref_top_p(row, p)
        assert len(got) >= 1


def test_top_p_keeps_the_smallest_set_that_reaches_p_exactly():
    # Three equal tokens: two of them reach p = 2/3 exactly, so the third is not needed.
    assert kept(top_p_filter(torch.zeros(1, 3), 2 / 3)) == [{0, 1}]  # ties: the lower ids survive
    assert kept(top_p_filter(torch.zeros(1, 4), 0.5)) == [{0, 1}]
    assert kept(top_p_filter(torch.zeros(1, 4), 0.5 + 1e-9)) == [{0, 1, 2}]
    # Random vocabulary-1000 rows against the float64 reference (a float32 running sum missed
    # the boundary in about 1 row in 300).
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1500, 1000, generator=gen) * 3
    ps = torch.rand(1500, generator=gen).tolist()
    for row, p in zip(logits, ps):
        assert kept(top_p_filter(row[None], p))[0] == ref_top_p(row.double().numpy(), p)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9])
def test_min_p_matches_reference(min_p):
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(7)) * 2
    for row, got in zip(logits.double().numpy(), kept(min_p_filter(logits, min_p))):
        assert got == ref_min_p(row, min_p)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_temperature_zero_is_argmax_and_filters_keep_at_least_one():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    params = SamplingParams(temperature=0.5, top_k=1, top_p=0.01, min_p=0.99)
    for _ in range(3):
        assert torch.equal(sample_next_token(logits, params), logits.argmax(-1))


def test_sampling_follows_the_filtered_softmax():
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.7, top_k=4)
    probs = next_token_probs(logits, params)[0]
    draws = sample_next_token(logits.expand(20000, -1), params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=-1.0), dict(repetition_penalty=0.0)])
def test_bad_sampling_parameters_raise_user_error(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


# -- the engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [None, 1], ids=["MHA", "MQA"])
def test_greedy_cached_equals_uncached_token_for_token(n_kv_heads):
    m = tiny_model(n_kv_heads=n_kv_heads)
    prompt = [3, 14, 15, 9, 26]
    cached = generate(m, prompt, max_new_tokens=20, temperature=0)
    uncached = generate(m, prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached == uncached
    assert len(set(cached)) > 3  # not a degenerate repeat


def test_generation_runs_past_block_size_with_sliding_window(model):
    prompt = [1, 2, 3]
    n = 3 * model.config.block_size  # several slides of the window
    cached = generate(model, prompt, max_new_tokens=n, temperature=0)
    uncached = generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=False)
    assert len(cached) == n
    assert cached == uncached  # both apply the same window rule


def test_the_window_slides_to_the_last_context_keep_tokens(model):
    block = model.config.block_size
    prompt = [1, 2, 3]
    seq = prompt + generate(model, prompt, max_new_tokens=block + 4, temperature=0)
    # At len(seq) == block + 1 the window outgrows the context: it restarts at the last block // 2.
    start = block + 1 - block // 2
    assert generate(model, seq[start:block + 1], max_new_tokens=3, temperature=0) == seq[block + 1:block + 4]
    # A different context_keep gives a different (equally valid) continuation rule.
    keep = 8
    seq8 = prompt + generate(model, prompt, max_new_tokens=block + 4, temperature=0, context_keep=keep)
    again = generate(model, seq8[block + 1 - keep:block + 1], max_new_tokens=3, temperature=0)
    assert again == seq8[block + 1:block + 4]


def test_long_prompt_is_cropped_with_a_warning(model):
    long_prompt = list(range(model.config.block_size + 10))
    with pytest.warns(PromptTruncatedWarning):
        out = generate(model, long_prompt, max_new_tokens=5, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cropped = generate(model, long_prompt[-model.config.block_size:], max_new_tokens=5, temperature=0)
    assert out == cropped


def test_batch_equals_single_for_prompts_of_different_lengths(model):
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13], [20, 21, 22], list(range(30, 60))]
    # 40 new tokens: the longest row slides its window while the others do not.
    batch = generate_batch(model, prompts, max_new_tokens=40, temperature=0)
    alone = [generate(model, p, max_new_tokens=40, temperature=0) for p in prompts]
    assert batch == alone
    assert generate_batch(model, prompts, max_new_tokens=40, temperature=0, use_cache=False) == alone


@pytest.mark.slow  # compiles
def test_compiled_decode_step_gives_the_eager_tokens():
    """torch.compile of the decode step: the same greedy tokens as eager, past the context window
    (re-prefills), in a left-padded batch, and for a second model of the same shape; one graph
    for all the tokens of a generation; no model kept alive by the compiled step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a clean compile cache: the graph count below is this test's own
    counters.clear()
    model = tiny_model()
    prompt = [3, 14, 15, 9, 26]
    n = 2 * model.config.block_size
    compiled = generate(model, prompt, max_new_tokens=n, temperature=0, compile=True)
    assert compiled == generate(model, prompt, max_new_tokens=n, temperature=0)
    assert len(set(compiled)) > 3
    # Static shapes: one graph for every token and slot, across the window's re-prefills.
    assert counters["stats"]["unique_graphs"] == 1
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13]]
    assert generate_batch(model, prompts, max_new_tokens=12, temperature=0, compile=True) == \
        generate_batch(model, prompts, max_new_tokens=12, temperature=0)
    other = tiny_model(seed=1)
    assert generate(other, prompt, max_new_tokens=12, temperature=0, compile=True) == \
        generate(other, prompt, max_new_tokens=12, temperature=0)
    with pytest.raises(UserError, match="KV-cache"):
        generate(model, prompt, max_new_tokens=2, compile=True, use_cache=False)
    # The compiled step holds no model: both the model that compiled it and one that reused it
    # can be freed.
    alive = [weakref.ref(model), weakref.ref(other)]
    del model, other
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_of_every_model_option_gives_the_eager_tokens(dtype):
    """GQA, biases, an untied head, qk_norm, relu2 and a logit cap through the compiled step (its
    one-row products and fused attention on the CPU): the eager logits, and in fp32 the eager
    greedy tokens."""
    from mini_transformer.generation.engine import compiled_decode_one_token, decode_one_token
    from mini_transformer.model import KVCache

    torch._dynamo.reset()
    model = tiny_model(n_kv_heads=2, bias=True, tie_embeddings=False, qk_norm=True, activation="relu2",
                       logit_softcap=15.0).to(dtype)
    prompt = [3, 14, 15, 9, 26]
    n = model.config.block_size + 8  # past the window: a re-prefill between compiled steps
    compiled_tokens = generate(model, prompt, max_new_tokens=n, temperature=0, compile=True)
    if dtype == torch.float32:  # bf16 roundings differ between the two ways: a near tie may flip
        assert compiled_tokens == generate(model, prompt, max_new_tokens=n, temperature=0)
    token, slot = torch.tensor([[7]]), torch.tensor([0])
    eager = decode_one_token(model, KVCache.for_model(model, 1), token, slot)
    compiled = compiled_decode_one_token(model, KVCache.for_model(model, 1), token, slot)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(compiled.double(), eager.double(), rtol=tolerance, atol=tolerance * 10)


@pytest.mark.slow  # compiles
def test_compiled_decoding_reuses_its_kv_cache_between_generations(monkeypatch):
    """A CUDA graph reads the cache where it was recorded: a KVCachePool lends each generation a
    cache and takes it back, so the next generation of that batch shape decodes through the same
    (zeroed) memory; the model itself holds nothing."""
    from mini_transformer.generation import engine

    model = tiny_model()
    before = model_state(model)
    pool = KVCachePool()
    prompt = [3, 14, 15, 9, 26]
    first = generate(model, prompt, max_new_tokens=10, temperature=0, compile=True, cache_pool=pool)
    assert len(pool) == 1
    (spare,) = pool._spare
    pointers = [layer.k.data_ptr() for layer in spare.layers]
    seen = []
    real_prefill = engine.prefill

    def recording_prefill(model, kv_cache, *args, **kwargs):
        seen.append([layer.k.data_ptr() for layer in kv_cache.layers])
        return real_prefill(model, kv_cache, *args, **kwargs)

    monkeypatch.setattr(engine, "prefill", recording_prefill)
    second = generate(model, [7, 1], max_new_tokens=10, temperature=0, compile=True, cache_pool=pool)
    monkeypatch.setattr(engine, "prefill", real_prefill)
    assert seen == [pointers]
    assert second == generate(model, [7, 1], max_new_tokens=10, temperature=0)  # no stale keys
    assert first == generate(model, prompt, max_new_tokens=10, temperature=0)
    # Another batch size gets a cache of its own, and batch 1 keeps its one.
    rows = generate_batch(model, [[5], [7, 8]], max_new_tokens=4, temperature=0, compile=True, cache_pool=pool)
    assert rows == generate_batch(model, [[5], [7, 8]], max_new_tokens=4, temperature=0)
    assert sorted(cache.batch_size for cache in pool._spare) == [1, 2]
    assert [layer.k.data_ptr() for layer in pool.take(model, 1).layers] == pointers
    pool.clear()
    assert len(pool) == 0
    assert model_state(model) == before


def test_two_generations_run_on_one_model_at_the_same_time(model):
    """Each stream owns its cache: interleaved streams, and streams in two threads, give exactly
    the tokens each gives alone."""
    import threading

    prompts = [[1, 2, 3], [40, 41], [7]]
    alone = [generate(model, p, max_new_tokens=50, temperature=0) for p in prompts]
    sampled = generate(model, [5], max_new_tokens=50, seed=3)
    pool = KVCachePool()
    streams = [generate_stream(model, p, max_new_tokens=50, temperature=0, cache_pool=pool) for p in prompts]
    streams.append(generate_stream(model, [5], max_new_tokens=50, seed=3, cache_pool=pool))
    interleaved = [[] for _ in streams]
    for _ in range(50):  # one token of each stream in turn, past the window (block_size 32)
        for out, stream in zip(interleaved, streams):
            out.append(next(stream))
    assert interleaved == [*alone, sampled]
    assert len(pool) == 0  # all four caches are still lent out
    for stream in streams:
        stream.close()
    assert len(pool) == 4

    results: dict[int, list[int]] = {}
    def run(i: int) -> None:
        results[i] = generate(model, prompts[i], max_new_tokens=50, temperature=0, cache_pool=pool)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(prompts))] == alone


def test_generation_reads_the_weights_as_they_are_at_each_step():
    """A weight changed while a stream is open (a fine-tune step, a LoRA merge) is used by the
    next token: nothing holds a stale copy of it."""
    m = tiny_model(tie_embeddings=False)
    prompt = [3, 14, 15]
    stream = generate_stream(m, prompt, max_new_tokens=10, temperature=0)
    taken = [next(stream) for _ in range(3)]
    with torch.no_grad():
        m.lm_head.weight.neg_()  # the head only shapes the logits, not the cached keys
        m.blocks[-1].ffn.down.weight.mul_(1.5)  # this one changes the last layer's output too
    following = next(stream)
    stream.close()
    # The cached keys of earlier tokens came from the old weights, so compare against a cache
    # filled the same way: the old model for the prefix, the new one for the last token.
    old = tiny_model(tie_embeddings=False)
    cache = KVCache.for_model(old, 1)
    decoder = CachedDecoder(old, cache)
    decoder.prefill([prompt + taken[:-1]])
    decoder.model = m
    expected = decoder.extend(torch.tensor([[taken[-1]]]))[0, -1].argmax().item()
    assert following == expected
    unchanged = generate(old, prompt, max_new_tokens=4, temperature=0)
    assert unchanged[:3] == taken and unchanged[3] != following  # the change did matter


def test_generation_leaves_the_model_as_it_was(model):
    before = model_state(model)
    generate(model, [1, 2, 3], max_new_tokens=40, temperature=0)
    generate_batch(model, [[5], [7, 8, 9]], max_new_tokens=40, temperature=0.8, seed=0, repetition_penalty=1.1)
    speculative_generate(model, tiny_model(seed=1, n_layers=1), [1, 2], max_new_tokens=40, temperature=0)
    assert model_state(model) == before


def test_active_dropout_is_refused_and_the_mode_is_left_alone():
    training = tiny_model(dropout=0.1).train()
    with pytest.raises(UserError, match="model.eval"):
        generate(training, [1, 2], max_new_tokens=3)
    with pytest.raises(UserError, match="model.eval"):
        speculative_generate(tiny_model(), training, [1, 2], max_new_tokens=3)
    assert training.training
    no_dropout = tiny_model().train()  # training mode without dropout computes what eval does
    assert generate(no_dropout, [1, 2], max_new_tokens=5, temperature=0) == \
        generate(tiny_model(), [1, 2], max_new_tokens=5, temperature=0)
    assert no_dropout.training


def test_batch_with_math_attention_does_not_produce_nan():
    m = tiny_model(attention="math")
    prompts = [[5], [7, 8, 9, 10]]
    assert generate_batch(m, prompts, max_new_tokens=8, temperature=0) == [
        generate(m, p, max_new_tokens=8, temperature=0) for p in prompts]
    assert all(b.attn.attention == "math" for b in m.blocks)


def test_same_seed_same_tokens_and_different_seed_differs(model):
    kwargs = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    a = generate(model, [1, 2, 3], seed=123, **kwargs)
    b = generate(model, [1, 2, 3], seed=123, **kwargs)
    c = generate(model, [1, 2, 3], seed=124, **kwargs)
    assert a == b and a != c
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert generate(model, [4], generator=g1, **kwargs) == generate(model, [4], generator=g2, **kwargs)


def test_stop_ids_end_generation_and_are_not_yielded(model):
    free = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0)
    stop = free[5]
    first = free.index(stop)
    assert generate(model, [1, 2, 3], max_new_tokens=20, temperature=0, stop_ids=[stop]) == free[:first]


def test_batch_stream_marks_finished_rows_with_none(model):
    prompts = [[1, 2, 3], [9]]
    free = generate(model, prompts[0], max_new_tokens=10, temperature=0)
    steps = list(generate_batch_stream(model, prompts, max_new_tokens=10, temperature=0, stop_ids=[free[2]]))
    assert [s[0] for s in steps[:2]] == free[:2]
    assert all(s[0] is None for s in steps[free.index(free[2]):])
    assert len(steps) == 10  # the other row keeps going


def test_stream_is_lazy_and_releases_the_cache_when_closed(model):
    pool = KVCachePool()
    stream = generate_stream(model, [1, 2], max_new_tokens=100, temperature=0, cache_pool=pool)
    assert len(pool) == 0
    first = [next(stream) for _ in range(3)]
    assert len(pool) == 0  # lent to the open stream
    stream.close()
    assert len(pool) == 1  # given back at once
    assert first == generate(model, [1, 2], max_new_tokens=3, temperature=0)


def test_bad_inputs_raise_user_error(model):
    with pytest.raises(UserError):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(UserError):
        generate(model, [VOCAB + 1], max_new_tokens=3)
    with pytest.raises(UserError):
        generate(model, [1], max_new_tokens=-1)
    assert generate(model, [1], max_new_tokens=0) == []


# -- streaming text -----------------------------------------------------------------------

def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_pieces_join_to_the_full_text_and_never_split_a_character():
    text = "héllo wörld — 日本語 🙂 ok"
    ids = list(text.encode("utf-8"))
    streamer = TextStreamer(byte_decode)
    pieces = [streamer.put(t) for t in ids] + [streamer.flush()]
    assert "".join(pieces) == text == byte_decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # something was held back while a character was incomplete


def test_stream_text_from_the_engine_equals_non_streamed_text():
    # A byte-level model: 256 ids, prompt with multi-byte characters.
    m = tiny_model(vocab_size=256, seed=3)
    prompt = list("é日".encode("utf-8"))
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=0)
    pieces = list(stream_text(generate_stream(m, prompt, **kwargs), byte_decode))
    assert "".join(pieces) == byte_decode(generate(m, prompt, **kwargs))
    assert all(p for p in pieces)


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    streamer = TextStreamer(byte_decode)
    assert streamer.put(0xE6) == ""
    assert streamer.flush() == "\ufffd"


def test_stop_strings_end_the_stream_and_are_not_printed():
    ids = list("once upon a time, THE END and more".encode())
    pieces = list(stream_text(iter(ids), byte_decode, stop=["THE END", "zzz"]))
    assert "".join(pieces) == "once upon a time, "
    assert truncate_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)


def test_stop_string_prefix_is_held_back_then_released():
    stops = StopStrings(["<end>"])
    assert stops.feed("hello <e") == "hello "
    assert stops.feed("x") == "<ex"
    assert stops.feed("<en") == ""
    assert stops.feed("d> tail") == "" and stops.stopped


def test_stop_string_closes_the_generator(model):
    tokens = generate_stream(model, [1], max_new_tokens=50, temperature=0)
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)  # noqa: E731
    full = decode(generate(model, [1], max_new_tokens=50, temperature=0))
    stop = full[10:13]
    text = "".join(stream_text(tokens, decode, stop=[stop]))
    assert text == full[:full.index(stop)]
    assert tokens.gi_frame is None  # the token stream was closed, so its cache is released


# -- speculative decoding -----------------------------------------------------------------

def draft_from_first_layers(target: Transformer, n_layers: int) -> Transformer:
    """A draft sharing the target's embedding, head and first layers: it agrees often."""
    cfg = ModelConfig(**{**target.config.__dict__, "n_layers": n_layers})
    draft = Transformer(cfg).eval()
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_speculative_greedy_equals_target_greedy(model, gamma):
    draft = tiny_model(seed=1, n_layers=1)  # unrelated random draft: many rejections
    n = 2 * model.config.block_size  # past the window
    expected = generate(model, [1, 2, 3], max_new_tokens=n, temperature=0)
    got, stats = speculative_generate(model, draft, [1, 2, 3], max_new_tokens=n, gamma=gamma, temperature=0)
    assert got == expected
    assert stats.emitted == n and 0 <= stats.acceptance_rate <= 1


def test_speculative_with_a_shared_structure_draft_accepts_more(model):
    prompt = [4, 5, 6]
    related = speculative_generate(model, draft_from_first_layers(model, 1), prompt, max_new_tokens=40,
                                   temperature=0)[1]
    unrelated = speculative_generate(model, tiny_model(seed=9, n_layers=1), prompt, max_new_tokens=40,
                                     temperature=0)[1]
    assert related.acceptance_rate > unrelated.acceptance_rate


def test_speculative_sampling_is_reproducible_and_respects_stop_ids(model):
    draft = draft_from_first_layers(model, 1)
    kwargs = dict(max_new_tokens=30, temperature=0.9, top_k=30, repetition_penalty=1.1)
    a, _ = speculative_generate(model, draft, [1, 2], seed=3, **kwargs)
    b, _ = speculative_generate(model, draft, [1, 2], seed=3, **kwargs)
    assert a == b and len(a) == 30
    c, _ = speculative_generate(model, draft, [1, 2], seed=3, stop_ids=[a[7]], **kwargs)
    assert c == a[:a.index(a[7])]


def test_speculative_rejects_mismatched_vocabularies(model):
    with pytest.raises(UserError):
        speculative_generate(model, tiny_model(vocab_size=VOCAB + 1), [1], max_new_tokens=3)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square at about alpha = 0.001 (Wilson-Hilferty)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pooled chi-square over rows of (observed counts, expected probabilities)."""
    stat, df = 0.0, 0
    for observed, p in zip(counts, probs):
        expected = observed.sum() * p
        use = expected >= 5  # the usual validity rule; rare cells are left out
        stat += float((((observed - expected) ** 2)[use] / expected[use]).sum())
        df += int(use.sum()) - 1
    return stat, df


def test_speculative_accept_rule_gives_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    V, gamma, n = 8, 3, 6000
    p = torch.softmax(torch.randn(gamma + 1, V, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(gamma, V, generator=gen) * 1.5, -1)
    counts = np.zeros(V)
    for _ in range(n):
        drafts = [torch.multinomial(q[i], 1, generator=gen).item() for i in range(gamma)]
        out, _ = speculative_accept(drafts, q, p, gen)
        counts[out[0]] += 1
    stat, df = chi_square(counts[None], p[:1].double().numpy())
    assert stat < chi_square_critical(df), (stat, df)
    wrong, _ = chi_square(counts[None], q[:1].double().numpy())  # the test can tell q from p
    assert wrong > chi_square_critical(df)


class BigramModel(nn.Module):
    """A mock with the Transformer's generation interface whose next-token logits depend only on
    the current token, so every generated token has a known distribution given the one before."""

    def __init__(self, table: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.config = ModelConfig(vocab_size=table.shape[0], block_size=block_size, d_model=8, n_heads=1,
                                  n_layers=1)
        self.tok_emb = nn.Embedding.from_pretrained(table)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def forward(self, idx, targets=None, *, kv_cache=None, input_pos=None, position_ids=None, attn_mask=None,
                logits_to_keep=0):
        assert input_pos is None or int(input_pos.max()) < kv_cache.max_len  # never past the cache
        logits = self.tok_emb(idx)
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def test_speculative_sampling_follows_the_target_distribution_chi_square():
    gen = torch.Generator().manual_seed(1)
    V = 8
    table = torch.randn(V, V, generator=gen) * 1.2
    target = BigramModel(table)
    draft = BigramModel(table + torch.randn(V, V, generator=gen) * 0.8)  # close, but not equal
    temperature, n = 0.9, 12000
    stats = SpeculativeStats()
    tokens, stats = speculative_generate(target, draft, [0], max_new_tokens=n, gamma=3,
                                         temperature=temperature, seed=0, stats=stats)
    seq = [0] + tokens
    counts = np.zeros((V, V))
    for a, b in zip(seq[:-1], seq[1:]):
        counts[a, b] += 1
    p = torch.softmax(target.tok_emb.weight.double() / temperature, -1).numpy()
    q = torch.softmax(draft.tok_emb.weight.double() / temperature, -1).numpy()
    stat, df = chi_square(counts, p)
    assert stat < chi_square_critical(df), (stat, df)
    assert chi_square(counts, q)[0] > chi_square_critical(df)  # the draft's distribution is rejected
    # Theory: a draft is accepted with probability sum_x min(p(x), q(x)), averaged over contexts.
    overlap = np.minimum(p, q).sum(-1)
    assert overlap.min() - 0.02 < stats.acceptance_rate < overlap.max() + 0.02
    assert stats.rounds < n  # several tokens per target forward


@pytest.mark.slow  # 1,200 speculative generations
def test_speculative_first_token_of_real_models_follows_target_softmax():
    V = 8
    target = tiny_model(vocab_size=V, n_layers=2, seed=4)
    draft = tiny_model(vocab_size=V, n_layers=1, seed=5)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(V)
    for _ in range(1200):
        out, _ = speculative_generate(target, draft, prompt, max_new_tokens=3, gamma=2, temperature=1.0,
                                      generator=gen)
        counts[out[0]] += 1
    stat, df = chi_square(counts[None], p[None])
    assert stat < chi_square_critical(df), (stat, df)


# -- attention maps -----------------------------------------------------------------------

def test_attention_npz_and_png_are_written_with_the_right_shapes(model, tmp_path):
    pytest.importorskip("matplotlib")
    ids = list(range(1, 10)) + generate(model, list(range(1, 10)), max_new_tokens=40, temperature=0)
    labels = [f"t{i}" for i in ids]
    from mini_transformer.plot import plot_attention_file  # the PNG is drawn outside generation

    npz = save_attention(model, ids, tmp_path / "att", labels=labels)
    pngs = plot_attention_file(npz)
    data = np.load(npz)
    T = model.config.block_size  # cropped to the context
    assert data["attention"].shape == (model.config.n_layers, model.config.n_heads, T, T)
    assert data["tokens"].tolist() == ids[-T:]
    assert data["labels"].tolist() == labels[-T:]
    np.testing.assert_allclose(data["attention"].sum(-1), 1.0, atol=1e-5)  # rows are distributions
    assert np.allclose(np.triu(data["attention"][0, 0], 1), 0)  # causal
    assert [p.name for p in pngs] == [f"attention-layer{i}.png" for i in range(model.config.n_layers)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_attention_figure_shows_one_layer_with_a_colour_bar(tmp_path):
    pytest.importorskip("matplotlib")
    from mini_transformer.plot import attention_figure, pyplot

    weights = np.random.default_rng(0).dirichlet(np.ones(6), size=(3, 8, 6)).astype(np.float32)  # (L, H, T, T)
    labels = ["a", " ", "\n", "bc", "d", "a_very_long_token"]
    fig = attention_figure(weights, labels, layer=1)
    try:
        heatmaps = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title() for ax in heatmaps] == [f"head {h}" for h in range(8)]
        colour_bars = [ax for ax in fig.axes if not ax.images]
        assert len(colour_bars) == 1 and "attention weight" in colour_bars[0].get_ylabel()
        assert colour_bars[0].get_ylim() == (0.0, 1.0)
        np.testing.assert_array_equal(heatmaps[5].images[0].get_array(), weights[1, 5])
        assert ([t.get_text() for t in heatmaps[0].get_xticklabels()]
                == ["a", "\u2423", "\\n", "bc", "d", "a_very_lo\u2026"])
    finally:
        pyplot().close(fig)
    single = attention_figure(weights, labels, layer=2, heads=[7])
    try:
        assert [ax.get_title() for ax in single.axes if ax.images] == ["head 7"]
        np.testing.assert_array_equal(single.axes[0].images[0].get_array(), weights[2, 7])
    finally:
        pyplot().close(single)
