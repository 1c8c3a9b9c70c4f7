"""Library errors speak the library's terms; the command line adds the flag a user should change."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_prepare_names_the_val_fraction_flag(run_cli, tmp_path, value):
    path = tmp_path / "text.txt"
    path.write_text("some text to prepare\n" * 20, encoding="utf-8")
    status, _, err = run_cli("prepare", "--input", str(path), "--out", str(tmp_path / "o"), "--val_fraction", value,
                             "--quiet")
    assert status == 2
    assert err.startswith("error: --val_fraction must be in (0, 1)") and err.count("\n") == 1


@pytest.mark.parametrize("flags, flag", [
    (["--temperature", "-1"], "--temperature"), (["--top_p", "2"], "--top_p"), (["--top_k", "0"], "--top_k"),
    (["--min_p", "1.5"], "--min_p"), (["--repetition_penalty", "0"], "--repetition_penalty"),
    (["--max_tokens", "-1"], "--max_tokens"), (["--num_samples", "0"], "--num_samples"),
])
def test_generate_names_the_sampling_flag(run_cli, flags, flag):
    status, _, err = run_cli("generate", "--checkpoint", "/nonexistent", "--prompt", "x", *flags)
    assert status == 2
    assert err.startswith(f"error: {flag} ") and err.count("\n") == 1
