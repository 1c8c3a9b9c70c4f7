"""The data pipeline: prepare (streamed == one-shot), the split, the cache, batches, bad input."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch

from mini_transformer.config import DataConfig
from mini_transformer.data import (RandomBatchSampler, check_split_lengths, iter_sequential_batches,
                                   load_prepared, prepare_dataset, prepare_inputs, split_sizes, token_dtype)
from mini_transformer.data import sources as sources_mod
from mini_transformer.data.sources import bpe_safe_cut, iter_pieces, pystdlib_sources
from mini_transformer.errors import UserError
from mini_transformer.tokenizer import BPETokenizer, ByteTokenizer

from .conftest import REPO_ROOT, python_exe

TEXT_A = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
          "Ünïcödé 😀 日本語 e\u0301 NUL\x00 CRLF\r\n\r\n  spaced   out  \n\t\ttabs it's 'q' 12345\n") * 30
TEXT_B = "Second file, no trailing newline — ∑ 👩‍👩‍👧" * 10


@pytest.fixture
def corpus(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT_A, encoding="utf-8", newline="")
    b.write_text(TEXT_B, encoding="utf-8", newline="")
    return [str(a), str(b)]


def _prepare(inputs, out, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare_inputs(inputs, out, **kwargs)


def _files(directory):
    return {name: (directory / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}


# -- preparation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_streaming_equals_one_shot(tmp_path, corpus, kind):
    one_shot = _prepare(corpus, tmp_path / "big", tokenizer=kind, vocab_size=300, chunk_size=1 << 24)
    for chunk_size in (7, 64):
        streamed = _prepare(corpus, tmp_path / f"c{chunk_size}", tokenizer=kind, vocab_size=300,
                            chunk_size=chunk_size)
        assert _files(streamed.directory) == _files(one_shot.directory), f"chunk_size {chunk_size}"


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_token_files_are_the_joined_text_split_at_the_end(tmp_path, corpus, kind):
    data = _prepare(corpus, tmp_path / "out", tokenizer=kind, vocab_size=300, val_fraction=0.25)
    joined = TEXT_A + "\n\n" + TEXT_B
    ids = data.tokenizer.encode(joined)
    n_train, n_val = split_sizes(len(ids), 0.25)
    assert (len(data.train), len(data.val)) == (n_train, n_val) == (int(len(ids) * 0.75), len(ids) - n_train)
    assert data.train.tolist() + data.val.tolist() == ids
    assert data.tokenizer.decode(ids) == joined
    meta = data.meta
    assert meta["tokenizer"] == kind and meta["vocab_size"] == data.tokenizer.vocab_size
    assert meta["dtype"] == "uint16" and data.train.dtype == np.uint16
    assert [s["bytes"] for s in meta["sources"]] == [len(TEXT_A.encode()), len(TEXT_B.encode())]
    assert [s["sha256"] for s in meta["sources"]] == [
        __import__("hashlib").sha256(open(p, "rb").read()).hexdigest() for p in corpus]
    assert load_prepared(data.directory).val.tolist() == data.val.tolist()


def test_nanogpt_char_split_sizes():
    assert split_sizes(1_115_394, 0.1) == (1_003_854, 111_540)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_bpe_safe_cuts_never_change_the_tokens():
    bpe = BPETokenizer.train([TEXT_A], vocab_size=300)
    rng = random.Random(0)
    alphabet = ["a", "b", "s", "'", " ", "  ", "\n", "\n\n", "\t", "\r\n", "1", ".", "é", "😀", " \n"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(300))
        for piece_size in (1, 3, 17):
            pieces = list(iter_pieces([text], piece_size, bpe_safe_cut))
            assert "".join(pieces) == text
            assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


def test_inputs_directory_glob_and_stdin(tmp_path, corpus, monkeypatch):
    by_dir = _prepare([str(tmp_path)], tmp_path / "d", tokenizer="byte")
    by_glob = _prepare([str(tmp_path / "*.txt")], tmp_path / "g", tokenizer="byte")
    assert [s["name"] for s in by_dir.meta["sources"]] == corpus
    assert by_glob.train.tolist() == by_dir.train.tolist()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(TEXT_A.encode())))
    from_stdin = _prepare(["-"], tmp_path / "s", tokenizer="byte")
    assert from_stdin.meta["sources"][0]["name"] == "<stdin>"
    assert from_stdin.train.tolist() + from_stdin.val.tolist() == list(TEXT_A.encode())


def test_byte_tokenizer_takes_any_bytes(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème ".encode("latin-1") * 20)
    data = _prepare([str(path)], tmp_path / "out", tokenizer="byte")
    assert bytes(data.train.tolist() + data.val.tolist()) == path.read_bytes()


def test_prepare_dataset_caches_by_content(tmp_path, monkeypatch):
    text = tmp_path / "input.txt"
    text.write_text(TEXT_A)
    cfg = DataConfig(path=str(text), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    first = prepare_dataset(cfg, progress=False)
    assert first.directory.parent == tmp_path / "cache" and first.directory.name.startswith("input-char-")

    from mini_transformer.data import pipeline
    monkeypatch.setattr(pipeline, "write_prepared", lambda *a, **k: pytest.fail("prepared again"))
    assert prepare_dataset(cfg, progress=False).directory == first.directory
    monkeypatch.undo()

    text.write_text(TEXT_A + "more")
    changed = prepare_dataset(cfg, progress=False)
    assert changed.directory != first.directory and len(changed.train) + len(changed.val) == len(TEXT_A) + 4
    other = prepare_dataset(DataConfig(path=str(text), tokenizer="byte", cache_dir=cfg.cache_dir), progress=False)
    assert other.directory not in (first.directory, changed.directory)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".input")]  # no temp dirs left

    # An entry that is not a prepared directory (left by something else) is prepared again in its place.
    import shutil
    shutil.rmtree(other.directory)
    other.directory.mkdir()
    (other.directory / "stray.txt").write_text("not a dataset")
    again = prepare_dataset(DataConfig(path=str(text), tokenizer="byte", cache_dir=cfg.cache_dir), progress=False)
    assert again.directory == other.directory and len(again.train) == len(other.train)


def test_prepare_dataset_uses_a_prepared_directory_and_a_given_tokenizer(tmp_path, corpus):
    prepared = _prepare(corpus, tmp_path / "prepared", tokenizer="byte")
    cfg = DataConfig(path=str(prepared.directory), cache_dir=str(tmp_path / "cache"))
    assert prepare_dataset(cfg, progress=False).directory == prepared.directory
    # A checkpoint's tokenizer is used as it is (here: byte, although data.tokenizer says char).
    cfg = DataConfig(path=corpus[0], tokenizer="char", cache_dir=str(tmp_path / "cache"))
    data = prepare_dataset(cfg, tokenizer=ByteTokenizer(), progress=False)
    assert data.tokenizer.kind == "byte" and data.train.tolist()[:5] == list(TEXT_A.encode()[:5])


# -- batches -----------------------------------------------------------------------------------

def test_random_windows_are_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == its position
    sampler = RandomBatchSampler(tokens, batch_size=8, block_size=16, seed=1)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one position
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # consecutive tokens
    assert x.min() >= 0 and y.max() <= 999


def test_sampler_reaches_the_last_token_and_stays_in_range():
    tokens = np.arange(11, dtype=np.uint16)
    sampler = RandomBatchSampler(tokens, batch_size=64, block_size=10, seed=0)  # one possible window
    x, y = sampler.next_batch()
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))


def test_sampler_resume_is_exact_and_ranks_differ():
    tokens = np.arange(5000, dtype=np.uint16)
    a = RandomBatchSampler(tokens, 4, 8, seed=7)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it must survive JSON
    expected = [a.next_batch() for _ in range(3)]
    b = RandomBatchSampler(tokens, 4, 8, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Ranks share one stream of global-batch starts and take disjoint rows of it: rank r of a
    # world of 2 with batch 4 gets rows [4r, 4r+4) of what one process with batch 8 draws.
    r0 = RandomBatchSampler(tokens, 4, 8, seed=7, rank=0, world_size=2)
    r1 = RandomBatchSampler(tokens, 4, 8, seed=7, rank=1, world_size=2)
    whole = RandomBatchSampler(tokens, 8, 8, seed=7)
    for _ in range(3):
        (x0, y0), (x1, y1), (x, y) = r0.next_batch(), r1.next_batch(), whole.next_batch()
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # Rank 0's saved state resumes every rank exactly.
    saved = json.loads(json.dumps(r0.state_dict()))
    expected = [r1.next_batch() for _ in range(2)]
    resumed = RandomBatchSampler(tokens, 4, 8, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(saved)
    for (x1, y1), (x2, y2) in zip(expected, [resumed.next_batch() for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError):
        RandomBatchSampler(tokens, 4, 8, seed=7, rank=2, world_size=2)


def test_sequential_batches_cover_every_target_once():
    tokens = np.arange(1, 104, dtype=np.uint16)  # 103 tokens -> 102 targets; T=10 -> 10 windows + tail 2
    batches = list(iter_sequential_batches(tokens, batch_size=4, block_size=10))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10), (4, 10), (2, 10), (1, 2)]
    ys = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(ys, torch.arange(2, 104))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    no_tail = list(iter_sequential_batches(tokens, 4, 10, include_tail=False))
    assert sum(y.numel() for _, y in no_tail) == 100


# -- bad input ---------------------------------------------------------------------------------

def _one_line_error(run_cli, *argv):
    status, out, err = run_cli("prepare", "--quiet", *argv)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_file(run_cli, tmp_path):
    line = _one_line_error(run_cli, "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert "not found" in line and "nope.txt" in line


def test_empty_file(run_cli, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = _one_line_error(run_cli, "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert "is empty" in line


def test_non_utf8_under_char_gives_the_offset(run_cli, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xe9t\xe9 world")
    line = _one_line_error(run_cli, "--input", str(path), "--out", str(tmp_path / "o"), "--chunk_size", "4")
    assert "not valid UTF-8 at byte offset 6" in line and line.endswith("(--tokenizer byte)")
    # train spells the same setting as its config key
    status, _, err = run_cli("train", "--data.path", str(path), "--data.cache_dir", str(tmp_path / "c"),
                             "--training.out_dir", str(tmp_path / "run"), "--quiet")
    assert status == 2 and err.count("\n") == 1
    assert "not valid UTF-8 at byte offset 6" in err and err.rstrip().endswith("(--data.tokenizer byte)")


def test_split_shorter_than_block_size(run_cli, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    line = _one_line_error(run_cli, "--input", str(path), "--out", str(tmp_path / "o"), "--block_size", "64")
    assert "val split" in line and "block_size + 1 = 65" in line and "10 tokens" in line
    data = load_prepared(tmp_path / "o")
    check_split_lengths(data, 9)
    with pytest.raises(UserError, match="train split .* 90 tokens"):
        check_split_lengths(data, 90)


def test_too_little_text_to_split(run_cli, tmp_path):
    (tmp_path / "one.txt").write_text("x")
    assert "too few to split" in _one_line_error(run_cli, "--input", str(tmp_path / "one.txt"),
                                                 "--out", str(tmp_path / "o"))


def test_gpt2_offline_through_the_cli(run_cli, tmp_path, monkeypatch, corpus):
    def offline(name):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=offline))
    line = _one_line_error(run_cli, "--input", corpus[0], "--tokenizer", "gpt2", "--out", str(tmp_path / "o"))
    assert "--tokenizer bpe" in line


def test_not_a_prepared_directory(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_prepared(tmp_path)


@pytest.mark.slow  # runs the CLI as a process
def test_cli_subprocess_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([python_exe(), "-m", "mini_transformer", "prepare", "--input",
                             str(tmp_path / "missing.txt")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: input file") and len(result.stderr.strip().splitlines()) == 1


def test_cli_success_output(run_cli, tmp_path, corpus):
    status, out, err = run_cli("prepare", "--quiet", "--input", *corpus, "--out", str(tmp_path / "o"),
                               "--tokenizer", "bpe", "--vocab_size", "300")
    assert status == 0, err
    assert "from 2 files" in out and "tokenizer  bpe" in out and "val.bin" in out


# -- named datasets ----------------------------------------------------------------------------

def test_shakespeare_offline_says_how_to_pass_a_file(run_cli, tmp_path, monkeypatch):
    def offline(url, timeout):
        assert timeout <= 30
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources_mod.urllib.request, "urlopen", offline)
    line = _one_line_error(run_cli, "--dataset", "shakespeare", "--cache_dir", str(tmp_path / "c"),
                           "--out", str(tmp_path / "o"))
    assert "could not download Tiny Shakespeare" in line and "--input path/to/input.txt" in line
    status, _, err = run_cli("train", "--data.dataset", "shakespeare", "--data.cache_dir", str(tmp_path / "c"),
                             "--training.out_dir", str(tmp_path / "run"), "--quiet")
    assert status == 2 and err.count("\n") == 1
    assert "could not download Tiny Shakespeare" in err and "--data.path path/to/input.txt" in err


def test_shakespeare_download_is_verified_and_cached(tmp_path, monkeypatch):
    payload = b"To be, or not to be: that is the question.\n" * 50
    calls = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        calls.append(url)
        return Response(payload)

    monkeypatch.setattr(sources_mod.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(UserError, match="sha256"):
        sources_mod.dataset_sources("shakespeare", tmp_path)
    monkeypatch.setattr(sources_mod, "SHAKESPEARE_SHA256", __import__("hashlib").sha256(payload).hexdigest())
    cfg = DataConfig(dataset="shakespeare", cache_dir=str(tmp_path))
    data = prepare_dataset(cfg, progress=False)
    assert data.tokenizer.decode(data.train.tolist() + data.val.tolist()) == payload.decode()
    prepare_dataset(cfg, progress=False)
    assert len(calls) == 2  # the mismatch and the first good download; then the cached copy


def test_unknown_dataset_suggests_a_name(tmp_path):
    with pytest.raises(UserError, match="did you mean 'shakespeare'"):
        sources_mod.dataset_sources("shakespear", tmp_path)


def test_pystdlib_is_sorted_capped_and_skips_tests():
    sources = pystdlib_sources(max_bytes=200_000)
    names = [s.name for s in sources]
    assert names == sorted(names) and names[0].startswith("pystdlib:")
    assert sum(s.size for s in sources) <= 200_000
    dirs = {part for n in names for part in n.split(":", 1)[1].split("/")[:-1]}
    assert not dirs & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert [s.name for s in pystdlib_sources(max_bytes=200_000)] == names  # deterministic


def test_bpe_trained_on_a_prefix_still_encodes_everything(tmp_path, corpus):
    data = _prepare(corpus, tmp_path / "o", tokenizer="bpe", vocab_size=300, train_bytes=200, chunk_size=64)
    assert data.meta["bpe_train_bytes"] == 200
    other_chunks = _prepare(corpus, tmp_path / "c", tokenizer="bpe", vocab_size=300, train_bytes=200, chunk_size=7)
    assert _files(other_chunks.directory) == _files(data.directory)
    full = _prepare(corpus, tmp_path / "f", tokenizer="bpe", vocab_size=300, chunk_size=64)
    assert data.tokenizer.to_json() != full.tokenizer.to_json()
    assert data.tokenizer.decode(data.train.tolist() + data.val.tolist()) == TEXT_A + "\n\n" + TEXT_B
