"""How ``bench`` reports: the header before any measurement, rows as they finish, the spread of runs."""

from __future__ import annotations

import json

import pytest

from mini_transformer import benchmark


def _row(preset: str, train: tuple[float, float, float], generate: tuple[float, float, float]) -> dict:
    return {"preset": preset, "params": 1.5e6, "dtype": "fp32", "mfu": 0.25, "matmul_flops_per_s": 2e10,
            "train_tokens_per_s": train[0], "train_tokens_per_s_min": train[1], "train_tokens_per_s_max": train[2],
            "generate_tokens_per_s": generate[0], "generate_tokens_per_s_min": generate[1],
            "generate_tokens_per_s_max": generate[2]}


ROWS = {"tiny": _row("tiny", (10_000, 9_500, 10_400), (300, 290, 310)),
        "small": _row("small", (6_733, 6_100, 28_414), (120, 118, 121))}


@pytest.fixture
def fake_measurements(monkeypatch, capsys):
    """bench_preset replaced by canned rows; records what had been printed when each was measured."""
    printed_before: dict[str, str] = {}

    def measure(preset, settings):
        printed_before[preset] = capsys.readouterr().out
        return ROWS[preset]

    monkeypatch.setattr(benchmark, "bench_preset", measure)
    return printed_before


def test_header_comes_before_the_first_measurement_and_each_row_after_its_own(run_cli, tmp_path,
                                                                            fake_measurements):
    status, out, _ = run_cli("bench", "--presets", "tiny", "small", "--device", "cpu", "--out", str(tmp_path))
    assert status == 0
    before_tiny, before_small = fake_measurements["tiny"], fake_measurements["small"]
    assert benchmark.BENCH_HEADER[0] in before_tiny and "| tiny |" not in before_tiny
    assert "| tiny | 1.50M | - | - | 10,000 (9,500-10,400) | 25.0% | 300 (290-310) |" in before_small
    assert "| small | 1.50M | - | - | 6,733 (6,100-28,414) | 25.0% | 120 (118-121) |" in out
    assert benchmark.BENCH_HEADER[0] not in out  # printed once, before the rows
    assert "median (slowest-fastest)" in benchmark.BENCH_HEADER[0]
    # small's training runs differ 4.7x: the machine was busy, and the note says which row.
    assert "note: the timed runs of small differ by up to 4.7x" in out and "machine was busy" in out
    written = (tmp_path / "bench.md").read_text()
    assert "6,733 (6,100-28,414)" in written and "machine was busy" in written
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["train_tokens_per_s_max"] == 28_414


def test_no_busy_note_when_the_runs_agree(run_cli, tmp_path, fake_measurements):
    status, out, _ = run_cli("bench", "--presets", "tiny", "--device", "cpu", "--out", str(tmp_path))
    assert status == 0 and "busy" not in out and "MFU:" in out


def test_rates_are_the_median_slowest_and_fastest_run():
    assert benchmark.rates(100.0, [2.0, 1.0, 4.0]) == {"median": 50.0, "min": 25.0, "max": 100.0}
    assert benchmark.busy_note([_row("x", (10, 9, 13), (1, 1, 1))]) is None  # 1.44x: within BUSY_SPREAD
    assert "x differ by up to 1.6x" in benchmark.busy_note([_row("x", (10, 9, 14.5), (1, 1, 1))])
