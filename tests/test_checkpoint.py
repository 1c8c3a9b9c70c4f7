"""Checkpoints and the weights toolkit: one state-dict writer, one fingerprint, tied weights stored
once and tied again, models loaded onto the meta device from memory-mapped files."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from mini_transformer import atomic
from mini_transformer import checkpoint as ckpt
from mini_transformer.config import Config, ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.lora import apply_lora, save_adapter
from mini_transformer.model import Transformer
from mini_transformer.quantize import quantize_model
from mini_transformer.safetensors_io import read_safetensors
from mini_transformer.tokenizer import CharTokenizer
from mini_transformer.weights import model_fingerprint, tied_names, weights_state_dict

TEXT = "the quick brown fox jumps over the lazy dog\n"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and robust on a busy machine
    yield
    torch.set_num_threads(before)


def tiny(tie: bool = True, seed: int = 0) -> tuple[Transformer, Config, CharTokenizer]:
    tokenizer = CharTokenizer.from_text(TEXT)
    config = Config()
    config.model = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                               block_size=16, dropout=0.0, tie_embeddings=tie)
    torch.manual_seed(seed)
    return Transformer(config.model).eval(), config, tokenizer


def idx(config: Config) -> torch.Tensor:
    return torch.randint(0, config.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


# -- tied weights ---------------------------------------------------------------------------------

def test_tied_weights_are_found_by_registration_and_stored_once():
    tied, _, _ = tiny(tie=True)
    untied, _, _ = tiny(tie=False)
    assert tied_names(tied) == {"lm_head.weight": "tok_emb.weight"}
    assert tied_names(untied) == {}
    with torch.device("meta"):  # no memory to compare: the registrations still say it
        assert tied_names(Transformer(tied.config)) == {"lm_head.weight": "tok_emb.weight"}
    assert "lm_head.weight" not in weights_state_dict(tied) and "tok_emb.weight" in weights_state_dict(tied)
    assert "lm_head.weight" in weights_state_dict(untied)
    # A quantized head with its own table (the embedding reads it, unregistered) is no alias.
    assert tied_names(quantize_model(tiny()[0], "int8", include_embedding=True)) == {}


# -- loading onto the meta device -----------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_load_model_rebuilds_the_same_model(tmp_path, tie):
    model, config, tokenizer = tiny(tie=tie)
    directory = ckpt.save_checkpoint(tmp_path, 3, model, config, tokenizer)
    loaded = ckpt.load_model(directory)
    assert torch.equal(loaded(idx(config)).logits, model(idx(config)).logits)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in loaded.parameters())
    json_meta = json.loads((directory / ckpt.META_FILE).read_text())
    assert json_meta["model_fingerprint"] == model_fingerprint(config.model)


def test_load_model_casts_weights_saved_in_another_dtype(tmp_path):
    """The model's own dtype wins, as a copying load_state_dict would give."""
    model, config, tokenizer = tiny()
    directory = ckpt.save_checkpoint(tmp_path, 1, model.to(torch.bfloat16), config, tokenizer)
    loaded = ckpt.load_model(directory)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.float())


def test_load_model_of_a_lora_run_keeps_its_adapters(tmp_path):
    model, config, tokenizer = tiny()
    apply_lora(model, rank=2, alpha=4, targets=["attention"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a non-zero update, so the adapters change the output
    config.advanced.lora_rank, config.advanced.lora_alpha = 2, 4.0
    config.advanced.lora_targets = ["attention"]
    loaded = ckpt.load_model(ckpt.save_checkpoint(tmp_path, 1, model, config, tokenizer))
    assert torch.equal(loaded(idx(config)).logits, model(idx(config)).logits)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)  # the base stays frozen


def test_load_model_refuses_weights_of_another_shape(tmp_path):
    model, config, tokenizer = tiny()
    directory = ckpt.save_checkpoint(tmp_path, 1, model, config, tokenizer)
    config.model.d_model = 64
    with pytest.raises(UserError, match="different model shape"):
        ckpt.load_model(directory, config=config)


# -- one fingerprint --------------------------------------------------------------------------------

def test_checkpoint_and_adapter_record_the_same_fingerprint(tmp_path):
    model, config, tokenizer = tiny()
    directory = ckpt.save_checkpoint(tmp_path / "run", 1, model, config, tokenizer)
    save_adapter(tmp_path / "adapter", apply_lora(model, rank=2))
    adapter = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    recorded = json.loads((directory / ckpt.META_FILE).read_text())["model_fingerprint"]
    assert adapter["base"]["config_hash"] == recorded == ckpt.model_fingerprint(config.model)
    # Dropout and the attention kernel run the same weights: they are not part of it.
    config.model.dropout, config.model.attention = 0.3, "math"
    assert model_fingerprint(config.model) == recorded
    config.model.n_layers = 3
    assert model_fingerprint(config.model) != recorded


# -- safetensors files ------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", "truncated"])
def test_a_bad_weights_file_is_one_user_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    if content == "truncated":
        whole = safetensors_bytes({"w": torch.zeros(256)})
        content = whole[:len(whole) - 100]
    path.write_bytes(content)
    with pytest.raises(UserError, match="are corrupt") as info:
        read_safetensors(path, "checkpoint weights", "use another checkpoint")
    assert "\n" not in str(info.value) and str(info.value).endswith("use another checkpoint")
    with pytest.raises(UserError, match="is missing"):
        read_safetensors(tmp_path / "absent.safetensors", "checkpoint weights", "retrain")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_are_memory_mapped_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"w": torch.ones(4096)}))
    tensors = read_safetensors(path, "weights", "fix")
    with open("/proc/self/maps") as maps:
        assert str(path) in maps.read()  # the file is mapped, not read into memory
    tensors["w"].mul_(3)
    assert torch.equal(read_safetensors(path, "weights", "fix")["w"], torch.ones(4096))


# -- writing whole checkpoint directories ----------------------------------------------------------

def test_save_checkpoint_keeps_a_complete_step_and_leaves_no_temporary_directory(tmp_path):
    model, config, tokenizer = tiny()
    first = ckpt.save_checkpoint(tmp_path, 5, model, config, tokenizer)
    before = (first / ckpt.WEIGHTS_FILE).read_bytes()
    other, _, _ = tiny(seed=1)
    assert ckpt.save_checkpoint(tmp_path, 5, other, config, tokenizer) == first  # never rewritten
    assert (first / ckpt.WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005", "latest.json"]


def test_save_inference_checkpoint_replaces_an_old_one_whole(tmp_path):
    model, config, tokenizer = tiny()
    out = tmp_path / "merged"
    ckpt.save_inference_checkpoint(out, model, config, tokenizer)
    (out / "stale.txt").write_text("from the old checkpoint")
    other, _, _ = tiny(seed=1)
    ckpt.save_inference_checkpoint(out, other, config, tokenizer)
    assert not (out / "stale.txt").exists()  # the old directory went as a whole
    assert torch.equal(ckpt.load_model(out).tok_emb.weight, other.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no .tmp-* or .old-* left


def test_a_quantize_or_merge_output_a_kill_left_renamed_aside_is_found_again(tmp_path, monkeypatch):
    """Without an atomic exchange, replacing ``--out`` renames the old checkpoint to ``.old-<name>``
    first; a kill before the new one moves in leaves no ``--out``. Reading it renames it back, and
    the next replace starts from it."""
    model, config, tokenizer = tiny()
    out = tmp_path / "merged"
    ckpt.save_inference_checkpoint(out, model, config, tokenizer)
    out.rename(tmp_path / ".old-merged")  # what the kill left
    assert ckpt.resolve_checkpoint(out) == out
    assert torch.equal(ckpt.load_model(out).tok_emb.weight, model.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the rename fallback, where no exchange exists
    other, _, _ = tiny(seed=1)
    ckpt.save_inference_checkpoint(out, other, config, tokenizer)
    assert torch.equal(ckpt.load_model(out).tok_emb.weight, other.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
