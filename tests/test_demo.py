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


def test_a_run_of_few_steps_says_the_sample_will_be_noise_and_how_long_to_train():
    note = demo.too_few_steps_note(steps=13, seconds=120.0, budget=120.0)
    assert "only 13 training steps fit in 120 s" in note and "9.2 s a step" in note
    assert "mostly noise" in note
    # 300 steps at 9.2 s, plus a tenth for evaluation and saving, rounded up to whole minutes.
    assert "python -m mini_transformer.demo --seconds 3060" in note and "DEMO_SECONDS=3060" in note
    assert demo.too_few_steps_note(steps=demo.ENOUGH_STEPS, seconds=120.0, budget=120.0) is None
    # The final evaluation after the budget is not training time: 1 step in a 5 s budget is 5 s a step.
    assert "only 1 training step fit in 5 s here (5.0 s a step" in demo.too_few_steps_note(1, 347.0, 5.0)


def test_a_non_positive_time_budget_is_one_line_and_exit_2(capsys):
    assert demo.main(["--seconds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seconds must be positive, got 0; 120 is the default"]
