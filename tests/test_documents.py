"""JSON Lines and Parquet inputs: records' text fields become documents, streamed like text files."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from mini_transformer.config import DataConfig
from mini_transformer.data import Source, prepare_dataset, prepare_inputs
from mini_transformer.data.documents import iter_documents
from mini_transformer.errors import SettingError, UserError

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "Ünïcödé 😀 日本語 e\u0301 and <|endoftext|> as plain text",
        "  spaced   out  \n\n\ttabs it's 'q' 12345\n"] * 8


def _write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc, "meta": {"n": i}}) + "\n")
            if i == 2:
                f.write("\n")  # blank lines are skipped
    return str(path)


def _write_parquet(path, docs, field="text"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=5)
    return str(path)


def _tokens(data):
    return data.train.tolist() + data.val.tolist()


def _prepare(inputs, out, **kwargs):
    return prepare_inputs(inputs, out, progress=False, vocab_size=300, **kwargs)


def _separated_by_eos(tokenizer, docs):
    ids: list[int] = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_id] if i else []) + tokenizer.encode(doc)
    return ids


@pytest.mark.parametrize("writer", [_write_jsonl, _write_parquet])
def test_char_documents_give_the_tokens_of_the_text_file_with_blank_lines(tmp_path, writer):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(DOCS), encoding="utf-8", newline="")
    documents = writer(tmp_path / ("docs.jsonl" if writer is _write_jsonl else "docs.parquet"), DOCS)
    expected = _prepare([str(text)], tmp_path / "from_text")
    got = _prepare([documents], tmp_path / "from_docs", chunk_size=16)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (got.directory / name).read_bytes() == (expected.directory / name).read_bytes()
    assert got.meta["document_separator"] == "\n\n" and got.meta["text_field"] == "text"
    assert got.meta["sources"][0]["sha256"] == hashlib.sha256(open(documents, "rb").read()).hexdigest()


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_documents_are_separated_by_end_of_text(tmp_path, kind):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    parquet = _write_parquet(tmp_path / "d.parquet", DOCS, field="body")
    from_jsonl = _prepare([jsonl], tmp_path / "j", tokenizer=kind, text_field="body")
    from_parquet = _prepare([parquet], tmp_path / "p", tokenizer=kind, text_field="body", chunk_size=16)
    tokenizer = from_jsonl.tokenizer
    # "<|endoftext|>" typed inside a document stays ordinary text; only the breaks are the token.
    assert _tokens(from_jsonl) == _tokens(from_parquet) == _separated_by_eos(tokenizer, DOCS)
    assert _tokens(from_jsonl).count(tokenizer.eos_id) == len(DOCS) - 1
    assert from_jsonl.meta["document_separator"] == "<|endoftext|>"
    assert from_parquet.tokenizer.to_json() == tokenizer.to_json()


def test_a_text_file_next_to_documents_is_one_more_document(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("plain text file\n", encoding="utf-8")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", DOCS[:3])
    data = _prepare([str(text), jsonl], tmp_path / "out", tokenizer="byte")
    assert _tokens(data) == _separated_by_eos(data.tokenizer, ["plain text file\n", *DOCS[:3]])


def test_empty_texts_are_skipped_and_progress_counts_file_bytes(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": ""}\n\n{"text": "b"}')  # BOM, no final newline
    counted: list[int] = []
    assert list(iter_documents(Source(jsonl, "d.jsonl"), counted.append)) == ["a", "b"]
    assert sum(counted) == jsonl.stat().st_size
    parquet = _write_parquet(tmp_path / "d.parquet", ["x", "", "y"] * 700)
    counted = []
    assert list(iter_documents(Source(tmp_path / "d.parquet", parquet), counted.append)) == ["x", "y"] * 700
    assert sum(counted) == (tmp_path / "d.parquet").stat().st_size


def test_training_config_reads_the_text_field_and_keys_the_cache_by_it(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"text": doc, "title": doc[:5]}) + "\n")
    data = DataConfig(path=str(jsonl), cache_dir=str(tmp_path / "cache"), tokenizer="byte")
    body = prepare_dataset(data, progress=False)
    data.text_field = "title"
    titles = prepare_dataset(data, progress=False)
    assert body.directory != titles.directory
    assert _tokens(titles) == _separated_by_eos(titles.tokenizer, [d[:5] for d in DOCS])


# -- mistakes ----------------------------------------------------------------------------------

def _jsonl_lines(tmp_path, *lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"body": "x", "id": 2}'],
     "line 2 has no 'text' field (its fields: body, id); name the field that holds the text (--text_field FIELD)"),
    (['{"text": "ok"}', '{"text": 12}'], "line 2: field 'text' is a number, not a string"),
    (['{"text": "ok"}', '{"text": null}'], "line 2: field 'text' is null, not a string"),
    (['{"text": "ok"}', '{"text": "a",}'], "line 2 is not valid JSON (Expecting property name enclosed in double"),
    (['["text", "a"]'], "line 1 is an array, not an object"),
])
def test_jsonl_mistakes_are_one_line_with_the_line_number(run_cli, tmp_path, lines, message):
    status, out, err = run_cli("prepare", "--input", _jsonl_lines(tmp_path, *lines), "--out", str(tmp_path / "o"),
                               "--quiet")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_training_spells_the_text_field_fix_as_its_override(tmp_path):
    from mini_transformer.commands.common import DATA_FLAGS, with_flags

    data = DataConfig(path=_jsonl_lines(tmp_path, '{"body": "x"}'), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SettingError) as exc:
        prepare_dataset(data, progress=False)
    assert with_flags(exc.value, DATA_FLAGS).endswith("(--data.text_field FIELD)")


def test_parquet_mistakes(run_cli, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cases = {
        "no_column.parquet": (pa.table({"body": ["a"]}), "has no column 'text' (its columns: body)"),
        "numbers.parquet": (pa.table({"text": [1, 2]}), "column 'text' holds int64, not strings"),
        "nulls.parquet": (pa.table({"text": ["a", None]}), "row 2: column 'text' is null"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / name)
        status, _, err = run_cli("prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "o"), "--quiet")
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    status, _, err = run_cli("prepare", "--input", str(tmp_path / "broken.parquet"), "--quiet")
    assert status == 2 and "is not a readable Parquet file" in err and len(err.strip().splitlines()) == 1


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(UserError, match=r"needs pyarrow: pip install 'mini-transformer\[parquet\]'"):
        list(iter_documents(Source(tmp_path / "d.parquet", "d.parquet")))
