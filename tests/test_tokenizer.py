"""Tokenizers: lossless round trips, save/load, special tokens, and the errors users can hit."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mini_transformer.errors import UserError
from mini_transformer.generation import stream_text
from mini_transformer.tokenizer import (EOT, KINDS, BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer,
                                        check_kind, load_tokenizer)

UNICODE = ("Hello, wörld! 😀👩‍👩‍👧 日本語のテキスト 한국어 e\u0301 (combining) \x00 NUL\r\n"
           "CRLF line\r\n\ttab  two  spaces\n\n<|endoftext|> literal, 'quotes' it's 12345 ∑∫≠")
CORPUS = (UNICODE + "\n") * 20 + "The quick brown fox jumps over the lazy dog.\n" * 50


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([CORPUS], vocab_size=400)


def test_byte_round_trip_is_lossless():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.bos_id == 256


def test_bpe_round_trip_is_lossless(bpe):
    for text in (UNICODE, CORPUS, "", " ", "\n\n\n", "  leading and trailing  ", "unseen: ᚠᛇᚻ ☃"):
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(CORPUS)) < len(CORPUS.encode())  # it did learn merges


def test_char_round_trip_on_its_vocabulary():
    tok = CharTokenizer.from_text(UNICODE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tok.chars == sorted(set(UNICODE))
    assert tok.vocab_size == len(set(UNICODE))
    assert tok.eos_id is None and tok.bos_id is None


def test_char_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"characters not in the vocabulary: 'é', '€'; .*data.tokenizer to byte"):
        tok.encode("a€bé")


def test_special_token_text_is_ordinary_text(bpe):
    # A document containing "<|endoftext|>" must not produce the control token.
    assert bpe.eos_id not in bpe.encode("x <|endoftext|> y")
    assert ByteTokenizer().eos_id not in ByteTokenizer().encode(EOT)
    assert bpe.decode([bpe.eos_id]) == EOT
    assert ByteTokenizer().decode([104, 105, 256]) == "hi" + EOT


def test_incomplete_utf8_decodes_with_replacement(bpe):
    emoji = "😀".encode()
    tok = ByteTokenizer()
    assert tok.decode(list(emoji[:2])) == "\ufffd"
    ids = bpe.encode("😀")
    if len(ids) > 1:
        assert bpe.decode(ids[:-1]).endswith("\ufffd")
    # Streaming holds the partial character back and emits it whole.
    assert "".join(stream_text(tok.encode("a😀b"), tok.decode)) == "a😀b"
    assert list(stream_text(tok.encode("a😀"), tok.decode))[-1] == "😀"


@pytest.mark.parametrize("make", [lambda: CharTokenizer.from_text(UNICODE), ByteTokenizer])
def test_save_and_load(tmp_path, make):
    tok = make()
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(UNICODE) == tok.encode(UNICODE)


def test_trained_bpe_reloads_and_encodes_identically(tmp_path, bpe):
    bpe.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["kind"] == "bpe" and data["special_tokens"] == {EOT: bpe.eos_id}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.encode(CORPUS) == bpe.encode(CORPUS)
    assert loaded.encode_batch([UNICODE, CORPUS]) == [bpe.encode(UNICODE), bpe.encode(CORPUS)]
    assert loaded.eos_id not in loaded.encode("<|endoftext|>")  # the setting survives a reload


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a mini-transformer tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "mini-transformer-tokenizer", "kind": "xyz"}))
    with pytest.raises(UserError, match="unknown tokenizer kind 'xyz'"):
        load_tokenizer(tmp_path)


def test_hf_kind_loads_but_is_not_built_from_data():
    # "hf" tokenizers come with an imported model; --data.tokenizer offers only the kinds built from text.
    assert "hf" not in KINDS
    with pytest.raises(UserError, match="unknown tokenizer 'hf'; choose one of: char, byte, bpe, gpt2"):
        check_kind("hf")


def test_gpt2_offline_is_one_line_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    fake = types.SimpleNamespace(get_encoding=offline)
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    with pytest.raises(UserError) as info:
        GPT2Tokenizer()
    message = str(info.value)
    assert "\n" not in message
    assert "not available" in message and "byte-level BPE of 50257 tokens" in message and "--" not in message
    assert info.value.fixes == [{"tokenizer": "bpe", "vocab_size": "50257"}]  # the CLI spells them as flags


def test_gpt2_with_an_encoding(monkeypatch):
    class FakeEncoding:
        n_vocab, eot_token = 50257, 50256

        def encode_ordinary(self, text):
            return list(text.encode())

        def encode_ordinary_batch(self, texts, num_threads=1):
            return [self.encode_ordinary(t) for t in texts]

        def decode(self, ids, errors="strict"):
            return bytes(ids).decode("utf-8", errors=errors)

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=lambda name: FakeEncoding()))
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_missing_optional_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'mini-transformer\[bpe\]'"):
        BPETokenizer.train(["abc"], vocab_size=300)
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(UserError, match=r"pip install 'mini-transformer\[gpt2\]'"):
        GPT2Tokenizer()
