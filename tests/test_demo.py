"""The demo's choice of data (the two-minute training run itself is exercised by `make demo`)."""

import pytest

from mini_transformer import demo
from mini_transformer.errors import UserError


def test_an_input_file_is_used_as_given(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be.\n" * 10, encoding="utf-8")
    overrides, description, prompt = demo.choose_data(str(text))
    assert overrides == ["--data.path", str(text)]
    assert description == str(text)
    assert prompt == "\n"


def test_a_missing_input_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="not found"):
        demo.choose_data(missing)
    assert demo.main(["--input", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: demo input")
