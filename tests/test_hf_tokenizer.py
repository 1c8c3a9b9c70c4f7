"""Tokenizers to and from Hugging Face: every kind of ours exported gives the same ids in
``transformers`` and decodes back; an HF ``tokenizer.json`` imports as our ``hf`` kind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")
import tokenizers as tk  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from mini_transformer.errors import UserError  # noqa: E402
from mini_transformer.interop.hf.tokenizer import (bytes_to_unicode, build_hf_tokenizer,  # noqa: E402
                                                   load_hf_tokenizer, save_hf_tokenizer, tiktoken_merges)
from mini_transformer.tokenizer import (EOT, BPETokenizer, ByteTokenizer, CharTokenizer,  # noqa: E402
                                        GPT2Tokenizer, HFTokenizer, load_tokenizer)

TEXTS = ["héllo wörld — 日本 🙂", "", " ", "\n", "   ", "two\n\nlines\r\nand\ta tab", "  spaces  around  ",
         "x <|endoftext|> y", "it's 12345 ∑∫≠ e\u0301 👩\u200d👩\u200d👧 \x00 NUL", "The quick brown fox."]
CORPUS = "\n".join(TEXTS) * 3 + "\nThe quick brown fox jumps over the lazy dog. It's 1984!\n" * 30
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([CORPUS], vocab_size=400)


def small_tiktoken_encoding(bpe: BPETokenizer):
    """A real ``tiktoken.Encoding`` shaped like GPT-2's (same pattern, byte ranks in GPT-2's
    order, ``<|endoftext|>`` last) whose merges come from a BPE trained here: GPT-2's own
    ranks need a download."""
    table = bytes_to_unicode()
    to_byte = {c: b for b, c in table.items()}
    # GPT-2 ranks the bytes in the order of their printable stand-ins (printable ASCII first).
    ranks = {bytes([b]): rank for rank, b in enumerate(sorted(table, key=lambda b: table[b]))}
    merges = json.loads(bpe.backend.to_str())["model"]["merges"]
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return tiktoken.Encoding(name="gpt2-small", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


@pytest.fixture(scope="module")
def gpt2(bpe) -> GPT2Tokenizer:
    encoding = small_tiktoken_encoding(bpe)
    original = tiktoken.get_encoding
    tiktoken.get_encoding = lambda name: encoding
    try:
        return GPT2Tokenizer()
    finally:
        tiktoken.get_encoding = original


@pytest.fixture(params=["char", "byte", "bpe", "gpt2"])
def ours(request, bpe, gpt2):
    return {"char": lambda: CharTokenizer.from_text(CORPUS), "byte": ByteTokenizer,
            "bpe": lambda: bpe, "gpt2": lambda: gpt2}[request.param]()


def assert_same_as_ours(tok, hf, texts=TEXTS) -> None:
    for text in texts:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.encode(text) == ids and hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text == tok.decode(ids)


# -- export ---------------------------------------------------------------------------------

def test_export_gives_our_ids_in_transformers(tmp_path, ours):
    save_hf_tokenizer(ours, tmp_path, model_max_length=128)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    for hf in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert hf.model_max_length == 128
        assert len(hf) == ours.vocab_size
        assert_same_as_ours(ours, hf)
        assert hf.eos_token_id == ours.eos_id and hf.bos_token_id == ours.bos_id
        assert hf.pad_token is None and hf.unk_token is None
        if ours.eos_id is not None:
            assert hf.all_special_ids == [ours.eos_id] and hf.all_special_tokens == [EOT]
            assert hf.decode([ours.eos_id]) == EOT == ours.decode([ours.eos_id])
            assert hf.decode([ours.eos_id], skip_special_tokens=True) == ""
            # The text "<|endoftext|>" is ordinary text in both; the token is added by code.
            assert ours.eos_id not in hf("a <|endoftext|> b")["input_ids"]


def test_export_next_to_a_model_config(tmp_path, ours):
    """With the exported model's config.json beside it, AutoTokenizer still loads ours unchanged."""
    save_hf_tokenizer(ours, tmp_path, model_max_length=64)
    for model_type in ("llama", "stablelm"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        hf = AutoTokenizer.from_pretrained(tmp_path)
        assert_same_as_ours(ours, hf, TEXTS[:3] + [CORPUS])


def test_export_of_a_longer_text(tmp_path, ours):
    save_hf_tokenizer(ours, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(CORPUS) == ours.encode(CORPUS)
    backend = build_hf_tokenizer(ours)
    backend.encode_special_tokens = True  # what split_special_tokens sets in transformers
    assert backend.encode(CORPUS, add_special_tokens=False).ids == ours.encode(CORPUS)


def test_char_export_refuses_unknown_characters_like_ours(tmp_path):
    tok = CharTokenizer.from_text("abc \n")
    save_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("a cab\n") == tok.encode("a cab\n")
    with pytest.raises(UserError):
        tok.encode("abd")
    with pytest.raises(Exception, match="UNK"):  # no id is made up for 'd'
        hf.encode("abd")


def test_byte_export_layout(tmp_path):
    save_hf_tokenizer(ByteTokenizer(), tmp_path, model_max_length=32)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == config["eos_token"] == EOT
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["split_special_tokens"] is True and config["model_max_length"] == 32
    assert config["added_tokens_decoder"]["256"]["special"] is True
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {"bos_token": EOT,
                                                                             "eos_token": EOT}
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("\x00\xff") == [0, 0xC3, 0xBF]


def test_gpt2_merges_are_recovered_from_tiktoken_ranks(gpt2, bpe):
    trained = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
               for m in json.loads(bpe.backend.to_str())["model"]["merges"]]
    table = bytes_to_unicode()
    recovered = [("".join(table[b] for b in a), "".join(table[b] for b in c))
                 for a, c in tiktoken_merges(gpt2.encoding._mergeable_ranks)]
    assert recovered == trained
    assert gpt2.encode(CORPUS) != ByteTokenizer().encode(CORPUS)  # the merges are used


def _gpt2_cached() -> bool:
    """GPT-2's real encoding is in tiktoken's cache (never downloaded by the tests)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
            for name in ("vocab.bpe", "encoder.json")]
    return all(os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not _gpt2_cached(), reason="GPT-2's tiktoken files are not in tiktoken's cache (offline)")
def test_real_gpt2_export_matches_tiktoken(tmp_path):
    tok = GPT2Tokenizer()
    save_hf_tokenizer(tok, tmp_path, model_max_length=1024)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    assert_same_as_ours(tok, hf, TEXTS + [CORPUS, "\u00a0\u2028\u0085\u3000 \u200b mixed   spaces"])


# -- import ---------------------------------------------------------------------------------

def test_import_of_an_export_encodes_like_the_original(tmp_path, ours):
    save_hf_tokenizer(ours, tmp_path / "hf")
    imported = load_hf_tokenizer(tmp_path / "hf")
    assert isinstance(imported, HFTokenizer) and imported.kind == "hf"
    assert imported.vocab_size == ours.vocab_size
    assert imported.eos_id == ours.eos_id and imported.bos_id == ours.bos_id
    assert imported.special_tokens == ours.special_tokens
    for text in TEXTS + [CORPUS]:
        assert imported.encode(text) == ours.encode(text)
        assert imported.decode(ours.encode(text)) == text
    assert imported.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    # Saved with a checkpoint of ours, it comes back unchanged.
    imported.save(tmp_path / "ckpt")
    reloaded = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(reloaded, HFTokenizer) and reloaded.to_json() == imported.to_json()
    assert reloaded.encode(CORPUS) == ours.encode(CORPUS) and reloaded.eos_id == ours.eos_id
    # And it exports again as the same tokenizer.
    save_hf_tokenizer(reloaded, tmp_path / "again", model_max_length=16)
    hf = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert_same_as_ours(ours, hf)


def llama_style_dir(directory: Path, config: dict | None = None) -> tk.Tokenizer:
    """A sentencepiece-style BPE (▁ for spaces, byte fallback, <s> prepended on encode) like Llama 2's."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")])
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator([CORPUS.replace("🙂", "")], trainer=trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is None:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True, "lstrip": False, "rstrip": False,
                                "normalized": False, "single_word": False},
                  "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                  "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                  "model_max_length": 4096}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_import_of_a_llama_style_tokenizer(tmp_path):
    backend = llama_style_dir(tmp_path / "llama")
    imported = load_hf_tokenizer(tmp_path / "llama")
    assert imported.bos_id == backend.token_to_id("<s>") == 1
    assert imported.eos_id == backend.token_to_id("</s>") == 2
    assert imported.unk_id == 0 and imported.pad_id is None
    assert imported.named_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                     "pad_token": None}
    assert imported.vocab_size == backend.get_vocab_size()
    original = AutoTokenizer.from_pretrained(tmp_path / "llama")
    texts = TEXTS + [CORPUS, "unseen ☃ ᚠᛇᚻ 🙂 bytes"]
    for text in texts:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert imported.encode(text) == ids == original.encode(text, add_special_tokens=False)
        assert imported.decode(ids) == backend.decode(ids, skip_special_tokens=False)
    assert original.encode("hi")[0] == imported.bos_id  # transformers prepends <s>; ours adds none
    # Through our checkpoint format and back out to Hugging Face: the original behaviour, BOS included.
    imported.save(tmp_path / "ckpt")
    reloaded = load_tokenizer(tmp_path / "ckpt")
    assert reloaded.to_json() == imported.to_json() and reloaded.bos_id == 1
    save_hf_tokenizer(reloaded, tmp_path / "out", model_max_length=256)
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.model_max_length == 256 and exported.chat_template == original.chat_template
    for text in texts:
        assert exported.encode(text) == original.encode(text)
        assert exported.encode(text, add_special_tokens=False) == imported.encode(text)


def test_import_of_a_llama3_style_tokenizer_named_by_ids(tmp_path):
    """Byte-level BPE, special tokens after the vocabulary, no tokenizer_config.json: the bos/eos
    come from the ids in config.json (eos as a list) and generation_config.json."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=350, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens(specials)
    directory = tmp_path / "llama3"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": n, "eos_token_id": [n + 1, n + 2]}))
    imported = load_hf_tokenizer(directory)
    assert (imported.bos_id, imported.eos_id, imported.vocab_size) == (n, n + 1, n + 3)
    assert imported.special_tokens == {s: n + i for i, s in enumerate(specials)}
    for text in TEXTS + [CORPUS]:
        assert imported.encode(text) == tok.encode(text, add_special_tokens=False).ids
        assert imported.decode(imported.encode(text)) == text
    # Special-token text in a document stays ordinary text, as for every kind of ours.
    assert n + 1 not in imported.encode("a <|end_of_text|> b")
    assert imported.decode([n + 2]) == "<|eot_id|>"
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 2}))
    assert load_hf_tokenizer(directory).eos_id == n + 2  # generation_config.json first
    # A role the tokenizer's own config sets to null (Qwen's bos_token) stays unset.
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|eot_id|>"}))
    assert (load_hf_tokenizer(directory).bos_id, load_hf_tokenizer(directory).eos_id) == (None, n + 2)


def test_import_refusals(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_hf_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(UserError) as info:
        load_hf_tokenizer(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "only fast tokenizers are supported" in message
    assert "a sentencepiece-only tokenizer.model must be converted first" in message
    ByteTokenizer().save(tmp_path)  # a checkpoint of ours is not a Hugging Face directory
    with pytest.raises(UserError, match="mini-transformer tokenizer, not a Hugging Face one"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(UserError, match="not a tokenizers file"):
        load_hf_tokenizer(tmp_path)
    llama_style_dir(tmp_path / "bad", config={"eos_token": "<|im_end|>"})
    with pytest.raises(UserError, match=r"names '<\|im_end\|>' as its eos_token"):
        load_hf_tokenizer(tmp_path / "bad")
    # An unk/pad token the vocabulary lacks is dropped, not invented.
    llama_style_dir(tmp_path / "pad", config={"eos_token": "</s>", "pad_token": "<pad>"})
    assert load_hf_tokenizer(tmp_path / "pad").pad_id is None
