"""``bench --profile decode``: every profiled microsecond lands in exactly one place, named
operators land in the right category, and the command prints the table and writes its files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mini_transformer import decode_profile
from mini_transformer.benchmark import our_generation_fn, preset_model_config
from mini_transformer.cli import build_parser
from mini_transformer.decode_profile import CATEGORIES, breakdown, category, is_operator
from mini_transformer.model import Transformer


@dataclass
class Event:
    name: str
    cpu_parent: Optional["Event"] = None
    self_cpu_time_total: float = 1.0


def under(*names: str) -> Event:
    """The last of ``names``, called by the one before it, and so on."""
    event = None
    for name in names:
        event = Event(name, event)
    return event


@pytest.mark.parametrize("chain, expected", [
    (["aten::mm"], "matmuls"),
    (["aten::linear", "aten::t", "aten::transpose"], "matmuls"),  # a linear's transposes are matmul time
    (["## Call CompiledFxGraph abc ##", "aten::mm", "aten::clone"], "matmuls"),
    (["aten::_weight_int8pack_mm"], "matmuls"),
    (["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"], "attention"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::empty"], "attention"),
    (["aten::index_copy_"], "attention"),  # the KV-cache write
    (["aten::scatter_"], "attention"),
    (["graph_0_cpp_fused__scaled_dot_product_flash_attention_for_cpu_index_copy_1"], "attention"),
    (["sampling", "aten::argmax"], "sampling"),
    (["sampling", "aten::argmax", "aten::as_strided"], "sampling"),
    (["sampling", "aten::scatter"], "sampling"),  # top-p's scatter is not the KV-cache's
    (["aten::argmax"], "elementwise"),  # outside the sampler's region
    (["aten::native_layer_norm"], "elementwise"),
    (["aten::silu"], "elementwise"),
    (["Torch-Compiled Region: 0/0", "graph_0_cpp_fused__unsafe_view_mul_silu_split_3"], "elementwise"),
    # A compiled decode step fused into one kernel with its products: neither attention nor elementwise.
    (["graph_0_cpp_fused__softmax_add_arange_bitwise_not_bmm_cat_embedding_index_mul_sum_0"], "fused"),
    (["graph_0_cpp_fused_mul_sum_unsqueeze_0"], "fused"),
])
def test_an_operator_goes_to_the_category_of_the_nearest_named_operator(chain, expected):
    assert category(under(*chain)) == expected


def test_regions_are_not_operators():
    for region in ("sampling", "TorchDynamo Cache Lookup", "## Call CompiledFxGraph abc ##",
                   "Torch-Compiled Region: 0/0"):
        assert not is_operator(region)
    for op in ("aten::mm", "mkldnn::_linear_pointwise", "graph_0_cpp_fused_embedding_native_layer_norm_0"):
        assert is_operator(op)


def test_breakdown_counts_the_self_time_of_every_event_once():
    root = Event("sampling", self_cpu_time_total=5.0)
    argmax = Event("aten::argmax", root, 3.0)
    events = [root, argmax, Event("aten::as_strided", argmax, 0.5), Event("aten::mm", None, 7.0),
              Event("aten::add", None, 2.0), Event("TorchDynamo Cache Lookup", None, 4.0)]
    found = breakdown(events)
    assert found["categories"] == {"matmuls": 7.0, "fused": 0.0, "attention": 0.0, "elementwise": 2.0, "sampling": 3.5}
    assert found["regions"] == {"sampling": 5.0, "TorchDynamo Cache Lookup": 4.0}
    assert found["ops"]["aten::argmax", "sampling"] == [3.0, 1]


def test_a_profiled_generation_splits_all_of_its_self_time_into_categories_and_regions():
    torch.manual_seed(0)
    model = Transformer(preset_model_config("tiny", 32)).eval()
    generate = our_generation_fn(model, [1, 2, 3], 3)
    generate()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate()
    events = prof.events()
    found = breakdown(events)
    total = sum(e.self_cpu_time_total for e in events)
    accounted = sum(found["categories"].values()) + sum(found["regions"].values())
    assert accounted == pytest.approx(total, rel=1e-9)
    assert total == pytest.approx(prof.key_averages().self_cpu_time_total, rel=1e-9)
    assert all(found["categories"][name] > 0 for name in CATEGORIES if name != "fused")  # eager: nothing fused
    assert "sampling" in found["regions"]  # the engine marks the sampler while a profiler runs
    names = {(e.name, category(e)) for e in events if is_operator(e.name)}
    assert ("aten::mm", "matmuls") in names and ("aten::index_copy_", "attention") in names
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention") in names
    assert {kind for name, kind in names if name == "aten::argmax"} == {"sampling"}


def test_profile_takes_train_or_decode_and_bare_means_train():
    parse = build_parser().parse_args
    assert parse(["bench", "--profile"]).profile == "train"
    assert parse(["bench", "--profile", "--presets", "small"]).profile == "train"
    assert parse(["bench", "--profile", "decode"]).profile == "decode"
    assert parse(["bench"]).profile is None
    assert parse(["bench"]).batch_size is None  # each mode has its own default (training 32, decoding 1)


def test_profile_decode_prints_the_table_and_writes_markdown_json_and_a_trace(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(decode_profile, "llamacpp_installed", lambda: False)
    status, out, _ = run_cli("bench", "--profile", "decode", "--presets", "tiny", "--gen_tokens", "4",
                             "--steps", "2", "--block_size", "32", "--out", str(tmp_path))
    assert status == 0
    assert "tiny (0.86M parameters), fp32, batch 1, 8-token prompt + 4 new tokens" in out
    for title in [*CATEGORIES.values(), decode_profile.OVERHEAD]:
        assert f"| {title} | " in out
    assert "llama.cpp: not installed (pip install 'mini-transformer[llamacpp]')" in out
    assert "| aten::mm | matmuls |" in out and "take the overhead as a lower bound" in out
    (row,) = json.loads((tmp_path / "profile_decode.json").read_text())["rows"]
    assert row["batch_size"] == 1 and row["dtype"] == "fp32" and row["llamacpp_us"] is None
    assert all(us >= 0 for us in row["categories_us"].values())
    assert sum(row["categories_us"].values()) + row["overhead_us"] == pytest.approx(row["wall_us"])
    assert row["wall_us_min"] <= row["wall_us"] <= row["wall_us_max"]
    assert "| sampling (argmax" in (tmp_path / "profile_decode.md").read_text()
    trace = json.loads((tmp_path / "trace-decode-tiny.json").read_text())
    assert any(e.get("name") == "sampling" for e in trace["traceEvents"])


def test_profile_decode_refuses_a_gpu_and_too_many_tokens_in_one_line(run_cli, tmp_path):
    status, _, err = run_cli("bench", "--profile", "decode", "--device", "cuda", "--out", str(tmp_path))
    assert status == 2 and "profiles decoding on the CPU; leave out --device" in err
    status, _, err = run_cli("bench", "--profile", "decode", "--presets", "tiny", "--block_size", "16",
                             "--out", str(tmp_path))
    assert status == 2 and "exceed the context (16); raise --block_size or lower --gen_tokens" in err


def test_the_llamacpp_line_gives_both_times_per_token():
    row = {"wall_us": 2000.0, "llamacpp_us": 250.0, "batch_size": 1, "threads": 2}
    assert decode_profile.llamacpp_line(row).startswith("ours 2,000 us/token, llama.cpp 250 us/token on the same "
                                                        "weights")
    assert decode_profile.llamacpp_line(row).endswith("ours takes 8.00x")
    assert "batch 1 only" in decode_profile.llamacpp_line({**row, "batch_size": 4})


def test_with_llamacpp_installed_both_decode_the_same_weights_in_turn(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llamacpp builds it)")
    row = decode_profile.profile_decode("tiny", tmp_path / "trace.json", block_size=16, gen_tokens=4, repeats=1)
    assert row["llamacpp_us"] > 0
    assert decode_profile.llamacpp_line(row).startswith(f"ours {row['wall_us']:,.0f} us/token, llama.cpp ")
