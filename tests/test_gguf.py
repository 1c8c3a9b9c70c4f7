"""``mini-transformer export --format gguf``: llama.cpp's file, read back and run.

Without llama.cpp (CI): the file is read with ``gguf.GGUFReader`` (metadata keys, tensor names,
shapes and types; the RoPE permutation undone gives our weights back; q8_0 dequantizes close to
ours) and its vocabulary, run as a byte-level BPE by ``tokenizers`` (llama.cpp's algorithm: GPT-2's
split, byte symbols, merges by rank), gives our ids for every tokenizer kind.

With ``llama-cpp-python`` (the ``llamacpp`` extra, ``make llamacpp``): llama.cpp tokenizes as we
do and detokenizes back, its logits equal ours within 1e-3 at f32 (rmsnorm and layernorm; MHA, GQA
and MQA; every tokenizer kind) and its own greedy loop gives our 50 tokens, running past the
token id 11 that it would otherwise take as the end of a char vocabulary's text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mini_transformer.checkpoint import load_model, save_inference_checkpoint
from mini_transformer.config import Config, ModelConfig
from mini_transformer.generation import generate
from mini_transformer.interop.gguf.layout import rope_unpermute
from mini_transformer.interop.gguf.vocab import CONTROL, NORMAL, PRE, byte_level, gguf_vocab
from mini_transformer.model import Transformer
from mini_transformer.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer

from .test_hf_export import perturb
from .test_hf_tokenizer import CORPUS, TEXTS, bpe, gpt2  # noqa: F401 (fixtures)

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) writes and reads the files")

ATOL = 1e-3
NEW_TOKENS = 50
PROMPT = "ROMEO: But soft"
KINDS = ("char", "byte", "bpe", "gpt2")


@pytest.fixture
def tokenizers_by_kind(bpe, gpt2, monkeypatch) -> dict[str, Tokenizer]:
    # The gpt2 kind is a small GPT-2-shaped tiktoken encoding (GPT-2's own needs a download); the
    # export loads the checkpoint's tokenizer again, so tiktoken must keep finding it.
    monkeypatch.setattr(pytest.importorskip("tiktoken"), "get_encoding", lambda name: gpt2.encoding)
    return {"char": CharTokenizer.from_text(CORPUS + PROMPT), "byte": ByteTokenizer(), "bpe": bpe, "gpt2": gpt2}


def make_checkpoint(directory: Path, tokenizer: Tokenizer, *, norm="rmsnorm", n_kv_heads=None, tie=True,
                    bias=False, seed=0, d_model=32, n_heads=4) -> tuple[Path, ModelConfig]:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         n_layers=2, block_size=64, dropout=0.0, ffn_hidden_size=64, norm=norm, norm_eps=1e-6,
                         rope_base=5000.0, tie_embeddings=tie, bias=bias)
    torch.manual_seed(seed)
    model = Transformer(config)
    perturb(model, seed)
    save_inference_checkpoint(directory, model, Config(model=config), tokenizer)
    return directory, config


def export(run_cli, checkpoint: Path, out: Path, *flags: str) -> Path:
    status, stdout, stderr = run_cli("export", "--checkpoint", str(checkpoint), "--format", "gguf",
                                     "--out", str(out), *flags)
    assert status == 0, stderr
    assert f"written to {out}" in stdout
    return out


def read(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def ours_from_gguf(tensors, config: ModelConfig, architecture: str) -> dict[str, torch.Tensor]:
    """Our state dict rebuilt from an f32 file: permutation undone, q/k/v and gate/up joined."""
    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(tensors[name].data, dtype=np.float32))

    def unpermuted(name: str, heads: int) -> torch.Tensor:
        return rope_unpermute(get(name), heads) if architecture == "llama" else get(name)

    V = config.vocab_size
    state = {"tok_emb.weight": get("token_embd.weight")[:V], "norm.weight": get("output_norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = get("output.weight")[:V]
    for i in range(config.n_layers):
        b = f"blk.{i}."
        for suffix in ("weight",) + (("bias",) if config.bias else ()):
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([
                unpermuted(f"{b}attn_q.{suffix}", config.n_heads), unpermuted(f"{b}attn_k.{suffix}", config.kv_heads),
                get(f"{b}attn_v.{suffix}")])
            state[f"blocks.{i}.attn.proj.{suffix}"] = get(f"{b}attn_output.{suffix}")
            state[f"blocks.{i}.ffn.gate_up.{suffix}"] = torch.cat([get(f"{b}ffn_gate.{suffix}"),
                                                                    get(f"{b}ffn_up.{suffix}")])
            state[f"blocks.{i}.ffn.down.{suffix}"] = get(f"{b}ffn_down.{suffix}")
        state[f"blocks.{i}.attn_norm.weight"] = get(f"{b}attn_norm.weight")
        state[f"blocks.{i}.ffn_norm.weight"] = get(f"{b}ffn_norm.weight")
    return state


# -- the file, without llama.cpp ---------------------------------------------------------------------

@pytest.mark.parametrize("norm,n_kv_heads,tie,bias,architecture", [
    ("rmsnorm", None, True, False, "llama"),      # MHA
    ("rmsnorm", 2, False, True, "llama"),         # GQA, untied, every bias
    ("layernorm", 1, True, False, "stablelm"),    # MQA
])
def test_f32_file_holds_our_model(tmp_path, run_cli, norm, n_kv_heads, tie, bias, architecture):
    tok = CharTokenizer.from_text(CORPUS)
    checkpoint, config = make_checkpoint(tmp_path / "ck", tok, norm=norm, n_kv_heads=n_kv_heads, tie=tie, bias=bias)
    fields, tensors = read(export(run_cli, checkpoint, tmp_path / "m.gguf"))

    a = architecture
    assert fields["general.architecture"] == a and fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert {k: fields[f"{a}.{k}"] for k in ("block_count", "embedding_length", "feed_forward_length",
                                            "attention.head_count", "attention.head_count_kv",
                                            "rope.dimension_count", "context_length")} == {
        "block_count": 2, "embedding_length": 32, "feed_forward_length": 64, "attention.head_count": 4,
        "attention.head_count_kv": config.kv_heads, "rope.dimension_count": 8, "context_length": 64}
    assert fields[f"{a}.rope.freq_base"] == pytest.approx(5000.0)
    eps_key = "attention.layer_norm_rms_epsilon" if a == "llama" else "attention.layer_norm_epsilon"
    assert fields[f"{a}.{eps_key}"] == pytest.approx(1e-6)

    n_vocab = tok.vocab_size + 1  # the char vocabulary's added end-of-text token
    block = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
             "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if bias:
        block += ["attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
                  "ffn_down.bias"]
    if a == "stablelm":  # required there: zeros for ours
        block += ["attn_norm.bias", "ffn_norm.bias"]
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}" for i in range(2) for n in block}
    if not tie or a == "stablelm":
        expected.add("output.weight")
    if a == "stablelm":
        expected.add("output_norm.bias")
    assert set(tensors) == expected
    kv = config.kv_heads * 8
    shapes = {"token_embd.weight": [32, n_vocab], "output.weight": [32, n_vocab], "blk.0.attn_q.weight": [32, 32],
              "blk.0.attn_k.weight": [32, kv], "blk.0.attn_v.weight": [32, kv], "blk.1.ffn_gate.weight": [32, 64],
              "blk.1.ffn_down.weight": [64, 32], "output_norm.weight": [32]}
    for name, shape in shapes.items():
        if name in tensors:
            assert list(tensors[name].shape) == shape, name  # GGUF order: columns first
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    state = load_model(checkpoint, "cpu").state_dict()
    rebuilt = ours_from_gguf(tensors, config, a)
    for name, tensor in rebuilt.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    if a == "stablelm":
        zeros = [t for n, t in tensors.items() if n.endswith("norm.bias")]
        assert len(zeros) == 5 and not any(np.any(t.data) for t in zeros)
        if tie:
            np.testing.assert_array_equal(tensors["output.weight"].data, tensors["token_embd.weight"].data)


def test_llama_rows_are_permuted_to_neighbouring_pairs(tmp_path, run_cli):
    """Head h's row 2i of attn_q is our row i, row 2i+1 is our row i + D/2 (the pair RoPE rotates)."""
    checkpoint, config = make_checkpoint(tmp_path / "ck", ByteTokenizer(), n_kv_heads=2, bias=True)
    _, tensors = read(export(run_cli, checkpoint, tmp_path / "m.gguf"))
    qkv = load_model(checkpoint, "cpu").blocks[0].attn.qkv
    D = config.head_dim
    q_file = np.array(tensors["blk.0.attn_q.weight"].data)
    k_bias_file = np.array(tensors["blk.0.attn_k.bias"].data)
    ours_q = qkv.weight[:32].detach().numpy()
    ours_k_bias = qkv.bias[32:32 + 2 * D].detach().numpy()
    for h in range(4):
        for i in range(D // 2):
            np.testing.assert_array_equal(q_file[h * D + 2 * i], ours_q[h * D + i])
            np.testing.assert_array_equal(q_file[h * D + 2 * i + 1], ours_q[h * D + i + D // 2])
    np.testing.assert_array_equal(k_bias_file[2 * D - 1], ours_k_bias[2 * D - 1])  # last pair of head 1
    np.testing.assert_array_equal(k_bias_file[D + 1], ours_k_bias[D + D // 2])


@pytest.mark.parametrize("outtype,file_type,matrix_type", [
    ("f16", "MOSTLY_F16", "F16"), ("q8_0", "MOSTLY_Q8_0", "Q8_0")])
def test_f16_and_q8_0_convert_matrices_and_keep_vectors(tmp_path, run_cli, outtype, file_type, matrix_type):
    checkpoint, config = make_checkpoint(tmp_path / "ck", ByteTokenizer(), norm="layernorm", d_model=64)
    fields, tensors = read(export(run_cli, checkpoint, tmp_path / "m.gguf", "--outtype", outtype))
    assert fields["general.file_type"] == getattr(gguf.LlamaFileType, file_type)
    assert ("general.quantization_version" in fields) == (outtype == "q8_0")
    state = load_model(checkpoint, "cpu").state_dict()
    for name, t in tensors.items():
        expected = matrix_type if len(t.shape) > 1 else "F32"
        assert t.tensor_type.name == expected, name
    # Dequantized, every weight is within rounding of ours. f16: half an ulp (relative 2^-11). Q8_0: half
    # a step (a block's max / 127), plus up to 127 steps times the f16 rounding of the step itself.
    ours = state["blocks.0.ffn.down.weight"].numpy()
    back = gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, tensors["blk.0.ffn_down.weight"].tensor_type)
    step = (np.abs(ours).reshape(-1, 32).max(axis=1) / 127).repeat(32).reshape(ours.shape)
    bound = step * (0.5 + 127 * 2 ** -11) if outtype == "q8_0" else np.abs(ours) * 2 ** -11 + 2 ** -24
    assert np.all(np.abs(back - ours) <= bound + 1e-8)
    assert not np.array_equal(back, ours)


def test_vocabulary_encodes_like_ours(tokenizers_by_kind):
    """Each kind's GGUF vocabulary run as byte-level BPE (GPT-2 split, merges by rank) gives our ids."""
    tk = pytest.importorskip("tokenizers")
    for kind, tok in tokenizers_by_kind.items():
        vocab = gguf_vocab(tok)
        ids = {t: i for i, t in enumerate(vocab.tokens)}
        merges = [tuple(m.split(" ")) for m in vocab.merges]
        # tokenizers wants every merge's parts and result in the vocabulary (llama.cpp does not): a
        # char vocabulary's character prefixes get ids past the end, which no text of ours may produce.
        for part in (p for left, right in merges for p in (left, right, left + right)):
            ids.setdefault(part, len(ids))
        bpe_model = tk.models.BPE(vocab=ids, merges=merges)
        backend = tk.Tokenizer(bpe_model)
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        texts = [t for t in TEXTS + [CORPUS] if kind != "char" or set(t) <= set(tok.chars)]
        for text in texts:
            assert backend.encode(text, add_special_tokens=False).ids == tok.encode(text), (kind, text)
        assert vocab.tokens[vocab.eos_id] == "<|endoftext|>" and vocab.token_types[vocab.eos_id] == CONTROL
        assert vocab.token_types.count(CONTROL) == 1 and set(vocab.token_types) == {NORMAL, CONTROL}


def test_char_vocabulary_builds_multibyte_characters_and_adds_end_of_text(tmp_path, run_cli):
    tok = CharTokenizer.from_text("ab é日本🙂\n")
    checkpoint, config = make_checkpoint(tmp_path / "ck", tok, tie=False)
    fields, tensors = read(export(run_cli, checkpoint, tmp_path / "m.gguf"))
    V = tok.vocab_size
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == PRE
    assert fields["tokenizer.ggml.tokens"] == [byte_level(c) for c in tok.chars] + ["<|endoftext|>"]
    # é: 2 bytes, one merge; 日 and 本: 3 bytes, sharing their first byte; 🙂: 4 bytes.
    assert fields["tokenizer.ggml.merges"] == ["Ã ©", "æ Ĺ", "æĹ ¥", "æ ľ", "æľ ¬", "ð Ł", "ðŁ Ļ", "ðŁĻ Ĥ"]
    assert fields["tokenizer.ggml.eos_token_id"] == V and fields["tokenizer.ggml.suppress_tokens"] == [V]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["llama.vocab_size"] == V + 1
    state = load_model(checkpoint, "cpu").state_dict()
    for name, ours in (("token_embd.weight", "tok_emb.weight"), ("output.weight", "lm_head.weight")):
        data = np.array(tensors[name].data)
        assert data.shape == (V + 1, 32)
        np.testing.assert_allclose(data[V], state[ours].mean(dim=0).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case,flags,message", [
    ("layernorm-bias", (), "norm: layernorm with bias: true has no llama.cpp architecture"),
    ("outtype-hf", ("--outtype", "f16"), "--outtype applies to --format gguf only"),
    ("peft", ("--adapter-format", "peft"), "a GGUF file holds merged weights only"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, run_cli, case, flags, message):
    checkpoint, _ = make_checkpoint(tmp_path / "ck", ByteTokenizer(), norm="layernorm",
                                    bias=case == "layernorm-bias")
    out = tmp_path / "m.gguf"
    fmt = "hf" if case == "outtype-hf" else "gguf"
    status, _, stderr = run_cli("export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *flags)
    assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".m.gguf") for p in tmp_path.iterdir())


def test_quantized_checkpoint_needs_dequantize(tmp_path, run_cli):
    checkpoint, _ = make_checkpoint(tmp_path / "ck", ByteTokenizer(), d_model=64)
    status, _, stderr = run_cli("quantize", "--checkpoint", str(checkpoint), "--mode", "int8",
                                "--out", str(tmp_path / "q"))
    assert status == 0, stderr
    status, _, stderr = run_cli("export", "--checkpoint", str(tmp_path / "q"), "--format", "gguf",
                                "--out", str(tmp_path / "m.gguf"))
    assert status == 2 and "--dequantize" in stderr and not (tmp_path / "m.gguf").exists()
    status, stdout, stderr = run_cli("export", "--checkpoint", str(tmp_path / "q"), "--format", "gguf",
                                     "--out", str(tmp_path / "m.gguf"), "--dequantize")
    assert status == 0, stderr
    assert "dequantized" in stdout and (tmp_path / "m.gguf").is_file()


# -- in llama.cpp ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llamacpp():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llamacpp builds it)")
    from mini_transformer.interop.gguf import llamacpp

    return llamacpp


@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_tokenizes_and_detokenizes_as_we_do(tmp_path, run_cli, tokenizers_by_kind, llamacpp, kind):
    tok = tokenizers_by_kind[kind]
    checkpoint, _ = make_checkpoint(tmp_path / "ck", tok)
    llm = llamacpp.load_llama(export(run_cli, checkpoint, tmp_path / "m.gguf"), n_ctx=64, threads=1)
    texts = [t for t in TEXTS + [CORPUS, "x .y , z ! ' it 's"] if kind != "char" or set(t) <= set(tok.chars)]
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ids == tok.encode(text), text
        assert llm.detokenize(ids).decode("utf-8") == text  # token pieces joined
        assert llamacpp.detokenize(llm, ids) == text  # llama_detokenize (no space clean-up, see vocab.PRE)


@pytest.mark.parametrize("kind,norm,n_kv_heads,tie,bias", [
    ("char", "rmsnorm", None, True, False),
    ("byte", "rmsnorm", 2, False, True),
    ("bpe", "rmsnorm", 1, True, False),
    ("gpt2", "rmsnorm", 2, True, True),
    ("char", "layernorm", 1, False, False),
    ("byte", "layernorm", None, True, False),
    ("bpe", "layernorm", 2, True, False),
])
def test_llamacpp_logits_and_greedy_tokens_equal_ours(tmp_path, run_cli, tokenizers_by_kind, llamacpp, kind, norm,
                                                      n_kv_heads, tie, bias):
    tok = tokenizers_by_kind[kind]
    checkpoint, config = make_checkpoint(tmp_path / "ck", tok, norm=norm, n_kv_heads=n_kv_heads, tie=tie, bias=bias)
    model = load_model(checkpoint, "cpu").eval()
    llm = llamacpp.load_llama(export(run_cli, checkpoint, tmp_path / "m.gguf"), n_ctx=64, threads=1,
                              logits_all=True)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = llamacpp.prompt_logits(llm, ids)[:, :config.vocab_size]
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=ATOL)

    stop = [tok.eos_id] if tok.eos_id is not None else []
    expected = generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=stop)
    assert llamacpp.greedy(llm, ids, NEW_TOKENS) == expected


def test_llamacpp_runs_a_char_model_past_token_11(tmp_path, run_cli, llamacpp):
    """llama.cpp's own completion loop (its end-of-generation test) gives our 50 characters, token
    id 11 among them: a char vocabulary's added end-of-text token, not id 11, ends its text."""
    tok = CharTokenizer.from_text(CORPUS + PROMPT)
    checkpoint, config = make_checkpoint(tmp_path / "ck", tok, tie=False, seed=3)
    model = load_model(checkpoint, "cpu").eval()
    with torch.no_grad():  # make id 11 the model's favourite: its output row along the mean hidden state
        hidden = model(torch.tensor([tok.encode(CORPUS[:60])])).hidden_states[0].mean(dim=0)
        model.lm_head.weight[11] += 2.0 * hidden / hidden.norm()
    save_inference_checkpoint(checkpoint, model, Config(model=config), tok)
    ids = tok.encode(PROMPT)
    ours = generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert 11 in ours and len(ours) == NEW_TOKENS  # the test's premise

    llm = llamacpp.load_llama(export(run_cli, checkpoint, tmp_path / "m.gguf"), n_ctx=128, threads=1)
    completion = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["text"] == tok.decode(ours)


def test_bench_compare_llamacpp_times_ours_eager_and_batched_against_the_same_file(llamacpp):
    """The comparison row: llama.cpp and ours decode the same weights to the same greedy tokens
    (fp32 against f32; bf16 against f16 runs too), and the batched speeds are per batch size."""
    from mini_transformer.interop.gguf.peer import batched_table, compare_with_llamacpp, llamacpp_table

    rows = [compare_with_llamacpp("tiny", dtype=dtype, batch_sizes=(1, 2), block_size=32, gen_tokens=6,
                                  repeats=1, threads=1) for dtype in ("fp32", "bf16")]
    fp32, bf16 = rows
    assert fp32["same_tokens"] and fp32["dtype"] == "fp32 / f32" and bf16["dtype"] == "bf16 / f16"
    for row in rows:
        assert row["peer_tokens_per_s"] > 0 and row["eager_tokens_per_s"] > 0
        assert row["eager_ratio"] == pytest.approx(row["eager_tokens_per_s"] / row["peer_tokens_per_s"])
        assert row["batched_tokens_per_s"][1] == row["eager_tokens_per_s"] and row["batched_tokens_per_s"][2] > 0
        assert "compiled_tokens_per_s" not in row
    table = llamacpp_table(rows).splitlines()
    assert len(table) == 4 and "ours compiled" not in table[0] and table[2].endswith("| yes |")
    assert batched_table(rows).splitlines()[0] == ("| preset | dtype | ours, batch 1 | ours, batch 2 | "
                                                   "llama.cpp, batch 1 |")


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "fp16"], "fp32 (against an f32 GGUF file) or bf16"),
    (["--batches", "0", "4"], "--batches must be positive"),
    (["--compile", "--batches", *map(str, range(2, 10))], "at most 8 batch sizes"),
])
def test_bench_compare_llamacpp_refuses_what_it_cannot_compare(run_cli, tmp_path, flags, message):
    status, _, err = run_cli("bench", "--compare", "llamacpp", *flags, "--out", str(tmp_path / "b"))
    assert status == 2 and message in err and "Traceback" not in err


def test_bench_batches_belong_to_the_llamacpp_comparison(run_cli, tmp_path):
    status, _, err = run_cli("bench", "--batches", "4", "--out", str(tmp_path / "b"))
    assert status == 2 and "add --compare llamacpp" in err and "Traceback" not in err
